"""Two-micro-batch overlap under expert parallelism: step time with and without the split, at
several tokens per worker, with 2 and 4 CPU workers, and how much of the all-to-all it hides.

Each worker is a process in a gloo group on 127.0.0.1 holding its shard of the scaled Mixtral
of bench/throughput.py (hidden 512, 8 layers, 8 experts, top-2, fp32), built by the engine's own
Worker. Per size T (tokens per worker), every worker runs the same kind of batch with its own
tokens (so routing differs per worker): "decode" = T sequences of one new token after 32 cached
(garbage KV: the cost, not the values, matters), "prefill" = T tokens in prompts of up to 256.
A step here is the model's forward (what the split changes; scheduling and sampling are
untouched), timed between barriers as the slowest worker's wall time; unsplit and split runs
alternate, median of `--reps`.

    a2a_ms       wall time inside the all-to-alls of the unsplit step (gloo blocks: the
                 transfer plus waiting for the slowest worker), mean over workers
    hidden_share (step unsplit - step split) / a2a_ms, the issue's figure; 1 = the split hid
                 all of it for free. It also counts what halving the batch itself costs or
                 saves (smaller GEMMs and attention batches), so a third mode runs:
    sequential   the same two halves one after the other, each all-to-all waited for at once:
                 hidden_share_same_split = (sequential - split) / its all-to-all time isolates
                 the overlap from the cost of splitting
    exposed_ms   wall time the split step still spent waiting for its all-to-alls

On this 2-core machine the workers, gloo's transfer threads and the compute share two cores:
an all-to-all in flight takes the cores the other micro-batch wants, so little can be hidden,
and the split adds a second pass of small kernels. A GPU (NCCL on its own engines or SMs while
the GEMMs run) is where the split pays; see the note in the JSON.

JSON: runs[{workers, kind, tokens_per_worker, step_ms_unsplit, step_ms_split,
step_ms_split_sequential, a2a_ms, a2a_ms_sequential, exposed_ms, hidden_share,
hidden_share_same_split, speedup, split_by_default}]. --smoke: tiny model, two small sizes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from throughput import SCALED_MIXTRAL, SMOKE_MIXTRAL, machine  # noqa: E402

from moeserve.config import OVERLAP_THRESHOLDS  # noqa: E402

CONTEXT = 32  # cached tokens before each decode token
PROMPT = 256  # longest prompt of a prefill batch
BLOCK = 16
MODES = ("unsplit", "split", "sequential")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shapes(kind: str, T: int) -> tuple[list[int], list[int]]:
    """(query_lens, seq_lens) of a batch of T tokens."""
    if kind == "decode":
        return [1] * T, [CONTEXT + 1] * T
    lens = [PROMPT] * (T // PROMPT) + ([T % PROMPT] if T % PROMPT else [])
    return lens, lens


def _blocks_needed(kind: str, T: int) -> int:
    return sum(-(-n // BLOCK) for n in _shapes(kind, T)[1])


def _rank_main(rank: int, world: int, port: int, model: str, sizes: list[tuple[str, int]], reps: int,
               results) -> None:
    import torch
    import torch.distributed as dist

    from moeserve.config import engine_config
    from moeserve.model.attention import AttentionMetadata
    from moeserve.model.moe.dispatch import run_to_end
    from moeserve.model.overlap import MicroBatch, cut_sequences
    from moeserve.worker.worker import Worker

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0, timeout=datetime.timedelta(seconds=300))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    blocks = max(_blocks_needed(kind, T) for kind, T in sizes)
    config = engine_config(model, dtype="float32", expert_parallel_size=world, distributed_executor_backend="mp",
                           block_size=BLOCK, num_kv_blocks=blocks)
    worker = Worker(config, rank=rank, group=dist.group.WORLD)
    worker.load_model()
    worker.initialize_cache(blocks)
    net, cache, timer = worker.model, worker.runner.kv_cache, worker.model.ep.timer
    gen = torch.Generator().manual_seed(rank)
    out = {}
    for kind, T in sizes:
        q, n = _shapes(kind, T)
        tables, start = [], 0
        for length in n:
            tables.append(list(range(start, start + -(-length // BLOCK))))
            start += len(tables[-1])
        ids = torch.randint(3, net.config.vocab_size, (T,), generator=gen)
        meta = AttentionMetadata.build(q, n, tables, BLOCK)
        cut = (T + 1) // 2
        halves = cut_sequences(q, n, tables, cut)
        split = [MicroBatch(ids[:cut], AttentionMetadata.build(*halves[0], BLOCK)),
                 MicroBatch(ids[cut:], AttentionMetadata.build(*halves[1], BLOCK))]
        runs = {mode: [] for mode in MODES} | {f"{mode}_comm": [] for mode in MODES}
        for rep in range(reps + 1):  # the first of each is a warm-up
            for mode in MODES:
                dist.barrier()
                timer.take()
                t0 = time.perf_counter()
                with torch.inference_mode():
                    if mode == "unsplit":
                        net(ids, meta, cache)
                    elif mode == "split":
                        net.forward_micro_batches(split, cache)
                    else:  # the same halves, one after the other: the split's cost with nothing overlapped
                        net.load.begin_step()
                        for mb in split:
                            run_to_end(net.layer_steps(mb.input_ids, mb.meta, cache))
                elapsed = time.perf_counter() - t0
                comm, _ = timer.take()
                if rep:
                    runs[mode].append(elapsed)
                    runs[f"{mode}_comm"].append(comm)
        out[f"{kind}:{T}"] = runs
    results[rank] = out
    dist.destroy_process_group()


def measure(model: Path, world: int, sizes: list[tuple[str, int]], reps: int) -> list[dict]:
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank_main, args=(world, _free_port(), str(model), sizes, reps, results), nprocs=world)
        per_rank = [dict(results[r]) for r in range(world)]
    rows = []
    for kind, T in sizes:
        key = f"{kind}:{T}"
        step = {m: statistics.median(max(r[key][m][i] for r in per_rank) for i in range(reps)) for m in MODES}
        comm = {m: statistics.median(statistics.mean(r[key][f"{m}_comm"][i] for r in per_rank)
                                     for i in range(reps)) for m in MODES}
        a2a = comm["unsplit"]
        rows.append({
            "workers": world, "kind": kind, "tokens_per_worker": T,
            "step_ms_unsplit": 1e3 * step["unsplit"], "step_ms_split": 1e3 * step["split"],
            "step_ms_split_sequential": 1e3 * step["sequential"],
            "a2a_ms": 1e3 * a2a, "a2a_ms_sequential": 1e3 * comm["sequential"], "exposed_ms": 1e3 * comm["split"],
            "hidden_share": (step["unsplit"] - step["split"]) / a2a if a2a > 0 else None,
            "hidden_share_same_split": ((step["sequential"] - step["split"]) / comm["sequential"]
                                        if comm["sequential"] > 0 else None),
            "speedup": step["unsplit"] / step["split"],
            "split_by_default": T >= OVERLAP_THRESHOLDS["cpu"][kind == "prefill"],
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", default="2,4")
    p.add_argument("--decode-sizes", default="32,128,512", help="tokens per worker of decode batches")
    p.add_argument("--prefill-sizes", default="32,128,512,2048", help="tokens per worker of prefill batches")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", type=Path, help="JSON (default: bench/results/ep_overlap-cpu.json)")
    args = p.parse_args(argv)
    config = SMOKE_MIXTRAL if args.smoke else SCALED_MIXTRAL
    if args.smoke:
        args.workers, args.decode_sizes, args.prefill_sizes, args.reps = "2", "8", "16", 1
    sizes = [("decode", int(t)) for t in args.decode_sizes.split(",") if t] + \
            [("prefill", int(t)) for t in args.prefill_sizes.split(",") if t]
    with tempfile.TemporaryDirectory() as tmp:
        from moeserve.testing.checkpoints import make_tiny_checkpoint

        path = make_tiny_checkpoint("mixtral", Path(tmp) / "mixtral", **config)
        runs = [row for n in args.workers.split(",") for row in measure(path, int(n), sizes, args.reps)]
    result = {
        "benchmark": "ep_overlap",
        "machine": machine(),
        "command": "python bench/ep_overlap.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": config,
        "runs": runs,
        "note": ("2 CPU cores shared by every worker, gloo's transfer threads and the compute: an all-to-all in "
                 "flight competes with the other micro-batch for the same cores. A GPU run needs NCCL "
                 "all-to-alls on their own stream (async_op issues them there) and enough tokens per GPU for "
                 "the expert GEMMs to outlast the transfer"),
    }
    out = args.out or Path(__file__).parent / "results" / "ep_overlap-cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for r in runs:
        share, same = (("n/a" if v is None else f"{v:.2f}") for v in (r["hidden_share"], r["hidden_share_same_split"]))
        print(f"{r['workers']} workers {r['kind']:7s} {r['tokens_per_worker']:5d} tok/worker: "
              f"unsplit {r['step_ms_unsplit']:7.1f} ms, split {r['step_ms_split']:7.1f} ms "
              f"({r['speedup']:.2f}x), halves in sequence {r['step_ms_split_sequential']:7.1f} ms, "
              f"a2a {r['a2a_ms']:6.1f} ms, exposed {r['exposed_ms']:6.1f} ms, hidden_share {share} "
              f"(same split: {same}){' [split by default]' if r['split_by_default'] else ''}")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
