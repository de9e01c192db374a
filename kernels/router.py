"""Router: scores + top-K + masking to the K in force + renormalisation, one pass over [T, E].

Shape legend (shared/DESIGN.md); K here is the model's K (K_max), k the K in force (<= K_max).

Per token row, in fp32:

    s = softmax(logits)  (or sigmoid(logits))
    repeat K times: pick the largest remaining score (lowest expert id on a tie), remove it
    choices at positions >= k: id E ("no expert"), weight 0
    renormalise: weights /= sum(weights)   (when the family does)

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
    weights_ptr,  # [T, K] out
    ids_ptr,  # [T, K] int64 out
    # Dimensions and strides
    T,
    E,
    stride_lt,
    stride_le,
    # Meta-parameters
    TOP_K: tl.constexpr,
    SIGMOID: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,  # >= TOP_K, power of two
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    cols = tl.arange(0, BLOCK_E)  # [BE]
    row_mask = rows < T
    mask = row_mask[:, None] & (cols[None, :] < E)
    x = tl.load(logits_ptr + rows[:, None] * stride_lt + cols[None, :] * stride_le, mask=mask, other=0.0)
    x = tl.where((cols < E)[None, :], x.to(tl.float32), -float("inf"))  # [BT, BE]
    if SIGMOID:
        scores = tl.where((cols < E)[None, :], tl.sigmoid(x), -float("inf"))  # rows past T: finite
    else:
        e = tl.exp(x - tl.max(x, axis=1)[:, None])
        scores = e / tl.sum(e, axis=1)[:, None]
    k_in_force = tl.load(k_ptr + rows, mask=row_mask, other=0)  # [BT]

    slot = tl.arange(0, BLOCK_K)  # [BK]
    weights = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    ids = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int64)
    for j in tl.static_range(TOP_K):
        best = tl.max(scores, axis=1)  # [BT]
        # lowest expert id among the maxima
        best_id = tl.min(tl.where(scores == best[:, None], cols[None, :], BLOCK_E), axis=1)  # [BT]
        scores = tl.where(cols[None, :] == best_id[:, None], -float("inf"), scores)
        active = j < k_in_force
        weights = tl.where(slot[None, :] == j, tl.where(active, best, 0.0)[:, None], weights)
        ids = tl.where(slot[None, :] == j, tl.where(active, best_id, E).to(tl.int64)[:, None], ids)
    if RENORMALIZE:
        weights = weights / tl.sum(weights, axis=1)[:, None]
    out = rows[:, None] * TOP_K + slot[None, :]  # [BT, BK]
    out_mask = row_mask[:, None] & (slot[None, :] < TOP_K)
    tl.store(weights_ptr + out, weights, mask=out_mask)
    tl.store(ids_ptr + out, ids, mask=out_mask)


def fused_topk(
    logits: torch.Tensor, top_k: int, k: torch.Tensor, renormalize: bool, scoring: str = "softmax"
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E], k [T] or [] (the K in force per token, or for all) -> (weights [T, K] fp32,
    expert ids [T, K] int64 in [0, E])."""
    if logits.dim() != 2 or not 0 < top_k <= logits.shape[1]:
        raise ValueError(f"logits must be [T, E] with 0 < top_k <= E, got {tuple(logits.shape)}, top_k={top_k}")
    if scoring not in ("softmax", "sigmoid"):
        raise ValueError(f"scoring must be softmax or sigmoid, got {scoring!r}")
    T, E = logits.shape
    weights = torch.empty(T, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(T, top_k, dtype=torch.int64, device=logits.device)
    if T == 0:
        return weights, ids
    block_e = triton.next_power_of_2(E)
    block_t = max(1, min(triton.next_power_of_2(T), 4096 // block_e, 64))
    topk_router_kernel[(triton.cdiv(T, block_t),)](
        logits, k.to(device=logits.device, dtype=torch.int64).reshape(-1).expand(T).contiguous(), weights, ids,
        T, E, logits.stride(0), logits.stride(1),
        TOP_K=top_k, SIGMOID=scoring == "sigmoid", RENORMALIZE=renormalize, BLOCK_T=block_t, BLOCK_E=block_e,
        BLOCK_K=triton.next_power_of_2(top_k),
    )
    return weights, ids
