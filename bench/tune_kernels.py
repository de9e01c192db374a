"""Search the fused MoE kernel's block sizes on the GPU in hand; write the table moeserve reads.

For each layer shape and each M, every config of the search space is checked once against the
torch backend (a config that computes a different function is dropped, not timed) and timed;
the fastest per M goes into kernels/configs/<GPU name>.json (merged with what is there), the
table `moeserve.kernels.configs.get_moe_config` looks up at run time.

Search space: BLOCK_M 16-128, BLOCK_N 32-256, BLOCK_K 32-256, GROUP_M 1-16, 4 or 8 warps, 2-5
stages, pruned where BLOCK_M is far above the tokens one slot can get. --smoke searches two
configs of a tiny shape (on the CPU, in Triton's interpreter) and writes to --out: it keeps the
script working in `make test`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

from moeserve.bench.kernel_timing import SHAPES, add_shape_args, parse_shape_args, routed_inputs, time_ms
from moeserve.bench.throughput import machine

SMEM_BYTES = 200 * 1024  # of the H100's 227 KiB per block, leaving room for the epilogue
FULL_M = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


def search_space(m: int, top_k: int, num_experts: int, smoke: bool):
    from moeserve.kernels.configs import MoEKernelConfig

    if smoke:
        yield MoEKernelConfig(16, 32, 32)
        yield MoEKernelConfig(16, 64, 64)
        return
    rows_per_slot = max(1, m * top_k // num_experts)
    for bm, bn, bk, gm, warps, stages in itertools.product(
        (16, 32, 64, 128), (32, 64, 128, 256), (32, 64, 128, 256), (1, 8, 16), (4, 8), (2, 3, 4, 5)
    ):
        if bm > 16 and bm > 4 * rows_per_slot:
            continue  # mostly padding
        if stages * 2 * (bm * bk + 2 * bk * bn) > SMEM_BYTES:
            continue  # pipelined bf16 tiles (x, gate and up weights) beyond shared memory
        yield MoEKernelConfig(bm, bn, bk, gm, warps, stages)


def tune_shape(shape_name: str, ms: tuple[int, ...], dtype: torch.dtype, device: str, smoke: bool) -> dict:
    from moeserve.kernels.fused_moe import fused_experts
    from moeserve.model.moe.experts import TorchExpertBackend

    shape = SHAPES[shape_name]
    best: dict[str, dict] = {}
    for m in ms:
        x, slots, weights, w13, w2 = routed_inputs(shape, m, dtype, device, seed=m)
        reference = TorchExpertBackend()(x, slots, weights, w13, w2).float()
        scale = reference.abs().max().item()
        timings = []
        for cfg in search_space(m, shape.top_k, shape.num_experts, smoke):
            try:
                out = fused_experts(x, slots, weights, w13, w2, config=cfg).float()
            except Exception as e:  # out of shared memory / registers on this GPU: not a candidate
                print(f"  M={m} {cfg}: {type(e).__name__}", file=sys.stderr)
                continue
            # Same function as torch up to half-precision rounding (a wrong block is off by O(scale)).
            if (out - reference).abs().max().item() > 0.05 * scale:
                print(f"  M={m} {cfg}: wrong result, dropped", file=sys.stderr)
                continue
            t = time_ms(lambda c=cfg: fused_experts(x, slots, weights, w13, w2, config=c), device, cpu_reps=1)
            timings.append((t, cfg))
        if not timings:
            raise RuntimeError(f"no config ran for {shape_name} at M={m}")
        t, cfg = min(timings, key=lambda tc: tc[0])
        best[str(m)] = cfg.to_json()
        print(f"{shape_name} M={m}: {t:.3f} ms with {cfg} ({len(timings)} configs timed)", flush=True)
        del x, slots, weights, w13, w2
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(p, FULL_M)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--out", type=Path, help="table to write (default: kernels/configs/<GPU name>.json)")
    args = p.parse_args(argv)
    from moeserve.kernels.configs import device_file, shape_key

    device, shapes, ms = parse_shape_args(p, args, smoke_m=(1, 8))
    dtype = getattr(torch, args.dtype)
    name = machine().get("gpu", "cpu-interpreter")
    out = args.out or device_file(name)
    table = json.loads(out.read_text()) if out.exists() else {"device": name, "shapes": {}}
    for s in shapes:
        shape = SHAPES[s]
        key = shape_key(shape.num_experts, shape.intermediate, shape.hidden, dtype)
        table["shapes"][key] = tune_shape(s, ms, dtype, device, args.smoke)
    table["machine"] = machine()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(table, indent=2) + "\n")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
