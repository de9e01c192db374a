"""Decode step cost: the ordinary step against the static decode path (CUDA graphs on a GPU).

shared/GPU.md item 5. For each batch size (default 1, 8, 64, 256) every sequence holds --context
cached tokens (random keys and values written straight into the paged cache: the step's cost
does not depend on their values) and decodes --steps tokens, twice:

- ordinary: what the model runner does without graphs: attention metadata built from host lists,
  the model forward and the logits, every step;
- static: worker/cuda_graph.py's path: the step staged into the persistent buffers with one
  copy, then the bucket's captured graph replayed (on CUDA) or its region run eagerly (elsewhere,
  where graphs cannot be captured: `capture=False`).

Per path and batch: milliseconds per step; host syncs in one step's forward and logits (the aten
ops and tensor methods that make the host wait for the device, moeserve.testing.host_sync: the
static region must have none); on CUDA, kernel and graph launches per step (CUDA runtime launch calls
the profiler sees). Writes JSON with the machine and the command to --out
(bench/results/decode_step-<device>.json). Backends: triton attention and experts on CUDA;
torch attention and grouped_mm experts on the CPU (the static path refuses the torch expert
loop). --smoke: the tiny model, batches 1 and 4, 2 steps.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from throughput import SCALED_MIXTRAL, SMOKE_MIXTRAL, machine  # noqa: E402

BLOCK = 16


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _launches(device: torch.device, fn) -> int | None:
    """CUDA runtime launch calls (kernels and graphs) made by one call of `fn`; None off CUDA."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cudaGraphLaunch", "cuLaunchKernelEx")
    return sum(e.count for e in prof.key_averages() if e.key in names)


def _syncs(fn) -> list[str]:
    from moeserve.testing.host_sync import HostSyncRecorder

    with HostSyncRecorder() as rec:
        fn()
    return rec.seen


def measure(path: Path, args: argparse.Namespace) -> list[dict]:
    from moeserve.checkpoint import load_model
    from moeserve.model.attention import AttentionMetadata, PagedKVCache, Workspace
    from moeserve.worker.cuda_graph import DecodeGraphs, DecodeInputs, DecodeRow

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = getattr(torch, args.dtype)
    model = load_model(path, dtype=args.dtype, device=str(device), expert_backend="triton" if cuda else "grouped_mm",
                       attention_backend="triton" if cuda else "torch")
    max_batch = max(args.batches)
    max_len = args.context + args.steps + 1
    per_seq = -(-max_len // BLOCK)
    scratch = max_batch * per_seq
    cache = PagedKVCache.for_model(model.config, scratch + 1, BLOCK, dtype, device=device)
    g = torch.Generator(device=device).manual_seed(0)
    for t in cache.key + ([] if cache.value_in_key else cache.value):
        t.copy_(torch.randn(t.shape, generator=g, device=device, dtype=torch.float32).to(dtype))
    tables = [list(range(r * per_seq, (r + 1) * per_seq)) for r in range(max_batch)]
    inputs = DecodeInputs(max_batch=max_batch, max_num_seqs=max_batch, blocks_per_seq=per_seq, max_diffs=64,
                          block_size=BLOCK, scratch_block=scratch, device=device)
    for row, t in enumerate(tables):
        inputs.set_blocks(row, 0, t)
    buckets = tuple(sorted(set(args.batches)))
    graphs = DecodeGraphs(model, cache, inputs, max_model_len=max_len, buckets=buckets, capture=cuda)
    K = model.config.top_k
    workspace = Workspace()
    results = []
    for batch in buckets:
        def rows_at(step):  # every sequence's token of this step, as the runner stages it
            p = args.context + step
            return [DecodeRow(7, p, tables[r][p // BLOCK] * BLOCK + p % BLOCK, r, K, K) for r in range(batch)]

        def ordinary_inputs(step):
            meta = AttentionMetadata.build([1] * batch, [r.position + 1 for r in rows_at(step)], tables[:batch], BLOCK,
                                           device, workspace, split_decodes=model.attention_backend == "torch")
            return torch.full((batch,), 7, dtype=torch.int64).to(device, non_blocking=True), meta

        @torch.inference_mode()
        def ordinary_forward(ids, meta):
            return model.compute_logits(model(ids, meta, cache))

        def ordinary(step):
            return ordinary_forward(*ordinary_inputs(step))

        def static(step):
            return graphs.run(rows_at(step))

        row = {"batch": batch, "context": args.context, "steps": args.steps}
        for name, fn in (("ordinary", ordinary), ("static", static)):
            fn(0)  # warm-up (and the triton kernels' compilation)
            _sync(device)
            start = time.perf_counter()
            for step in range(args.steps):
                fn(step)
            _sync(device)
            row[f"{name}_ms_per_step"] = 1e3 * (time.perf_counter() - start) / args.steps
            row[f"{name}_launches_per_step"] = _launches(device, lambda: fn(0))
        graphs.inputs.stage(rows_at(0), batch)
        row["static_host_syncs"] = _syncs(lambda: graphs.forward(batch))
        step_inputs = ordinary_inputs(0)  # built on the host from lists: its int()s wait for nothing
        row["ordinary_host_syncs"] = _syncs(lambda: ordinary_forward(*step_inputs))
        row["static_speedup"] = row["ordinary_ms_per_step"] / row["static_ms_per_step"]
        row["graphs_captured"] = batch in graphs.graphs
        results.append(row)
        print(f"batch {batch}: ordinary {row['ordinary_ms_per_step']:.2f} ms, static {row['static_ms_per_step']:.2f} ms "
              f"({'graph' if row['graphs_captured'] else 'eager'}), static host syncs {len(row['static_host_syncs'])}")
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="checkpoint directory (default: make the scaled-down Mixtral)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", help="default: bfloat16 on CUDA, float32 elsewhere")
    p.add_argument("--batches", default="1,8,64,256", help="comma-separated decode batch sizes")
    p.add_argument("--context", type=int, default=512, help="cached tokens per sequence")
    p.add_argument("--steps", type=int, default=20, help="timed steps per path and batch")
    p.add_argument("--smoke", action="store_true", help="tiny model, batches 1 and 4, 2 steps, context 20")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if str(args.device).startswith("cuda") else "float32")
    if args.smoke:
        args.batches, args.context, args.steps = "1,4", 20, 2
    try:
        args.batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        p.error("--batches takes comma-separated integers")
    if min(args.batches) < 1 or args.context < 0 or args.steps < 1:
        p.error("batches and --steps must be >= 1, --context >= 0")
    with tempfile.TemporaryDirectory() as tmp:
        path, shape = args.model, None
        if path is None:
            from moeserve.testing.checkpoints import make_tiny_checkpoint

            shape = SMOKE_MIXTRAL if args.smoke else SCALED_MIXTRAL
            path = make_tiny_checkpoint("mixtral", Path(tmp) / "mixtral", **shape)
        rows = measure(path, args)
    result = {"benchmark": "decode_step", "command": "python bench/decode_step.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": machine(), "device": args.device, "dtype": args.dtype,
              "model": {"checkpoint": str(args.model) if args.model else "scaled-down Mixtral, random weights",
                        "shape": shape},
              "rows": rows}
    out = args.out or Path(__file__).parent / "results" / f"decode_step-{args.device.split(':')[0]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
