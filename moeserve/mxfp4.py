"""MXFP4 (OCP Microscaling, FP4 E2M1 elements with one E8M0 scale per 32) as GPT-OSS stores it.

On disk, a weight W [..., rows, cols] lies as
    `*_blocks` [..., rows, cols / 32, 16] uint8: two 4-bit codes per byte, the even column in
               the low nibble, the odd one in the high nibble;
    `*_scales` [..., rows, cols / 32] uint8: the block's power of two, biased by 127.
A code is sign (bit 3) and an E2M1 magnitude (bits 0-2), one of FP4_VALUES; the element is
FP4_VALUES[code] * 2 ** (scale - 127). moeserve dequantises at load into the model dtype (exact
for bf16 and fp32: every MXFP4 value is representable in both) and computes in that dtype; the
weights are not kept quantised on any device.
"""

from __future__ import annotations

import torch

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BLOCK = 32
SCALE_BIAS = 127


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """blocks [..., rows, G, 16] uint8, scales [..., rows, G] uint8 -> W [..., rows, G * 32] in `dtype`."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != BLOCK // 2:
        raise ValueError(f"MXFP4 blocks {list(blocks.shape)} do not match scales {list(scales.shape)} "
                         f"(expected blocks = scales + [{BLOCK // 2}])")
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).to(torch.int64)  # [..., rows, G, 16, 2]
    values = lut[codes].flatten(-2)  # [..., rows, G, 32]
    exponent = scales.to(torch.int32) - SCALE_BIAS  # [..., rows, G]
    return torch.ldexp(values, exponent[..., None].float()).flatten(-2).to(dtype)  # [..., rows, G * 32]
