"""Fused grouped GEMM for expert micro-batches: gate_up with SiLU·mul, down with the routing weight.

Shape legend (shared/DESIGN.md) plus: N = T * K token-slots, BM/BN/BK block sizes.

What one MoE layer computes, per token-slot i = (token t, choice k) with slot s = slots[t, k]:

    h[i] = silu(x[t] @ w13[s, :I].T) * (x[t] @ w13[s, I:].T)       # [I]   pass 1 (ACT)
    y[i] = weights[t, k] * (h[i] @ w2[s].T)                          # [D]   pass 2 (MUL_WEIGHT)
    out[t] = sum_k y[t * K + k]                                      # [D]   combine

Both passes are the same kernel: a program owns one BM-row block of one slot (from moe_align) and
one BN-column block of the output; it gathers its rows by token-slot id, streams BK-wide tiles of
the activations and of that slot's weight through tl.dot with fp32 accumulation, and writes its
rows back at their token-slot ids. Programs are ordered in groups of GROUP_M row blocks so that
consecutive programs reuse the same weight columns from L2 (Triton tutorial 03).

The combine writes y to [N, D] and sums over K instead of atomically adding into [T, D]: the
result is the same up to summation order, and this way it is deterministic from run to run.

Rounding follows the torch backend step by step (gate and up rounded to the activation dtype,
then silu, then the product, then the down projection, then the weight), so in half precision
the two differ only by the matmuls' summation order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeserve.kernels import interpreting
from moeserve.kernels.configs import MoEKernelConfig, get_moe_config
from moeserve.kernels.moe_align import AlignedSlots, moe_align_block_size
from moeserve.kernels.numerics import emulate_bf16, round_to


@triton.jit
def fused_moe_kernel(
    # Pointers
    a_ptr,  # activations [rows, Kdim]; row of token-slot i is i // A_ROW_DIV
    b_ptr,  # weights [P_local, *, Kdim] (w13 or w2)
    c_ptr,  # output [N, Ncols]
    weights_ptr,  # routing weights [N] (read when MUL_WEIGHT)
    sorted_ids_ptr,  # [M_max] token-slot ids, N = padding
    block_slot_ptr,  # [M_max / BM] slot of each row block, -1 = skip
    num_padded_ptr,  # [1] padded total
    # Dimensions
    num_valid,  # N (token-slot ids >= this are padding)
    Ncols,  # output columns (I for gate_up, D for down)
    Kdim,  # reduction length (D for gate_up, I for down)
    up_offset,  # element offset from a gate row to its up row in b (I * stride_bn)
    # Strides
    stride_am, stride_ak,
    stride_be, stride_bn, stride_bk,
    stride_cm, stride_cn,
    # Meta-parameters
    A_ROW_DIV: tl.constexpr,  # K for gate_up (rows are tokens), 1 for down (rows are token-slots)
    ACT: tl.constexpr,  # compute silu(gate) * up from two weight row blocks
    MUL_WEIGHT: tl.constexpr,  # multiply each row by its routing weight
    DOT_FP32: tl.constexpr,  # cast tiles to fp32 before tl.dot (the interpreter's half dot is wrong)
    FP32_IEEE: tl.constexpr,  # fp32 inputs: full-precision dot, not tf32
    EMULATE_BF16: tl.constexpr,  # round to bf16 by hand (the interpreter truncates)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(tl.load(num_padded_ptr), BLOCK_M)
    num_pid_n = tl.cdiv(Ncols, BLOCK_N)
    # Grouped ordering over the real row blocks; the grid is sized for the worst case.
    num_in_group = GROUP_M * num_pid_n
    group = pid // num_in_group
    first_m = group * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    if group_m <= 0:
        return
    pid_m = first_m + (pid % num_in_group) % group_m
    pid_n = (pid % num_in_group) // group_m
    if pid_n >= num_pid_n:  # a short last group leaves programs with no column block
        return

    slot = tl.load(block_slot_ptr + pid_m).to(tl.int64)
    if slot < 0:
        return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ids = tl.load(sorted_ids_ptr + offs_m).to(tl.int64)  # [BM]
    row_mask = ids < num_valid
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    col_mask = offs_n < Ncols
    offs_k = tl.arange(0, BLOCK_K)

    a_ptrs = a_ptr + (ids // A_ROW_DIV)[:, None] * stride_am + offs_k[None, :] * stride_ak  # [BM, BK]
    b_ptrs = b_ptr + slot * stride_be + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk  # [BK, BN]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(Kdim, BLOCK_K)):
        k_mask = offs_k < Kdim - k0 * BLOCK_K
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if FP32_IEEE:
            acc += tl.dot(a, b, input_precision="ieee")
        else:
            acc += tl.dot(a, b)
        if ACT:
            b_up = tl.load(b_ptrs + up_offset, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            if DOT_FP32:
                b_up = b_up.to(tl.float32)
            if FP32_IEEE:
                acc_up += tl.dot(a, b_up, input_precision="ieee")
            else:
                acc_up += tl.dot(a, b_up)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    out_ty = c_ptr.dtype.element_ty
    if ACT:
        gate = round_to(acc, out_ty, EMULATE_BF16)
        up = round_to(acc_up, out_ty, EMULATE_BF16)
        act = round_to(gate * tl.sigmoid(gate), out_ty, EMULATE_BF16)
        result = act * up
    else:
        result = acc
    if MUL_WEIGHT:
        w = tl.load(weights_ptr + ids, mask=row_mask, other=0.0).to(tl.float32)
        result = round_to(result, out_ty, EMULATE_BF16) * w[:, None]
    c_ptrs = c_ptr + ids[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, round_to(result, out_ty, EMULATE_BF16).to(out_ty), mask=row_mask[:, None] & col_mask[None, :])


def _launch(a, b, c, weights, aligned: AlignedSlots, *, num_valid, ncols, kdim, up_offset, a_row_div,
            act, mul_weight, config: MoEKernelConfig):
    BM = aligned.block_m
    grid = (aligned.block_slot.numel() * triton.cdiv(ncols, config.block_n),)
    fp32 = a.dtype == torch.float32
    fused_moe_kernel[grid](
        a, b, c, weights, aligned.sorted_token_ids, aligned.block_slot, aligned.num_tokens_padded,
        num_valid, ncols, kdim, up_offset,
        a.stride(0), a.stride(1),
        b.stride(0), b.stride(1), b.stride(2),
        c.stride(0), c.stride(1),
        A_ROW_DIV=a_row_div, ACT=act, MUL_WEIGHT=mul_weight,
        DOT_FP32=interpreting() and not fp32, FP32_IEEE=fp32 and not interpreting(),
        EMULATE_BF16=emulate_bf16(c.dtype),
        BLOCK_M=BM, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )


def fused_experts(
    x: torch.Tensor,
    slots: torch.Tensor,
    weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    *,
    local_slot: torch.Tensor | None = None,
    config: MoEKernelConfig | None = None,
) -> torch.Tensor:
    """x [T, D], slots [T, K] in [0, P] (P = no expert), weights [T, K], w13 [P_local, 2I, D],
    w2 [P_local, D, I] -> out [T, D] in x's dtype. Same contract as moeserve's ExpertBackend;
    local_slot [P] as in moe_align_block_size (None: every slot is local, P_local = P)."""
    T, D = x.shape
    K = slots.shape[1]
    P = local_slot.numel() if local_slot is not None else w13.shape[0]
    I = w2.shape[2]
    if w13.shape[1:] != (2 * I, D) or w2.shape[1] != D or weights.shape != slots.shape:
        raise ValueError(f"bad shapes: x {tuple(x.shape)}, slots {tuple(slots.shape)}, weights "
                         f"{tuple(weights.shape)}, w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}")
    if not (x.dtype == w13.dtype == w2.dtype):
        raise ValueError(f"x, w13 and w2 must share a dtype, got {x.dtype}, {w13.dtype}, {w2.dtype}")
    config = config or get_moe_config(P, I, D, T, x.dtype)
    x = x.contiguous()
    N = T * K
    aligned = moe_align_block_size(slots, P, config.block_m, local_slot)
    flat_weights = weights.reshape(-1).contiguous()  # [N]
    hidden = torch.empty(N, I, dtype=x.dtype, device=x.device)  # [N, I]
    _launch(x, w13, hidden, flat_weights, aligned, num_valid=N, ncols=I, kdim=D,
            up_offset=I * w13.stride(1), a_row_div=K, act=True, mul_weight=False, config=config)
    # Rows no program writes (inactive choices, slots on other ranks) must read as zero.
    y = torch.zeros(N, D, dtype=x.dtype, device=x.device)  # [N, D]
    _launch(hidden, w2, y, flat_weights, aligned, num_valid=N, ncols=D, kdim=I,
            up_offset=0, a_row_div=1, act=False, mul_weight=True, config=config)
    return y.view(T, K, D).sum(dim=1)  # [T, D]
