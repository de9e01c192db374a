"""Router: gate logits -> scores -> top-K ids and weights, with K a runtime tensor.

Shape legend: T tokens, E logical experts, K = the model's experts per token (K_max).

The top-K is always taken at K_max and choices at positions >= k (the K in force for the token
in this layer) are masked: their id becomes E ("no expert", dropped by dispatch and load
accounting) and their weight 0. k is a device tensor, one value per token ([T], or a 0-dim one
for every token), so lowering K, for a layer or for some requests, needs no host sync, no
reload and no new CUDA graph. Running at k < K_max computes exactly what the checkpoint would compute with
num_experts_per_tok = k: renormalising families (Mixtral; Qwen/OLMoE with norm_topk_prob)
renormalise over the k kept experts, so at k = 1 the top expert gets weight 1.0; the others keep
the top expert's raw softmax probability.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Routing:
    """Router output for one MoE layer and one step. Inactive choices have id E and weight 0."""

    expert_ids: torch.Tensor  # [T, K] int64 in [0, E]
    weights: torch.Tensor  # [T, K] fp32 (Mixtral) or model dtype
    logits: torch.Tensor  # [T, E] model dtype


def select_experts_torch(
    logits: torch.Tensor, top_k: int, k: torch.Tensor, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E], k [T] or [] -> (weights [T, K] fp32, ids [T, K] int64 in [0, E]); the
    reference that the fused router kernel (moeserve.kernels.router) is tested against.

    Exactly equal scores are left to torch.topk, as transformers does: bf16 logits that round
    together are real ties, and following topk keeps this path bit-identical to transformers on
    the same device. The kernel breaks ties by the lowest expert id instead (topk's own order is
    unspecified and differs between CPU and CUDA); the weights are the same either way, only
    which of the tied experts is chosen can differ."""
    E = logits.shape[-1]
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)  # [T, E]
    top_w, top_ids = torch.topk(probs, top_k, dim=-1)  # [T, K] x2
    active = torch.arange(top_k, device=logits.device) < k.reshape(-1, 1)  # [T, K] or [1, K]
    top_w = top_w * active
    if renormalize:
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
    return top_w, torch.where(active, top_ids, E)


SelectExperts = Callable[[torch.Tensor, int, torch.Tensor, bool], tuple[torch.Tensor, torch.Tensor]]


class Router(nn.Module):
    """softmax(x W^T) in fp32 -> top-K. The gate matmul runs in the model dtype; `select` (the
    expert backend's, torch or a fused kernel) does everything after the logits."""

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        renormalize: bool,
        weights_fp32: bool,
        select: SelectExperts = select_experts_torch,
    ):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size), requires_grad=False)  # [E, D]
        self.num_experts = num_experts
        self.top_k = top_k
        self.renormalize = renormalize
        self.weights_fp32 = weights_fp32
        self.select = select

    def forward(self, x: torch.Tensor, k: torch.Tensor) -> Routing:
        logits = F.linear(x, self.weight)  # [T, E]
        top_w, top_ids = self.select(logits, self.top_k, k, self.renormalize)  # [T, K] x2
        if not self.weights_fp32:
            top_w = top_w.to(logits.dtype)
        return Routing(expert_ids=top_ids, weights=top_w, logits=logits)
