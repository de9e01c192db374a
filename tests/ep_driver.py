"""Runs inside a test's network namespace (tests/test_expert_parallel.py): an expert-parallel
engine on the namespace's Ray cluster, reporting what the test checks as JSON on stdout.

    generate  MODEL PROMPTS.json --workers N [--spread] [--spares S --replication] [--overlap-threshold T]
              greedy traces, the expert-load totals, requests per rank per step, where the
              workers ran, each worker's resident expert bytes
    move      MODEL --workers 2 --spares S
              copies and retirements across workers; each slot's weight code afterwards
    serve     MODEL PROMPT --workers 2
              `moeserve serve --expert-parallel-size 2` in this namespace and the openai client
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


class Recorder:
    """A between-steps controller that keeps what each step reported: expert-load totals
    [L_moe][E] and the running requests per rank."""

    def __init__(self):
        self.logical: list[list[int]] = []
        self.num_tokens = 0  # tokens that entered the MoE layers, over all steps
        self.running_by_rank: list[list[int]] = []

    def between_steps(self, core, stats) -> None:
        self.running_by_rank.append(list(stats.running_by_rank))
        if stats.expert_load is not None:
            self.num_tokens += stats.expert_load.num_tokens
            rows = stats.expert_load.logical
            if not self.logical:
                self.logical = [[0] * len(r) for r in rows]
            for acc, row in zip(self.logical, rows):
                for e, v in enumerate(row):
                    acc[e] += v


def run_staggered(engine, prompts: list[list[int]], params) -> dict:
    """The first prompt alone for three steps (the other ranks have no request then), then the
    rest; request id -> its finished RequestOutput."""
    engine.add_request("0", {"prompt_token_ids": prompts[0]}, params)
    done, step = {}, 0
    while engine.has_unfinished_requests() or step < 3:
        if step == 3:
            for i, p in enumerate(prompts[1:], start=1):
                engine.add_request(str(i), {"prompt_token_ids": p}, params)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        step += 1
    return done


def generate(args) -> dict:
    from moeserve import SamplingParams
    from moeserve.config import engine_config
    from moeserve.engine.llm_engine import LLMEngine

    prompts = json.loads(Path(args.prompts).read_text())
    settings = dict(max_model_len=128, block_size=4, expert_parallel_size=args.workers, ray_address=args.ray_address,
                    ray_placement_strategy="SPREAD" if args.spread else "PACK")
    if args.spares:
        settings.update(num_redundant_experts=args.spares)
    if args.overlap_threshold:
        settings.update(overlap_threshold_decode=args.overlap_threshold,
                        overlap_threshold_prefill=args.overlap_threshold)
    else:
        settings.update(enable_overlap=False)
    if args.replication:
        settings.update(replication="auto", replication_window=4, replication_interval=2, replication_threshold=1.0)
    engine = LLMEngine(engine_config(args.model, **settings))
    recorder = Recorder()
    engine.core.add_controller(recorder)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True, logprobs=5)
    done = {k: {"tokens": o.outputs[0].token_ids,
                "logprobs": [{str(t): v for t, v in lp.items()} for lp in o.outputs[0].logprobs]}
            for k, o in run_staggered(engine, prompts, params).items()}
    core = engine.core
    result = {
        "traces": [done[str(i)] for i in range(len(prompts))],
        "logical": recorder.logical,
        "num_tokens": recorder.num_tokens,
        "running_by_rank": recorder.running_by_rank,
        "worker_nodes": core.executor.worker_nodes,
        "expert_bytes": core.executor.collective_rpc("expert_weight_bytes"),
        "replications": core.stats().replication.num_replications if core.replication else 0,
        "split_steps": core.stats().num_split_steps,
        "steps": core.stats().step,
    }
    core.shutdown()
    return result


# E = 8, two workers, two spares: worker 0 holds slots 0-4 (experts 0-3, spare 4), worker 1
# slots 5-9 (experts 4-7, spare 9). Every move crosses workers.
MOVES = [("replicate_expert", 1, 9), ("replicate_expert", 6, 4), ("retire_replica", 1), ("replicate_expert", 5, 1)]
EXPECTED_PHY2LOG = [0, 5, 2, 3, 6, 4, 5, 6, 7, 1]


def move(args) -> dict:
    """The MOVES in every MoE layer, then each slot's weights as its worker holds them."""
    from moeserve.config import engine_config
    from moeserve.engine.llm_engine import LLMEngine

    engine = LLMEngine(engine_config(args.model, max_model_len=64, expert_parallel_size=2,
                                     ray_address=args.ray_address, num_redundant_experts=2))
    rpc = engine.core.executor.collective_rpc
    start = rpc("placement")[0]
    for layer in range(len(start)):
        for method, *move_args in MOVES:
            rpc(method, layer, *move_args)
    result = {"start": start, "placement": rpc("placement"), "codes": rpc("slot_codes"),
              "expected": EXPECTED_PHY2LOG}
    engine.core.shutdown()
    return result


def serve(args) -> dict:
    import httpx
    from openai import OpenAI

    port = 18000
    server = _start_server(args, port)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        completion = client.completions.create(model=args.model, prompt=args.prompt, max_tokens=12, temperature=0,
                                               extra_body={"ignore_eos": True})
        chat = client.chat.completions.create(model=args.model, messages=[{"role": "user", "content": args.prompt}],
                                              max_tokens=8, temperature=0, stream=True)
        streamed = "".join(c.choices[0].delta.content or "" for c in chat if c.choices)
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        return {"text": completion.choices[0].text, "usage": completion.usage.completion_tokens,
                "streamed": streamed, "metrics_has_ranks": "moeserve:worker_requests_running" in metrics}
    finally:
        _stop(server)


def _stop(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(30)
    except subprocess.TimeoutExpired:
        server.kill()


def _start_server(args, port: int, env: dict | None = None) -> subprocess.Popen:
    """`moeserve serve` with `args.workers` expert-parallel workers on this namespace's cluster
    (HTTP on `port`, gRPC on `port + 1`), once /health is 200. Its log goes to a file: a pipe
    nobody reads would block the server once full."""
    import httpx

    cmd = [sys.executable, "-m", "moeserve.cli", "serve", args.model, "--host", "127.0.0.1", "--port", str(port),
           "--grpc-port", str(port + 1), "--max-model-len", "256", "--expert-parallel-size", str(args.workers),
           "--ray-address", args.ray_address, "--distributed-timeout", "3", "--log-level", "warning"]
    log = tempfile.NamedTemporaryFile("w+", prefix="moeserve-ep-", suffix=".log")
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env={**os.environ, **(env or {})})
    server.log = log  # closed (and removed) with the Popen object
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if server.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"server exited: {log.read()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.3)
    server.kill()
    raise RuntimeError("server did not start")


def _worker_pids() -> list[int]:
    """Processes of this namespace's expert-parallel worker actors."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if b"RayWorkerActor" in cmdline:
                pids.append(int(entry))
    return sorted(pids)


def _grpc_health(port: int) -> str:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def fault(args) -> dict:
    """Requests in flight on a 2-worker server, then worker 1 is lost (ray.kill, SIGKILL of its
    process, or an injected hang): how each request ended, what /health said and when, and
    a greedy completion once serving again."""
    import signal
    import threading

    import httpx
    import ray

    port = 18100
    env = {"MOESERVE_INJECT_FAULTS": "hang:1@40"} if args.how == "hang" else {}
    server = _start_server(args, port, env)
    url = f"http://127.0.0.1:{port}"
    outcomes: dict[int, tuple] = {}

    def ask(i: int) -> None:
        try:
            r = httpx.post(f"{url}/v1/completions", timeout=120,
                           json={"prompt": f"def f_{i}(x):", "max_tokens": 220, "ignore_eos": True})
            outcomes[i] = (r.status_code, r.headers.get("retry-after"), r.text[:300], time.monotonic())
        except httpx.HTTPError as e:
            outcomes[i] = (None, None, repr(e), time.monotonic())

    try:
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # all four running before anything happens
            metrics = httpx.get(f"{url}/metrics").text
            running = [line for line in metrics.splitlines() if line.startswith("moeserve:num_requests_running")]
            if running and float(running[0].split()[-1]) >= 4:
                break
            time.sleep(0.05)
        ray.init(address=args.ray_address, logging_level="ERROR")
        workers = sorted(n["name"] for n in ray.util.list_named_actors(all_namespaces=True)
                         if "-worker-" in n["name"])
        lost_at = time.monotonic()
        if args.how == "ray_kill":
            entry = next(n for n in ray.util.list_named_actors(all_namespaces=True) if n["name"].endswith("-worker-1"))
            ray.kill(ray.get_actor(entry["name"], namespace=entry["namespace"]))
        elif args.how == "sigkill":
            os.kill(_worker_pids()[-1], signal.SIGKILL)
        health: list[tuple[float, int, str]] = []
        while_down = grpc_down = None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            r = httpx.get(f"{url}/health", timeout=5)
            if not health or health[-1][1] != r.status_code:
                health.append((time.monotonic() - lost_at, r.status_code, r.text[:300]))
            if r.status_code == 503 and while_down is None:  # a new request while the workers are rebuilt
                grpc_down = _grpc_health(port + 1)
                new = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30)
                while_down = (new.status_code, new.headers.get("retry-after"), new.text[:300])
            if r.status_code == 200 and len(health) >= 3:
                break
            time.sleep(0.05)
        for t in threads:
            t.join(120)
        grpc_up = _grpc_health(port + 1)
        served = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code
        after = httpx.post(f"{url}/v1/completions", timeout=60,
                           json={"prompt": args.prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True}).json()
        metrics = httpx.get(f"{url}/metrics").text
    finally:
        _stop(server)
    time.sleep(3)
    leftover = [n["name"] for n in ray.util.list_named_actors(all_namespaces=True) if "-worker-" in n["name"]]
    return {
        "workers": workers,
        "outcomes": [(o[0], o[1], o[2], o[3] - lost_at) for o in (outcomes[i] for i in sorted(outcomes))],
        "health": health,
        "served_after_recovery": served,
        "new_request_while_down": while_down,
        "grpc_health": [grpc_down, grpc_up],
        "after_text": after["choices"][0]["text"],
        "metrics": [line for line in metrics.splitlines() if line.startswith("moeserve:worker_")],
        "leftover_actors": leftover,
        "leftover_worker_processes": _worker_pids(),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["generate", "move", "serve", "fault"])
    p.add_argument("--how", choices=["ray_kill", "sigkill", "hang"], default="ray_kill")
    p.add_argument("model")
    p.add_argument("prompts", nargs="?")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--ray-address", required=True)
    p.add_argument("--spread", action="store_true")
    p.add_argument("--spares", type=int, default=0)
    p.add_argument("--replication", action="store_true")
    p.add_argument("--max-tokens", type=int, default=10)
    p.add_argument("--overlap-threshold", type=int, default=0, help="split steps from this many tokens per worker "
                   "(0: no split)")
    p.add_argument("--prompt", default="the expert router")
    args = p.parse_args()
    result = {"generate": generate, "move": move, "serve": serve, "fault": fault}[args.what](args)
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
