"""Expert compute behind one small interface, so Triton / grouped_mm backends drop in.

Shape legend: T tokens, K experts per token, P physical slots, D hidden size, I expert
intermediate size. w13 [P, 2I, D] stacks gate (rows :I) over up (rows I:); w2 [P, D, I].
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
import torch.nn.functional as F


class ExpertBackend(ABC):
    """out[t] = sum_k weights[t, k] * down_s(silu(gate_s(x[t])) * up_s(x[t])), s = slots[t, k].

    Invariants every backend keeps: slot P means "no expert" and contributes nothing; each
    expert's output is multiplied by its routing weight in the weight's dtype (fp32 for Mixtral)
    and cast to x's dtype when accumulated; the result has x's shape and dtype.
    """

    name: ClassVar[str]

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


_BACKENDS: dict[str, type[ExpertBackend]] = {TorchExpertBackend.name: TorchExpertBackend}


def register_expert_backend(cls: type[ExpertBackend]) -> type[ExpertBackend]:
    _BACKENDS[cls.name] = cls
    return cls


def get_expert_backend(name: str) -> ExpertBackend:
    if name not in _BACKENDS:
        raise ValueError(f"unknown expert backend {name!r}; available: {', '.join(sorted(_BACKENDS))}")
    return _BACKENDS[name]()
