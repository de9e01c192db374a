"""Expert parallelism on one CPU machine: what a step costs with 1, 2 and 4 workers, and how much
of it is the expert all-to-all.

The scaled-down Mixtral of bench/throughput.py (hidden 512, 8 layers, 8 experts, top-2, fp32)
serves one seeded offline workload with 1 worker (the in-process executor, no all-to-all), then
2 and 4 expert-parallel workers (worker processes; the step path is the one Ray actors run:
ZMQ channel, gloo all-to-all; Ray only starts them). Per run: output tok/s, mean step time,
and each worker's seconds inside all_to_all_single as a share of the run's step time (gloo
blocks, so wall time inside the call is the communication plus waiting for the slowest rank),
and the round trip of the executor's ZMQ channel alone (a call to every worker and the replies:
what a shared-memory broadcast of the step could at most save).

On this 2-core machine more workers cannot be faster: 4 workers share 2 cores, each with a
quarter of the threads, and every step adds 3 all-to-alls per MoE layer. The point is the cost
breakdown, not a speedup. On a GPU machine the 1-worker NCCL path is the first thing to run
(shared/GPU.md).

JSON: runs[{workers, output_tok_s, step_ms, comm_share, comm_ms_per_step, a2a_calls_per_step}].
--smoke: tiny model and workload.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from throughput import SCALED_MIXTRAL, SMOKE_MIXTRAL, machine  # noqa: E402


def run(path: Path, work, workers: int, backend: str) -> dict:
    from moeserve import LLM, SamplingParams

    settings = dict(dtype="float32", max_model_len=512, max_num_seqs=len(work))
    if workers > 1:
        # unsplit steps: the all-to-all's whole cost (bench/ep_overlap.py measures the split)
        settings.update(expert_parallel_size=workers, distributed_executor_backend=backend, enable_overlap=False)
    llm = LLM(str(path), **settings)
    core = llm.engine.core
    llm.generate([{"prompt_token_ids": work[0][0]}], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    core.executor.collective_rpc("comm_seconds")  # reset after warm-up
    steps_before = core.stats().step
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _, n in work]
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p, _ in work], params)
    elapsed = time.perf_counter() - start
    steps = core.stats().step - steps_before
    comm = core.executor.collective_rpc("comm_seconds")  # [(seconds, calls)] per worker
    rounds = 200
    start = time.perf_counter()
    for _ in range(rounds):  # the executor's channel alone: a call to every worker and its reply
        core.executor.collective_rpc("pid")
    channel_ms = 1e3 * (time.perf_counter() - start) / rounds
    core.shutdown()
    comm_s = max(s for s, _ in comm)
    return {
        "workers": workers,
        "output_tok_s": sum(len(o.outputs[0].token_ids) for o in outs) / elapsed,
        "steps": steps,
        "step_ms": 1e3 * elapsed / steps,
        "comm_share": comm_s / elapsed,
        "comm_ms_per_step": 1e3 * comm_s / steps,
        "a2a_calls_per_step": comm[0][1] / steps,
        "comm_seconds_per_worker": [s for s, _ in comm],
        "channel_round_trip_ms": channel_ms,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--workers", default="1,2,4")
    p.add_argument("--backend", default="mp", choices=("mp", "ray"), help="executor for more than one worker")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", type=Path, help="JSON (default: bench/results/ep-cpu.json)")
    args = p.parse_args(argv)
    config = SMOKE_MIXTRAL if args.smoke else SCALED_MIXTRAL
    if args.smoke:
        args.num_requests = 4
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        from moeserve import ModelConfig
        from moeserve.testing.checkpoints import make_tiny_checkpoint

        path = make_tiny_checkpoint("mixtral", Path(tmp) / "mixtral", **config)
        vocab = ModelConfig.from_pretrained(path).vocab_size
        lo, hi = (8, 16) if args.smoke else (16, 128)
        work = [([rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))], rng.randint(lo, hi // 2 + lo))
                for _ in range(args.num_requests)]
        runs = [run(path, work, int(n), args.backend) for n in args.workers.split(",")]
    base = runs[0]["output_tok_s"]
    for r in runs:
        r["tok_s_vs_1_worker"] = r["output_tok_s"] / base
    result = {
        "benchmark": "ep",
        "machine": machine(),
        "command": "python bench/ep.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": config,
        "executor": args.backend,
        "runs": runs,
        "note": "2 CPU cores shared by every worker: the cost breakdown, not a speedup",
    }
    out = args.out or Path(__file__).parent / "results" / "ep-cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for r in runs:
        print(f"{r['workers']} worker(s): {r['output_tok_s']:.1f} tok/s ({r['tok_s_vs_1_worker']:.2f}x), "
              f"step {r['step_ms']:.1f} ms, all-to-all {100 * r['comm_share']:.1f}% of the time "
              f"({r['comm_ms_per_step']:.1f} ms/step, {r['a2a_calls_per_step']:.0f} calls/step), "
              f"channel round trip {r['channel_round_trip_ms']:.2f} ms")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
