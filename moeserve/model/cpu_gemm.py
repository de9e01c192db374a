"""oneDNN-packed fp32 GEMMs for the CPU.

aten's fp32 linear on the CPU calls MKL's sgemm, which re-packs the weight on every call (and on
AMD CPUs takes a slow code path); oneDNN multiplies with a weight reordered once into its blocked
layout (bench/throughput.py records both rates at the step's shapes). A packed weight is derived
state: made after the weights are loaded, remade whenever the weight it copies changes (an
expert copied into a slot), never saved, and always kept next to the plain weight, which stays
the source of truth (checkpoints, replication, expert parallel sends read it). Results differ
from aten's in the last bits (summation order), which the equality rule of shared/DESIGN.md
absorbs; bf16/fp16 are never packed (aten already runs them on oneDNN, bit-identically to
transformers).

Shape legend: M rows, N output features, K input features.
"""

from __future__ import annotations

import torch

CPU_GEMMS = ("auto", "onednn", "aten")
# 'auto' packs a weight of at least this many elements: below it a oneDNN call's fixed cost (about
# 20 us on a 2-core AMD EPYC) outweighs the faster product at decode batch sizes.
MIN_PACKED_ELEMENTS = 256 * 256


def onednn_usable() -> bool:
    """Whether this torch can pack weights for oneDNN (CPU builds with mkldnn)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def resolve_cpu_gemm(name: str, device: torch.device | str, dtype: torch.dtype) -> str:
    """'auto' -> onednn for fp32 on the CPU when oneDNN is there (weights of MIN_PACKED_ELEMENTS
    or more), aten otherwise; 'onednn' (every weight) where it cannot run is a ValueError."""
    if name not in CPU_GEMMS:
        raise ValueError(f"unknown cpu gemm {name!r}; choose {', '.join(CPU_GEMMS)}")
    fits = torch.device(device).type == "cpu" and dtype == torch.float32 and onednn_usable()
    if name == "auto":
        return "onednn" if fits else "aten"
    if name == "onednn" and not fits:
        raise ValueError(f"--cpu-gemm onednn packs fp32 weights on the CPU with oneDNN; here the device is "
                         f"{device}, the dtype {dtype}, oneDNN {'present' if onednn_usable() else 'absent'}")
    return name


def pack(weight: torch.Tensor) -> torch.Tensor:
    """weight [N, K] fp32 on the CPU -> an opaque oneDNN tensor holding a copy in its blocked layout."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), None)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ packed^T (+ bias [N]) -> [..., N], as F.linear with the packed weight."""
    lead = x.shape[:-1]
    out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), packed, bias, "none", [], "")  # [M, N]
    return out.view(*lead, out.shape[-1])
