"""Rounding helpers shared by the kernels.

Triton's interpreter converts fp32 to bf16 by truncation (toward zero), while a GPU rounds to
nearest even, as torch does. Kernels that round intermediates to the activation dtype (to follow
the torch path's rounding step by step) call `round_to`, which with EMULATE_BF16 set (the
launcher sets it when interpreting and the dtype is bf16) rounds to nearest even by bit
arithmetic first, so the interpreter computes what the GPU computes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeserve.kernels import interpreting


@triton.jit
def round_to(x, out_ty: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """fp32 x -> fp32 values exactly representable in out_ty (round to nearest even)."""
    if EMULATE_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(out_ty).to(tl.float32)


def emulate_bf16(dtype: torch.dtype) -> bool:
    return interpreting() and dtype == torch.bfloat16
