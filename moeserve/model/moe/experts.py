"""Expert compute behind one small interface: torch (reference, CPU), triton, grouped_mm.

Shape legend: T tokens, K experts per token, P physical slots, D hidden size, I expert
intermediate size. w13 [P, 2I, D] stacks gate (rows :I) over up (rows I:); w2 [P, D, I].
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F

from moeserve.model import cpu_gemm
from moeserve.model.moe.router import select_experts_torch
from moeserve.model_config import ExpertActivation, RouterConfig

SILU = ExpertActivation()


def activate(gate: torch.Tensor, up: torch.Tensor, act: ExpertActivation) -> torch.Tensor:
    """[n, I] x2 -> [n, I]: silu(gate) * up, or GPT-OSS's clamped SwiGLU."""
    if act.kind == "silu":
        return F.silu(gate) * up
    gate = gate.clamp(max=act.limit)
    up = up.clamp(min=-act.limit, max=act.limit)
    return (up + 1) * (gate * torch.sigmoid(gate * act.alpha))


class ExpertBackend(ABC):
    """out[t] = sum_k weights[t, k] * down_s(act(gate_s(x[t]), up_s(x[t]))), s = slots[t, k],
    where gate/up/down are affine when the optional biases b13 [P, 2I] / b2 [P, D] are given and
    act is silu(gate) * up unless an ExpertActivation says otherwise.

    Invariants every backend keeps: slot P means "no expert" and contributes nothing; each
    expert's output is multiplied by its routing weight in the weight's dtype (fp32 for Mixtral)
    and cast to x's dtype when accumulated; the result has x's shape and dtype.

    `packed`, when given, holds per slot oneDNN-packed copies (w13[s], w2[s]) of the same
    weights (model/cpu_gemm.py); a backend that cannot use them reads w13/w2.
    """

    name: ClassVar[str]

    def select_experts(self, logits: torch.Tensor, top_k: int, k: torch.Tensor, renormalize: bool,
                       spec: RouterConfig | None = None, correction_bias: torch.Tensor | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """The router's step after the logits (see router.select_experts_torch for the contract)."""
        if spec is None:
            return select_experts_torch(logits, top_k, k, renormalize)
        return select_experts_torch(logits, top_k, k, renormalize, spec, correction_bias)

    def supports(self, act: ExpertActivation, biases: bool) -> bool:
        """Whether this backend computes experts with this activation (and biases)."""
        return True

    @abstractmethod
    def __call__(
        self,
        x: torch.Tensor,
        slots: torch.Tensor,
        weights: torch.Tensor,
        w13: torch.Tensor,
        w2: torch.Tensor,
        act: ExpertActivation = SILU,
        b13: torch.Tensor | None = None,
        b2: torch.Tensor | None = None,
        packed: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor: ...


class TorchExpertBackend(ExpertBackend):
    """Reference and CPU path: sort token-slots by slot, gather their rows once, one pair of
    matmuls per non-empty slot on its contiguous run of rows (with the packed weights when
    given), then the weighted rows added back slot by slot. On the CPU with packed weights this
    beats grouped_mm and a padded bmm at every batch size bench/throughput.py times
    (`expert_paths`)."""

    name = "torch"

    def __call__(self, x, slots, weights, w13, w2, act=SILU, b13=None, b2=None, packed=None):
        P, K = w13.shape[0], slots.shape[1]
        flat = slots.reshape(-1)  # [T*K]
        order = torch.argsort(flat, stable=True)  # [T*K] token-slots grouped by slot, P last
        counts = torch.bincount(flat, minlength=P + 1)[:P].tolist()
        active = sum(counts)
        order = order[:active]  # [n_active]
        tokens = order // K  # [n_active]
        xs = x[tokens]  # [n_active, D]
        ys = x.new_empty(active, w2.shape[1])  # [n_active, D]
        start = 0
        for slot, n in enumerate(counts):
            if n == 0:
                continue
            rows = xs[start : start + n]  # [n, D]
            if packed is None:
                h = F.linear(rows, w13[slot])  # [n, 2I]
            else:
                h = cpu_gemm.packed_linear(rows, packed[slot][0])
            if b13 is not None:  # added after the product is rounded, as transformers' GPT-OSS does
                h = h + b13[slot]
            gate, up = h.chunk(2, dim=-1)  # [n, I] x2
            if packed is None:
                y = F.linear(activate(gate, up, act), w2[slot])  # [n, D]
            else:
                y = cpu_gemm.packed_linear(activate(gate, up, act), packed[slot][1])
            if b2 is not None:
                y = y + b2[slot]
            ys[start : start + n] = y
            start += n
        ys = (ys * weights.reshape(-1)[order, None]).to(x.dtype)  # [n_active, D]
        out = torch.zeros_like(x)  # [T, D]
        if x.dtype.itemsize >= 4 and x.device.type == "cpu":
            # On the CPU one index_add_ adds each token's rows in the order they come, slot by
            # slot: the same sums as a call per slot (on CUDA repeated indices go to atomics, in
            # no fixed order, so each call there keeps a token's rows apart).
            return out.index_add_(0, tokens, ys)
        # bf16/fp16: slot by slot, rounding after each, as transformers does (one index_add_
        # over all rows would sum a token's experts in fp32 before rounding, off by an ulp).
        # Within one slot a token appears once, so no index repeats within a call.
        start = 0
        for n in counts:
            if n:
                out.index_add_(0, tokens[start : start + n], ys[start : start + n])
                start += n
        return out


class TritonExpertBackend(ExpertBackend):
    """moeserve.kernels: device-side alignment, fused gate_up+SiLU·mul and down+weight grouped
    GEMMs, fused top-K router. Runs on CUDA, or on the CPU under TRITON_INTERPRET=1 (tests)."""

    name = "triton"

    def __init__(self):
        from moeserve.kernels.fused_moe import fused_experts
        from moeserve.kernels.router import fused_topk

        self._experts, self._topk = fused_experts, fused_topk

    def select_experts(self, logits, top_k, k, renormalize, spec=None, correction_bias=None):
        return self._topk(logits, top_k, k, renormalize, spec=spec, correction_bias=correction_bias)

    def supports(self, act, biases):
        return act.kind == "silu" and not biases

    def __call__(self, x, slots, weights, w13, w2, act=SILU, b13=None, b2=None, packed=None):
        if not self.supports(act, b13 is not None):
            raise ValueError("the triton moe kernels compute silu experts without biases; use --moe-backend torch")
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

    def __call__(self, x, slots, weights, w13, w2, act=SILU, b13=None, b2=None, packed=None):
        T, K = slots.shape
        P, D = w13.shape[0], x.shape[1]
        flat = slots.reshape(-1)  # [T*K]
        order = torch.argsort(flat, stable=True)  # [T*K] grouped by slot, P last
        counts = torch.zeros(P + 1, dtype=torch.int64, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
        offs = torch.cumsum(counts[:P], 0).to(torch.int32)  # [P] end of each slot's rows
        xs = x[order // K]  # [T*K, D]
        row_slot = flat[order].clamp(max=P - 1)  # [T*K] (inactive rows are masked below)
        h = self._grouped_mm(xs, w13.transpose(1, 2), offs=offs)  # [T*K, 2I]
        if b13 is not None:
            h = h + b13[row_slot]
        gate, up = h.chunk(2, dim=-1)  # [T*K, I] x2
        y = self._grouped_mm(activate(gate, up, act), w2.transpose(1, 2), offs=offs)  # [T*K, D]
        if b2 is not None:
            y = y + b2[row_slot]
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


def default_expert_backend(device: torch.device | str, act: ExpertActivation = SILU, biases: bool = False) -> str:
    """triton on CUDA when triton is installed and its kernels compute these experts (silu, no
    biases), torch otherwise (the CPU path, and GPT-OSS's experts)."""
    from moeserve.kernels import triton_usable

    kernels = act.kind == "silu" and not biases
    return "triton" if kernels and str(device).startswith("cuda") and triton_usable(device) else "torch"


def get_expert_backend(name: str) -> ExpertBackend:
    if name not in _BACKENDS:
        raise ValueError(f"unknown expert backend {name!r}; available: {', '.join(sorted(_BACKENDS))}")
    try:
        return _BACKENDS[name]()
    except ImportError as e:
        raise ValueError(f"expert backend {name!r} needs {e.name}: pip install 'moeserve[gpu]'") from e
