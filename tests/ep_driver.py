"""Runs inside a test's network namespace (tests/test_expert_parallel.py): an expert-parallel
engine on the namespace's Ray cluster, reporting what the test checks as JSON on stdout.

    generate  MODEL PROMPTS.json --workers N [--spread] [--spares S --replication]
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
import subprocess
import sys
import time
from pathlib import Path


class _Recorder:
    """A between-steps controller that keeps what each step reported."""

    def __init__(self):
        self.logical = None
        self.running_by_rank: list[list[int]] = []

    def between_steps(self, core, stats) -> None:
        self.running_by_rank.append(list(stats.running_by_rank))
        if stats.expert_load is not None:
            rows = stats.expert_load.logical
            if self.logical is None:
                self.logical = [[0] * len(r) for r in rows]
            for acc, row in zip(self.logical, rows):
                for e, v in enumerate(row):
                    acc[e] += v


def generate(args) -> dict:
    from moeserve import SamplingParams
    from moeserve.config import engine_config
    from moeserve.engine.llm_engine import LLMEngine

    prompts = json.loads(Path(args.prompts).read_text())
    settings = dict(max_model_len=128, block_size=4, expert_parallel_size=args.workers, ray_address=args.ray_address,
                    ray_placement_strategy="SPREAD" if args.spread else "PACK")
    if args.spares:
        settings.update(num_redundant_experts=args.spares)
    if args.replication:
        settings.update(replication="auto", replication_window=4, replication_interval=2, replication_threshold=1.0)
    engine = LLMEngine(engine_config(args.model, **settings))
    recorder = _Recorder()
    engine.core.add_controller(recorder)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True, logprobs=5)
    # the first prompt alone for a few steps: the other ranks have no request then
    engine.add_request("0", {"prompt_token_ids": prompts[0]}, params)
    done, step = {}, 0
    while engine.has_unfinished_requests() or step < 3:
        if step == 3:
            for i, p in enumerate(prompts[1:], start=1):
                engine.add_request(str(i), {"prompt_token_ids": p}, params)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = {"tokens": out.outputs[0].token_ids,
                                        "logprobs": [{str(k): v for k, v in lp.items()} for lp in out.outputs[0].logprobs]}
        step += 1
    core = engine.core
    result = {
        "traces": [done[str(i)] for i in range(len(prompts))],
        "logical": recorder.logical,
        "running_by_rank": recorder.running_by_rank,
        "worker_nodes": core.executor.worker_nodes,
        "expert_bytes": core.executor.collective_rpc("expert_weight_bytes"),
        "replications": core.stats().replication.num_replications if core.replication else 0,
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
    cmd = [sys.executable, "-m", "moeserve.cli", "serve", args.model, "--host", "127.0.0.1", "--port", str(port),
           "--max-model-len", "128", "--expert-parallel-size", str(args.workers), "--ray-address", args.ray_address,
           "--log-level", "warning"]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise RuntimeError(f"server exited: {server.stderr.read()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
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
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["generate", "move", "serve"])
    p.add_argument("model")
    p.add_argument("prompts", nargs="?")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--ray-address", required=True)
    p.add_argument("--spread", action="store_true")
    p.add_argument("--spares", type=int, default=0)
    p.add_argument("--replication", action="store_true")
    p.add_argument("--max-tokens", type=int, default=10)
    p.add_argument("--prompt", default="the expert router")
    args = p.parse_args()
    result = {"generate": generate, "move": move, "serve": serve}[args.what](args)
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
