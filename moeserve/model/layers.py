"""Small dense layers shared by every family: RMSNorm, rotary embedding, gated MLP.

Shape legend (shared/DESIGN.md): T tokens, D hidden size, I intermediate size, H heads, Dh head dim.
Each op follows transformers' numerics step for step (dtype casts included), since the model is
checked against it to 1e-4 in fp32 and on top-1 agreement in bf16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moeserve.model import cpu_gemm
from moeserve.model_config import RopeConfig


class Linear(nn.Linear):
    """nn.Linear that may also hold a oneDNN-packed copy of its weight (model/cpu_gemm.py),
    used instead of the weight once `pack()` made it. The copy is only as current as the last
    `pack()`: whoever changes the weight packs again."""

    packed: torch.Tensor | None = None

    def weight_elements(self) -> int:
        return self.weight.numel()

    def pack(self) -> None:
        self.packed = cpu_gemm.pack(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        return cpu_gemm.packed_linear(x, self.packed, self.bias)


class RMSNorm(nn.Module):
    """y = weight * (x / rms(x)).to(x.dtype): normalise in fp32, cast back, then scale. With
    `scale_fp32` (GPT-OSS) the multiply runs in fp32 and the product is cast."""

    def __init__(self, size: int, eps: float, scale_fp32: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.eps = eps
        self.scale_fp32 = scale_fp32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.scale_fp32:
            return (self.weight.float() * h).to(input_dtype)
        return self.weight * h.to(input_dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin for arbitrary positions, computed per step (no max-length table to allocate).

    The inverse frequencies stay fp32 whatever dtype the model is cast to (transformers keeps
    them fp32 too; bf16 frequencies shift every rotation), so they are not a module buffer that
    `.to(dtype)` would round: one fp32 copy per device, made on first use.
    """

    def __init__(self, rope: RopeConfig):
        super().__init__()
        inv_freq, self.attention_scaling = rope.inv_freq_and_scale()
        self._inv_freq = {inv_freq.device: inv_freq}  # device -> [Dh/2] fp32

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        device = positions.device
        if device not in self._inv_freq:
            self._inv_freq[device] = next(iter(self._inv_freq.values())).to(device)
        freqs = positions.float()[:, None] * self._inv_freq[device][None, :]  # [T, Dh/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, Dh]
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, Dh], cos/sin [T, Dh] -> [T, H, Dh] (the half-split 'neox' convention)."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    return x * cos + _rotate_half(x) * sin


def apply_rotary_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, Dr] rotated by pairs (x0, x1), (x2, x3), ... (DeepSeek); cos/sin [T, Dr] as
    RotaryEmbedding makes them (the angle of pair i at i and Dr/2 + i) -> [T, H, Dr] with the
    rotated pairs' first elements in the first half, second elements in the second. Keys and
    queries get the same permutation, so their dot products are those of the paired layout."""
    half = cos.shape[-1] // 2
    c, s = cos[:, None, :half], sin[:, None, :half]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with separate projections, as Hub dense MLPs store them."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # [T, D]
