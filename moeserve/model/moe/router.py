"""Router: gate logits -> scores -> top-K ids and weights, with K a runtime tensor.

Shape legend: T tokens, E logical experts, K = the model's experts per token (K_max).

The top-K is always taken at K_max and choices at positions >= k (the K in force for the token
in this layer) are masked: their id becomes E ("no expert", dropped by dispatch and load
accounting) and their weight 0. k is a device tensor, one value per token ([T], or a 0-dim one
for every token), so lowering K, for a layer or for some requests, needs no host sync, no
reload and no new CUDA graph. Running at k < K_max computes exactly what the checkpoint would compute with
num_experts_per_tok = k: renormalising families (Mixtral; Qwen/OLMoE/DeepSeek-V3 with
norm_topk_prob) renormalise over the k kept experts, so at k = 1 the top expert gets weight 1.0
(times routed_scaling_factor); GPT-OSS softmaxes the k kept logits (1.0 at k = 1); the others
keep the top expert's raw score (softmax probability, times DeepSeek-V2's scaling factor).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moeserve.model_config import RouterConfig

DEFAULT_ROUTER = RouterConfig()


@dataclass(frozen=True)
class Routing:
    """Router output for one MoE layer and one step. Inactive choices have id E and weight 0."""

    expert_ids: torch.Tensor  # [T, K] int64 in [0, E]
    weights: torch.Tensor  # [T, K] fp32 (Mixtral, DeepSeek) or model dtype
    logits: torch.Tensor  # [T, E] model dtype (fp32 for DeepSeek)


def select_experts_torch(
    logits: torch.Tensor, top_k: int, k: torch.Tensor, renormalize: bool,
    spec: RouterConfig = DEFAULT_ROUTER, correction_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E], k [T] or [] -> (weights [T, K] fp32, ids [T, K] int64 in [0, E]); the
    reference that the fused router kernel (moeserve.kernels.router) is tested against.

    Scores (fp32): softmax, or sigmoid; `correction_bias` [E] is added to them for the choice
    only; with group selection every expert outside the `topk_group` best groups is excluded.
    The top-K by choice score are taken in descending order; a choice's weight is its
    uncorrected score; positions >= k are inactive (weight 0, id E); then renormalisation and
    routed_scaling_factor. topk_softmax (GPT-OSS) takes the top-K logits and softmaxes the
    active ones, so at k it equals a checkpoint saved with num_experts_per_tok = k.

    Exactly equal scores are left to torch.topk, as transformers does: bf16 logits that round
    together are real ties, and following topk keeps this path bit-identical to transformers on
    the same device. The kernel breaks ties by the lowest expert id instead (topk's own order is
    unspecified and differs between CPU and CUDA); the weights are the same either way, only
    which of the tied experts is chosen can differ."""
    T, E = logits.shape
    active = torch.arange(top_k, device=logits.device) < k.reshape(-1, 1)  # [T, K] or [1, K]
    if spec.scoring == "topk_softmax":
        top_logits, top_ids = torch.topk(logits, top_k, dim=-1)  # [T, K] x2
        top_w = torch.softmax(top_logits.float().masked_fill(~active, float("-inf")), dim=-1)
        return top_w * spec.routed_scaling_factor, torch.where(active, top_ids, E)
    if spec.scoring == "sigmoid":
        scores = torch.sigmoid(logits.float())  # [T, E]
    else:
        scores = torch.softmax(logits, dim=-1, dtype=torch.float32)  # [T, E]
    choice = scores if correction_bias is None else scores + correction_bias
    if spec.group_select != "none":
        groups = choice.view(T, spec.n_group, E // spec.n_group)  # [T, n_group, E / n_group]
        if spec.group_select == "group_max":
            group_scores = groups.max(dim=-1).values  # [T, n_group]
        else:
            group_scores = groups.topk(2, dim=-1).values.sum(dim=-1)  # [T, n_group]
        kept = torch.zeros_like(group_scores, dtype=torch.bool)  # [T, n_group]
        kept.scatter_(1, torch.topk(group_scores, spec.topk_group, dim=-1).indices, True)
        choice = choice.masked_fill(~kept.repeat_interleave(E // spec.n_group, dim=1), float("-inf"))  # [T, E]
    if choice is scores:
        top_w, top_ids = torch.topk(scores, top_k, dim=-1)  # [T, K] x2
    else:
        top_ids = torch.topk(choice, top_k, dim=-1).indices  # [T, K]
        top_w = scores.gather(1, top_ids)  # [T, K]
    top_w = top_w * active
    if renormalize:
        denominator = top_w.sum(dim=-1, keepdim=True)
        top_w = top_w / (denominator + 1e-20 if spec.scoring == "sigmoid" else denominator)
    if spec.routed_scaling_factor != 1.0:
        top_w = top_w * spec.routed_scaling_factor
    return top_w, torch.where(active, top_ids, E)


# (logits [T, E], top_k, k [T] or [], renormalize, spec, correction_bias [E] | None) -> (weights, ids) [T, K]
SelectExperts = Callable[..., tuple[torch.Tensor, torch.Tensor]]


class Router(nn.Module):
    """Gate logits x W^T (+ bias; in fp32 when the family computes them so) -> `select` (the
    expert backend's, torch or a fused kernel) does everything after the logits. DeepSeek-V3's
    e_score_correction_bias [E] is kept in fp32 whatever the model dtype."""

    keep_fp32_params = ("e_score_correction_bias",)

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        renormalize: bool,
        weights_fp32: bool,
        select: SelectExperts = select_experts_torch,
        spec: RouterConfig = DEFAULT_ROUTER,
    ):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size), requires_grad=False)  # [E, D]
        self.bias = nn.Parameter(torch.empty(num_experts), requires_grad=False) if spec.bias else None  # [E]
        self.e_score_correction_bias = None
        if spec.correction_bias:
            self.e_score_correction_bias = nn.Parameter(torch.empty(num_experts), requires_grad=False)  # [E]
        self.num_experts = num_experts
        self.top_k = top_k
        self.renormalize = renormalize
        self.weights_fp32 = weights_fp32
        self.select = select
        self.spec = spec

    def forward(self, x: torch.Tensor, k: torch.Tensor) -> Routing:
        if self.spec.logits_fp32:
            logits = F.linear(x.float(), self.weight.float())  # [T, E] fp32
        else:
            logits = F.linear(x, self.weight, self.bias)  # [T, E]
        top_w, top_ids = self.select(logits, self.top_k, k, self.renormalize, self.spec,
                                     self.e_score_correction_bias)  # [T, K] x2
        if not self.weights_fp32:
            top_w = top_w.to(x.dtype)
        return Routing(expert_ids=top_ids, weights=top_w, logits=logits)
