"""Replicas through Ray Serve on one machine: 1 vs 2 replicas at a fixed offered load, and Ray
Serve's default request router against moeserve's outstanding-tokens router on imbalance.

Everything runs in a network namespace this script creates (a Ray head on its loopback, the
way tests/netns.py does it): the application of cluster/local.yaml (the embedded default
model; --smoke: a tiny random Mixtral) is deployed with each variant in turn, and the load-test
harness (`moeserve bench serve`) sends the same seeded open-loop workload to it: Poisson
arrivals at --rate req/s, prompts of 26-486 tokens (random dataset, range ratio 0.9, so some
requests cost 20x others) and --output-len tokens each.

Per variant: output tok/s, request throughput, p50/p99 TTFT, and the routing imbalance: the
prompt + output tokens each replica served, max / mean (1.0 = even). On this 2-core machine
two replicas share the two cores the one replica had (each engine runs its own step loop and
torch threads), so 2 replicas cannot double throughput here: what they can show is the queueing
(p99 TTFT) that a second step loop removes, and how evenly each router spreads uneven requests.

JSON: machine, workload, variants[{replicas, router, summary{...}, imbalance, tokens_by_replica}],
ratios (2 replicas / 1 replica, both with the default router).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).parent))
PORT = 8124
VARIANTS = ((1, "pow2"), (2, "pow2"), (2, "outstanding_tokens"))


def inner(args: argparse.Namespace) -> dict:
    """In the namespace: deploy one variant, run the harness against it, read the replicas."""
    import ray
    from ray import serve

    from moeserve.bench import serve as harness
    from moeserve.entrypoints.ray_serve import build_app

    ray.init(address=args.ray_address, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": PORT})
        serve.run(build_app({"model": args.model, "served_model_name": "bench", "num_replicas": args.replicas,
                             "request_router": args.router, "engine": {"max_model_len": 1024},
                             "ray_actor_options": {"num_cpus": 1}}), name="moeserve", route_prefix="/")
        engines = serve.get_deployment_handle("MoeServeEngine", "moeserve")
        url = f"http://127.0.0.1:{PORT}"
        warm = ["--base-url", url, "--model", "bench", "--dataset", "random", "--num-requests", "4",
                "--input-len", "32", "--output-len", "8", "--concurrency", "2", "--no-plots", "--no-progress",
                "--out", str(Path(args.workdir) / "warm.json")]
        harness.main(warm)
        before = _token_counters(engines)
        out = Path(args.workdir) / f"run-{args.replicas}-{args.router}.json"
        harness.main(["--base-url", url, "--model", "bench", "--dataset", "random", "--tokenizer", args.model,
                      "--num-requests", str(args.num_requests), "--input-len", "256", "--range-ratio", "0.9",
                      "--output-len", str(args.output_len), "--request-rate", str(args.rate), "--seed", "0",
                      "--no-plots", "--no-progress", "--out", str(out)])
        after = _token_counters(engines)
        tokens = {r: int(n - before.get(r, 0)) for r, n in after.items()}
        summary = json.loads(out.read_text())["runs"][0]["summary"]
    finally:
        serve.shutdown()
    mean = sum(tokens.values()) / len(tokens)
    return {"replicas": args.replicas, "router": args.router, "summary": _summary(summary),
            "tokens_by_replica": tokens, "imbalance": max(tokens.values()) / mean if mean else None}


def _token_counters(engines) -> dict[str, float]:
    """Prompt + output tokens each replica has served since it started, from its own counters."""
    from prometheus_client.parser import text_string_to_metric_families

    served = {}
    for s, text in engines.broadcast("report").results():
        served[s.replica] = sum(sample.value for family in text_string_to_metric_families(text.decode())
                                if family.name in ("moeserve:prompt_tokens", "moeserve:generation_tokens")
                                for sample in family.samples if sample.name.endswith("_total"))
    return served


def _summary(s: dict) -> dict:
    return {"completed": s["completed"], "failed": s["failed"], "duration_s": s["duration_s"],
            "request_throughput": s["request_throughput"], "output_throughput": s["output_throughput"],
            "ttft_ms_p50": s["ttft_ms"]["p50"], "ttft_ms_p99": s["ttft_ms"]["p99"],
            "e2e_ms_p99": s["e2e_ms"]["p99"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, default=2.0, help="offered load, requests per second")
    p.add_argument("--num-requests", type=int, default=120)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--smoke", action="store_true", help="tiny model, 8 requests")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "replicas-cpu.json"))
    p.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--replicas", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--router", default="pow2", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--ray-address", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.inner:
        print("RESULT " + json.dumps(inner(args)), flush=True)
        return 0

    from netns import RayNetnsCluster, can_make_namespaces
    from throughput import machine

    if not can_make_namespaces():
        p.error("needs root and iproute2: Ray runs in a network namespace this script creates")
    if args.smoke:
        args.num_requests, args.output_len, args.rate = 8, 8, 4.0
    with tempfile.TemporaryDirectory() as workdir:
        if args.smoke:
            from moeserve.testing.checkpoints import make_tiny_checkpoint

            model = str(make_tiny_checkpoint("mixtral", Path(workdir) / "tiny"))
        else:
            model = str(ROOT / "models" / "moeserve-tiny-moe")
        cluster = RayNetnsCluster(num_cpus=4)
        variants = []
        try:
            for replicas, router in VARIANTS:
                cmd = [sys.executable, __file__, "--inner", "--replicas", str(replicas), "--router", router,
                       "--model", model, "--workdir", workdir, "--ray-address", cluster.address,
                       "--rate", str(args.rate), "--num-requests", str(args.num_requests),
                       "--output-len", str(args.output_len)]
                start = time.monotonic()
                done = cluster.run(cmd, timeout=1800)
                lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
                if done.returncode != 0 or not lines:
                    print(done.stderr[-4000:], file=sys.stderr)
                    return 1
                variants.append(json.loads(lines[-1][len("RESULT "):]))
                print(f"{replicas} replica(s), {router}: {json.dumps(variants[-1]['summary'])} "
                      f"imbalance {variants[-1]['imbalance']} ({time.monotonic() - start:.0f} s)", file=sys.stderr)
        finally:
            cluster.stop()
    one, two = variants[0]["summary"], variants[1]["summary"]
    result = {
        "benchmark": "replicas",
        "machine": machine(),
        "command": " ".join(["python", "bench/replicas.py", *sys.argv[1:]]),
        "workload": {"model": Path(model).name if not args.smoke else "tiny-random-mixtral",
                     "request_rate": args.rate, "num_requests": args.num_requests, "input_len": "26-486 (256, ratio 0.9)",
                     "output_len": args.output_len},
        "variants": variants,
        "ratios": {"output_throughput_2_vs_1": two["output_throughput"] / one["output_throughput"],
                   "ttft_p99_2_vs_1": two["ttft_ms_p99"] / one["ttft_ms_p99"]},
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
