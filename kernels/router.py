"""Router: scores + top-K + masking to the K in force + renormalisation, one pass over [T, E].

Shape legend (shared/DESIGN.md); K here is the model's K (K_max), k the K in force (<= K_max).

Per token row, in fp32:

    s = softmax(logits)  (or sigmoid(logits); or the logits themselves for topk_softmax)
    c = s (+ correction bias [E], DeepSeek-V3)                               the choice score
    group limit (DeepSeek): a group of E / n_group experts scores max(c) or the sum of its two
        largest c; all but the topk_group best groups are excluded (c = -inf)
    repeat K times: pick the largest remaining c (lowest expert id on a tie), remove it; its
        weight is its s
    choices at positions >= k: id E ("no expert"), weight 0
    topk_softmax: weights = softmax of the active picks' logits
    renormalise: weights /= sum(weights)   (when the family does)
    weights *= routed_scaling_factor

which is what moeserve.model.moe.router.select_experts_torch computes, except that on an exact
tie it follows torch.topk's (unspecified) order. The K choices stay in registers
([BLOCK_T, BLOCK_K]) until one store at the end.
k (one value per token) is read from device memory, so lowering K is no host sync and no
recompilation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def topk_router_kernel(
    # Pointers
    logits_ptr,  # [T, E]
    k_ptr,  # [T] int64, the K in force per token
    correction_ptr,  # [E] fp32 (CORRECTION)
    weights_ptr,  # [T, K] out
    ids_ptr,  # [T, K] int64 out
    # Dimensions and strides
    T,
    E,
    stride_lt,
    stride_le,
    group_size,  # E / N_GROUP
    scaling,  # routed_scaling_factor
    # Meta-parameters
    TOP_K: tl.constexpr,
    SCORING: tl.constexpr,  # 0 softmax, 1 sigmoid, 2 topk_softmax
    RENORMALIZE: tl.constexpr,
    CORRECTION: tl.constexpr,
    GROUP_SELECT: tl.constexpr,  # 0 none, 1 group max, 2 sum of the group's top two
    N_GROUP: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,  # >= TOP_K, power of two
    BLOCK_GR: tl.constexpr,  # >= N_GROUP, power of two
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    cols = tl.arange(0, BLOCK_E)  # [BE]
    row_mask = rows < T
    col_ok = cols < E
    mask = row_mask[:, None] & col_ok[None, :]
    x = tl.load(logits_ptr + rows[:, None] * stride_lt + cols[None, :] * stride_le, mask=mask, other=0.0)
    x = tl.where(col_ok[None, :], x.to(tl.float32), -float("inf"))  # [BT, BE]
    if SCORING == 1:
        scores = tl.where(col_ok[None, :], tl.sigmoid(x), -float("inf"))  # rows past T: finite
    elif SCORING == 2:
        scores = x
    else:
        e = tl.exp(x - tl.max(x, axis=1)[:, None])
        scores = e / tl.sum(e, axis=1)[:, None]
    choice = scores
    if CORRECTION:
        bias = tl.load(correction_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)  # [BE]
        choice = tl.where(col_ok[None, :], scores + bias[None, :], -float("inf"))
    if GROUP_SELECT > 0:
        group_of = cols // group_size  # [BE]
        gcols = tl.arange(0, BLOCK_GR)  # [BGR]
        gscores = tl.full((BLOCK_T, BLOCK_GR), -float("inf"), dtype=tl.float32)
        for gi in tl.static_range(N_GROUP):
            vals = tl.where(((group_of == gi) & col_ok)[None, :], choice, -float("inf"))  # [BT, BE]
            top = tl.max(vals, axis=1)  # [BT]
            if GROUP_SELECT == 2:
                top_id = tl.min(tl.where(vals == top[:, None], cols[None, :], BLOCK_E), axis=1)
                top = top + tl.max(tl.where(cols[None, :] == top_id[:, None], -float("inf"), vals), axis=1)
            gscores = tl.where(gcols[None, :] == gi, top[:, None], gscores)
        keep = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.int32)  # 1 where the expert's group is kept
        for j in tl.static_range(TOPK_GROUP):
            best = tl.max(gscores, axis=1)
            best_g = tl.min(tl.where(gscores == best[:, None], gcols[None, :], BLOCK_GR), axis=1)  # [BT]
            gscores = tl.where(gcols[None, :] == best_g[:, None], -float("inf"), gscores)
            keep = tl.where(group_of[None, :] == best_g[:, None], 1, keep)
        choice = tl.where(keep > 0, choice, -float("inf"))
    k_in_force = tl.load(k_ptr + rows, mask=row_mask, other=0)  # [BT]

    slot = tl.arange(0, BLOCK_K)  # [BK]
    weights = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    ids = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int64)
    first = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        best = tl.max(choice, axis=1)  # [BT]
        # lowest expert id among the maxima
        best_id = tl.min(tl.where(choice == best[:, None], cols[None, :], BLOCK_E), axis=1)  # [BT]
        picked = cols[None, :] == best_id[:, None]
        score = tl.sum(tl.where(picked, scores, 0.0), axis=1)  # [BT] the pick's uncorrected score
        choice = tl.where(picked, -float("inf"), choice)
        active = j < k_in_force
        if SCORING == 2:
            if j == 0:
                first = score
            score = tl.exp(score - first)  # softmax numerators, shifted by the largest (first) pick
        weights = tl.where(slot[None, :] == j, tl.where(active, score, 0.0)[:, None], weights)
        ids = tl.where(slot[None, :] == j, tl.where(active, best_id, E).to(tl.int64)[:, None], ids)
    if SCORING == 2:
        total = tl.sum(weights, axis=1)  # >= 1 (the first pick's exp(0)) on rows with k >= 1
        weights = weights / tl.where(total > 0, total, 1.0)[:, None]
    elif RENORMALIZE:
        denominator = tl.sum(weights, axis=1)
        if SCORING == 1:
            denominator = denominator + 1e-20
        weights = weights / denominator[:, None]
    weights = weights * scaling
    out = rows[:, None] * TOP_K + slot[None, :]  # [BT, BK]
    out_mask = row_mask[:, None] & (slot[None, :] < TOP_K)
    tl.store(weights_ptr + out, weights, mask=out_mask)
    tl.store(ids_ptr + out, ids, mask=out_mask)


_SCORING = {"softmax": 0, "sigmoid": 1, "topk_softmax": 2}
_GROUP_SELECT = {"none": 0, "group_max": 1, "group_top2_sum": 2}


def fused_topk(
    logits: torch.Tensor, top_k: int, k: torch.Tensor, renormalize: bool, scoring: str = "softmax",
    spec=None, correction_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E], k [T] or [] (the K in force per token, or for all) -> (weights [T, K] fp32,
    expert ids [T, K] int64 in [0, E]). `spec` (a moeserve RouterConfig) sets the scoring, the
    group limit and the scaling; without it, `scoring` alone (softmax or sigmoid)."""
    if logits.dim() != 2 or not 0 < top_k <= logits.shape[1]:
        raise ValueError(f"logits must be [T, E] with 0 < top_k <= E, got {tuple(logits.shape)}, top_k={top_k}")
    if spec is not None:
        scoring = spec.scoring
    if scoring not in _SCORING:
        raise ValueError(f"scoring must be one of {', '.join(_SCORING)}, got {scoring!r}")
    group_select, n_group, topk_group = ("none", 1, 1) if spec is None else (spec.group_select, spec.n_group,
                                                                          spec.topk_group)
    T, E = logits.shape
    weights = torch.empty(T, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(T, top_k, dtype=torch.int64, device=logits.device)
    if T == 0:
        return weights, ids
    block_e = triton.next_power_of_2(E)
    block_t = max(1, min(triton.next_power_of_2(T), 4096 // block_e, 64))
    correction = correction_bias.float().contiguous() if correction_bias is not None else weights
    topk_router_kernel[(triton.cdiv(T, block_t),)](
        logits, k.to(device=logits.device, dtype=torch.int64).reshape(-1).expand(T).contiguous(), correction,
        weights, ids,
        T, E, logits.stride(0), logits.stride(1), E // n_group,
        1.0 if spec is None else float(spec.routed_scaling_factor),
        TOP_K=top_k, SCORING=_SCORING[scoring], RENORMALIZE=renormalize, CORRECTION=correction_bias is not None,
        GROUP_SELECT=_GROUP_SELECT[group_select], N_GROUP=n_group, TOPK_GROUP=topk_group,
        BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=triton.next_power_of_2(top_k),
        BLOCK_GR=triton.next_power_of_2(n_group),
    )
    return weights, ids
