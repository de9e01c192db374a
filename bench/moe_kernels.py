"""MoE layer and paged-attention kernels: the Triton kernels against torch peers, same inputs.

MoE: Mixtral-8x7B (E 8, D 4096, I 14336, K 2) and Qwen3-30B-A3B (E 128, D 2048, I 768, K 8)
layers with random bf16 weights, at M = 1, 16, 64, 256, 1024, 4096 tokens routed by softmax
top-K of random logits, through three expert backends: `torch` (a Python loop over experts),
`grouped_mm` (torch's grouped GEMM, where this torch has it) and `triton` (moeserve.kernels).
Each reports the median time, TFLOP/s (6·M·K·I·D) and GB/s over the fewest bytes the layer must
move (weights of the experts it touches, x, out), and the triton ratios against both peers.

Attention: decode over the paged cache (Mixtral's 32 query / 8 KV heads of 128, block 16) at
batch 1-256 and context 512-8k: the Triton split-KV kernel against the torch path, time and
GB/s over the KV bytes read.

Ceilings measured in the same run: a 1 GiB device-to-device copy (bytes read + written) and an
8192³ bf16 product. Targets (H100, Mixtral): M <= 64 at >= 70% of the copy bandwidth, M = 4096 at
>= 450 TFLOP/s, triton >= 1.0x grouped_mm at M <= 256.

--smoke runs a tiny shape (on the CPU, the kernels in Triton's interpreter): it keeps this
script working in `make test`; its timings mean nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from moeserve.bench.kernel_timing import (
    SHAPES,
    add_shape_args,
    copy_bandwidth_gbs,
    matmul_tflops,
    parse_shape_args,
    routed_inputs,
    time_ms,
)
from moeserve.bench.throughput import machine

FULL_M = (1, 16, 64, 256, 1024, 4096)
FULL_ATTN = dict(batch=(1, 16, 64, 256), context=(512, 2048, 8192), heads=32, kv_heads=8, head_dim=128)
SMOKE_ATTN = dict(batch=(1, 2), context=(32,), heads=4, kv_heads=2, head_dim=32)


def bench_moe(shape_name: str, ms: tuple[int, ...], dtype: torch.dtype, device: str) -> list[dict]:
    from moeserve.model.moe.experts import EXPERT_BACKENDS, get_expert_backend

    shape = SHAPES[shape_name]
    backends = {}
    for name in EXPERT_BACKENDS:
        try:
            backends[name] = get_expert_backend(name)
        except ValueError:
            pass  # grouped_mm missing from this torch
    if device == "cuda" and dtype != torch.bfloat16:
        backends.pop("grouped_mm", None)  # torch's CUDA grouped GEMM takes bf16 only
    rows = []
    for m in ms:
        x, slots, weights, w13, w2 = routed_inputs(shape, m, dtype, device, seed=m)
        flops, nbytes = shape.flops(m), shape.min_bytes(slots, dtype)
        row = {"shape": shape_name, "M": m, "flops": flops, "min_bytes": nbytes, "backends": {}}
        for name, backend in backends.items():
            t = time_ms(lambda b=backend: b(x, slots, weights, w13, w2), device)
            row["backends"][name] = {"ms": t, "tflops": flops / t / 1e9, "gbs": nbytes / t / 1e6}
        b = row["backends"]
        if "triton" in b:
            row["triton_speedup_vs_loop"] = b["torch"]["ms"] / b["triton"]["ms"]
            if "grouped_mm" in b:
                row["triton_speedup_vs_grouped_mm"] = b["grouped_mm"]["ms"] / b["triton"]["ms"]
        rows.append(row)
        print(f"{shape_name:14s} M={m:5d} " + "  ".join(f"{n} {v['ms']:.3f} ms {v['tflops']:.1f} TF/s "
                                                      f"{v['gbs']:.0f} GB/s" for n, v in b.items()), flush=True)
        del x, slots, weights, w13, w2
    return rows


def bench_attention(spec: dict, dtype: torch.dtype, device: str, block_size: int = 16) -> list[dict]:
    from moeserve.kernels.paged_attention import paged_attention_triton
    from moeserve.model.attention import AttentionMetadata, paged_attention

    H, Hkv, Dh = spec["heads"], spec["kv_heads"], spec["head_dim"]
    esize = torch.finfo(dtype).bits // 8
    rows = []
    for S in spec["batch"]:
        for L in spec["context"]:
            nb = -(-L // block_size)
            perm = torch.randperm(S * nb)
            tables = perm.view(S, nb).tolist()
            meta = AttentionMetadata.build([1] * S, [L] * S, tables, block_size, device)
            key = torch.randn(S * nb, block_size, Hkv, Dh, device=device).to(dtype)
            value = torch.randn(S * nb, block_size, Hkv, Dh, device=device).to(dtype)
            q = torch.randn(S, H, Dh, device=device).to(dtype)
            kv_bytes = 2 * S * L * Hkv * Dh * esize
            row = {"batch": S, "context": L, "kv_bytes": kv_bytes, "backends": {}}
            for name, fn in (("torch", paged_attention), ("triton", paged_attention_triton)):
                t = time_ms(lambda f=fn: f(q, key, value, meta, Dh**-0.5, None), device)
                row["backends"][name] = {"ms": t, "gbs": kv_bytes / t / 1e6}
            row["triton_speedup_vs_torch"] = row["backends"]["torch"]["ms"] / row["backends"]["triton"]["ms"]
            rows.append(row)
            print(f"attention S={S:4d} L={L:5d} " + "  ".join(f"{n} {v['ms']:.3f} ms {v['gbs']:.0f} GB/s"
                                                             for n, v in row["backends"].items()), flush=True)
            del key, value
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(p, FULL_M)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--no-attention", dest="attention", action="store_false")
    p.add_argument("--out", type=Path, help="JSON to write (default: bench/results/moe_kernels-<device>.json)")
    args = p.parse_args(argv)
    device, shapes, ms = parse_shape_args(p, args, smoke_m=(1, 16))
    dtype = getattr(torch, args.dtype)

    ceilings = {
        "copy_gbs": copy_bandwidth_gbs(device, 1 << 30 if device == "cuda" else 1 << 22),
        "matmul_tflops": matmul_tflops(device, 8192 if device == "cuda" else 128, dtype),
    }
    moe = [row for s in shapes for row in bench_moe(s, ms, dtype, device)]
    for row in moe:
        row["triton_fraction_of_copy_bw"] = row["backends"]["triton"]["gbs"] / ceilings["copy_gbs"]
    attention = bench_attention(SMOKE_ATTN if args.smoke else FULL_ATTN, dtype, device) if args.attention else []
    name = machine().get("gpu", "cpu")
    result = {
        "benchmark": "moe_kernels",
        "machine": machine(),
        "device_name": name,
        "interpreter": device == "cpu",
        "dtype": args.dtype,
        "smoke": args.smoke,
        "ceilings": ceilings,
        "moe": moe,
        "attention": attention,
    }
    out = args.out or Path(__file__).parent / "results" / f"moe_kernels-{name.replace(' ', '_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"copy {ceilings['copy_gbs']:.0f} GB/s, matmul {ceilings['matmul_tflops']:.1f} TFLOP/s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
