"""Triton kernels (and one C++ CPU kernel), imported as `moeserve.kernels` (see pyproject's
package-dir mapping).

    moe_align        top-K slots -> token-slots grouped and padded per slot (device ops, no host sync)
    fused_moe        grouped GEMM for expert micro-batches (gate_up + SiLU·mul, down + routing weight)
    router           softmax/sigmoid + top-K + renormalisation in one pass
    paged_attention  split-KV decode and variable-length prefill over the paged KV cache
    configs          block sizes per shape: a tuned JSON table per GPU, a heuristic default
    cpu_attention    fp32 paged decode attention for the CPU in C++ (cpu_attention.cpp), built on first use

Each triton kernel has a torch counterpart it is tested against under TRITON_INTERPRET=1 on the
CPU; the C++ kernel is tested against the torch path it replaces (tests/test_cpu_attention.py).
Importing this package needs no triton; importing a triton kernel module does.
"""

from __future__ import annotations

import os


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1).

    The interpreter's tl.dot on bf16/fp16 tiles returns wrong values, so launchers cast tiles to
    fp32 inside the dot when this is true.
    """
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_usable(device: str | None = None) -> bool:
    """Whether the triton backends can run here: triton importable and a CUDA device, or the
    interpreter switched on (then tensors stay on the CPU)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    if interpreting():
        return True
    import torch

    return torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
