"""Expert compute behind one small interface: torch (reference, CPU), triton, grouped_mm.

Shape legend: T tokens, K experts per token, P physical slots, D hidden size, I expert
intermediate size. w13 [P, 2I, D] stacks gate (rows :I) over up (rows I:); w2 [P, D, I].
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
import torch.nn.functional as F

from moeserve.model.moe.router import select_experts_torch


class ExpertBackend(ABC):
    """out[t] = sum_k weights[t, k] * down_s(silu(gate_s(x[t])) * up_s(x[t])), s = slots[t, k].

    Invariants every backend keeps: slot P means "no expert" and contributes nothing; each
    expert's output is multiplied by its routing weight in the weight's dtype (fp32 for Mixtral)
    and cast to x's dtype when accumulated; the result has x's shape and dtype.
    """

    name: ClassVar[str]

    def select_experts(
        self, logits: torch.Tensor, top_k: int, k: torch.Tensor, renormalize: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The router's step after the logits (see router.select_experts_torch for the contract)."""
        return select_experts_torch(logits, top_k, k, renormalize)

    @abstractmethod
    def __call__(
        self,
        x: torch.Tensor,
        slots: torch.Tensor,
        weights: torch.Tensor,
        w13: torch.Tensor,
        w2: torch.Tensor,
    ) -> torch.Tensor: ...


class TorchExpertBackend(ExpertBackend):
    """Reference and CPU path: sort token-slots by slot, one pair of matmuls per non-empty slot."""

    name = "torch"

    def __call__(self, x, slots, weights, w13, w2):
        P, K = w13.shape[0], slots.shape[1]
        flat = slots.reshape(-1)  # [T*K]
        order = torch.argsort(flat, stable=True)  # [T*K] token-slots grouped by slot, P last
        counts = torch.bincount(flat, minlength=P + 1)[:P].tolist()
        flat_weights = weights.reshape(-1)  # [T*K]
        out = torch.zeros_like(x)  # [T, D]
        start = 0
        for slot, n in enumerate(counts):
            if n == 0:
                continue
            pick = order[start : start + n]  # [n]
            start += n
            tokens = pick // K  # [n]
            gate, up = F.linear(x[tokens], w13[slot]).chunk(2, dim=-1)  # [n, I] x2
            y = F.linear(F.silu(gate) * up, w2[slot])  # [n, D]
            y = y * flat_weights[pick, None]
            out.index_add_(0, tokens, y.to(out.dtype))
        return out


class TritonExpertBackend(ExpertBackend):
    """moeserve.kernels: device-side alignment, fused gate_up+SiLU·mul and down+weight grouped
    GEMMs, fused top-K router. Runs on CUDA, or on the CPU under TRITON_INTERPRET=1 (tests)."""

    name = "triton"

    def __init__(self):
        from moeserve.kernels.fused_moe import fused_experts
        from moeserve.kernels.router import fused_topk

        self._experts, self._topk = fused_experts, fused_topk

    def select_experts(self, logits, top_k, k, renormalize):
        return self._topk(logits, top_k, k, renormalize)

    def __call__(self, x, slots, weights, w13, w2):
        return self._experts(x, slots, weights, w13, w2)


class GroupedMMExpertBackend(ExpertBackend):
    """torch's grouped GEMM (F.grouped_mm / torch._grouped_mm: CUTLASS on sm90, a loop on CPU).

    Token-slots are sorted by slot with device ops only; rows of inactive choices sort last, past
    the final group offset, and are masked out before the combine.
    """

    name = "grouped_mm"

    def __init__(self):
        self._grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
        if self._grouped_mm is None:
            raise ValueError(f"this torch ({torch.__version__}) has no grouped_mm; use --moe-backend torch or triton")

    def __call__(self, x, slots, weights, w13, w2):
        T, K = slots.shape
        P, D = w13.shape[0], x.shape[1]
        flat = slots.reshape(-1)  # [T*K]
        order = torch.argsort(flat, stable=True)  # [T*K] grouped by slot, P last
        counts = torch.zeros(P + 1, dtype=torch.int64, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
        offs = torch.cumsum(counts[:P], 0).to(torch.int32)  # [P] end of each slot's rows
        xs = x[order // K]  # [T*K, D]
        gate, up = self._grouped_mm(xs, w13.transpose(1, 2), offs=offs).chunk(2, dim=-1)  # [T*K, I] x2
        y = self._grouped_mm(F.silu(gate) * up, w2.transpose(1, 2), offs=offs)  # [T*K, D]
        y = (y * weights.reshape(-1)[order, None]).to(x.dtype)
        y = torch.where((flat[order] < P)[:, None], y, 0)  # rows past offs[-1] are undefined
        out = torch.zeros(T * K, D, dtype=x.dtype, device=x.device).index_copy_(0, order, y)  # [T*K, D]
        return out.view(T, K, D).sum(dim=1)


_BACKENDS: dict[str, type[ExpertBackend]] = {
    cls.name: cls for cls in (TorchExpertBackend, TritonExpertBackend, GroupedMMExpertBackend)
}
EXPERT_BACKENDS = tuple(_BACKENDS)


def register_expert_backend(cls: type[ExpertBackend]) -> type[ExpertBackend]:
    _BACKENDS[cls.name] = cls
    return cls


def default_expert_backend(device: torch.device | str) -> str:
    """triton on CUDA when triton is installed, torch otherwise (the CPU path)."""
    from moeserve.kernels import triton_usable

    return "triton" if str(device).startswith("cuda") and triton_usable(device) else "torch"


def get_expert_backend(name: str) -> ExpertBackend:
    if name not in _BACKENDS:
        raise ValueError(f"unknown expert backend {name!r}; available: {', '.join(sorted(_BACKENDS))}")
    try:
        return _BACKENDS[name]()
    except ImportError as e:
        raise ValueError(f"expert backend {name!r} needs {e.name}: pip install 'moeserve[gpu]'") from e
