"""Shared by the kernel benchmarks: MoE layer shapes, random routed inputs, timing, ceilings.

Shape legend (shared/DESIGN.md); M = T tokens in the batch.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

# Without a GPU the Triton kernels can only run in the interpreter; set before they are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@dataclass(frozen=True)
class MoEShape:
    name: str
    num_experts: int  # E (= P: no spare slots in the benchmark)
    hidden: int  # D
    intermediate: int  # I
    top_k: int  # K
    renormalize: bool

    def flops(self, m: int) -> float:
        """Two GEMMs per token-slot: [D] x [D, 2I] and [I] x [I, D]."""
        return 2.0 * m * self.top_k * (2 * self.intermediate * self.hidden + self.intermediate * self.hidden)

    def min_bytes(self, slots: torch.Tensor, dtype: torch.dtype) -> int:
        """Weights of every slot the batch touches, read once, plus x read and out written."""
        touched = int(torch.unique(slots[slots < self.num_experts]).numel())
        esize = torch.finfo(dtype).bits // 8
        m = slots.shape[0]
        return esize * (touched * 3 * self.intermediate * self.hidden + 2 * m * self.hidden)


SHAPES = {
    "mixtral-8x7b": MoEShape("mixtral-8x7b", 8, 4096, 14336, 2, True),
    "qwen3-30b-a3b": MoEShape("qwen3-30b-a3b", 128, 2048, 768, 8, True),
    "tiny": MoEShape("tiny", 4, 64, 64, 2, True),
}


def routed_inputs(shape: MoEShape, m: int, dtype: torch.dtype, device: str, seed: int = 0):
    """x [M, D], slots [M, K], weights [M, K] fp32 (softmax top-K of random logits), w13, w2."""
    from moeserve.model.moe.router import select_experts_torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    E, D, I = shape.num_experts, shape.hidden, shape.intermediate
    x = torch.randn(m, D, generator=g).to(device=device, dtype=dtype)
    logits = torch.randn(m, E, generator=g).to(device)
    weights, slots = select_experts_torch(logits, shape.top_k, torch.tensor(shape.top_k, device=device),
                                          shape.renormalize)
    w13 = torch.empty(E, 2 * I, D, dtype=dtype, device=device).normal_(std=D**-0.5)
    w2 = torch.empty(E, D, I, dtype=dtype, device=device).normal_(std=I**-0.5)
    return x, slots, weights, w13, w2


def time_ms(fn: Callable[[], object], device: str, cpu_reps: int = 3) -> float:
    """Median milliseconds of fn(): CUDA events via triton.testing.do_bench on a GPU (warm-up
    excluded), a host clock around a few runs on the CPU."""
    if device.startswith("cuda"):
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))
    fn()
    samples = []
    for _ in range(cpu_reps):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def copy_bandwidth_gbs(device: str, nbytes: int) -> float:
    """Device-to-device copy, bytes read plus bytes written per second (the bandwidth ceiling)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    return 2 * nbytes / ms / 1e6


def matmul_tflops(device: str, n: int, dtype: torch.dtype) -> float:
    """One large square product through torch (the arithmetic ceiling)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    ms = time_ms(lambda: a @ b, device)
    return 2 * n**3 / ms / 1e9


def add_shape_args(p: argparse.ArgumentParser, default_m: tuple[int, ...]) -> None:
    p.add_argument("--shapes", default="mixtral-8x7b,qwen3-30b-a3b", help=f"comma list of {', '.join(SHAPES)}")
    p.add_argument("--m", default=",".join(map(str, default_m)), help="comma list of token counts")
    p.add_argument("--smoke", action="store_true", help="the tiny shape only (CPU: Triton interpreter), for make test")


def parse_shape_args(p: argparse.ArgumentParser, args: argparse.Namespace,
                     smoke_m: tuple[int, ...]) -> tuple[str, list[str], tuple[int, ...]]:
    """-> (device, shape names, Ms); exits with a usage error on bad values or a full run
    without a GPU (its numbers would be the interpreter's)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = [s for s in args.shapes.split(",") if s]
    try:
        ms = tuple(int(v) for v in args.m.split(","))
    except ValueError:
        p.error("--m must be a comma list of integers")
    if args.smoke:
        shapes, ms = ["tiny"], smoke_m
    if not shapes or any(s not in SHAPES for s in shapes) or any(m < 1 for m in ms):
        p.error(f"--shapes must name some of {', '.join(SHAPES)} and --m values be >= 1")
    if device == "cpu" and not args.smoke:
        p.error("this needs a CUDA GPU; use --smoke on the CPU")
    return device, shapes, ms
