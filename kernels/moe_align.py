"""Alignment: top-K slots -> token-slots grouped by physical slot, each group padded to BLOCK_M.

Shape legend (shared/DESIGN.md) plus: N = T * K token-slots, BM = BLOCK_M, M_pad = the padded
total, M_max = N + min(N, P) * (BM - 1) its upper bound (at most min(N, P) slots hold tokens,
and each of their groups is padded by at most BM - 1), rounded up to a multiple of BM.

The grouped GEMM gives each program one BM-row block of one slot. This stage lays the blocks out:

    sorted_token_ids [M_max]   | slot 0: ids, pad | slot 1: ids, pad | ... | unused (= N) |
                               0                                      M_pad          M_max
    block_slot [M_max / BM]    slot of each block, -1 past M_pad (and for slots not on this rank)
    num_tokens_padded [1]      M_pad, read by the kernel on the device

A token-slot id i means token i // K, choice i % K; the id N marks padding. Within a slot ids keep
their order (a stable sort), so the result is deterministic. Everything is sized by T, K, P and BM
alone and built on the device (no bincount, boolean indexing or .item()), so the decode path
never waits on the host and the shapes are fixed per batch size, as CUDA graphs need.

Two implementations compute the same layout bit for bit: `moe_align_kernel`, one Triton program
(histogram, padded prefix sums, a sort of (slot, id) keys, scatter, each block's slot read from
its first id) for up to ALIGN_KERNEL_MAX_SLOTS token-slots and ALIGN_KERNEL_MAX_BINS slots — the
decode path, where a dozen small torch launches per layer would cost more than the layer's
weights take to stream — and torch ops beyond that.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

ALIGN_KERNEL_MAX_SLOTS = 4096  # N up to which the one-program kernel is used
ALIGN_KERNEL_MAX_BINS = 1024  # P + 1 (padded to a power of two) up to which it is used


@triton.jit
def moe_align_kernel(
    # Pointers
    slots_ptr,  # [N] int64 slots in [0, P]
    sorted_ids_ptr,  # [M_max] int32 out
    block_slot_ptr,  # [M_max / BM] int32 out
    num_padded_ptr,  # [1] int32 out
    local_slot_ptr,  # [P] int64 (read when HAS_LOCAL)
    shift_ptr,  # [BLOCK_P] int32 scratch
    # Dimensions
    N,
    P,
    m_max,
    num_blocks,
    # Meta-parameters
    HAS_LOCAL: tl.constexpr,
    BM: tl.constexpr,
    BLOCK_N: tl.constexpr,  # >= N, power of two
    BLOCK_P: tl.constexpr,  # >= P + 1, power of two
    BLOCK_B: tl.constexpr,  # >= num_blocks, power of two
    FILL: tl.constexpr,
):
    offs = tl.arange(0, BLOCK_N)
    s = tl.load(slots_ptr + offs, mask=offs < N, other=P).to(tl.int32)  # [BN], P = none
    bins = tl.arange(0, BLOCK_P)
    counts = tl.where(bins < P, tl.histogram(s, BLOCK_P), 0)  # [BP]
    padded = (counts + BM - 1) // BM * BM
    padded_end = tl.cumsum(padded, 0)
    # A token-slot at position j of the sorted order lands at j + (padded_start - count_start)[slot].
    tl.store(shift_ptr + bins, padded_end - padded - (tl.cumsum(counts, 0) - counts))
    for start in range(0, m_max, FILL):
        fill = start + tl.arange(0, FILL)
        tl.store(sorted_ids_ptr + fill, N, mask=fill < m_max)
    tl.debug_barrier()

    key = tl.sort(s * BLOCK_N + offs)  # by slot, then by id: a stable sort
    sorted_slot = key // BLOCK_N
    active = sorted_slot < P
    shift = tl.load(shift_ptr + sorted_slot, mask=active, other=0)
    tl.store(sorted_ids_ptr + offs + shift, key % BLOCK_N, mask=active)

    tl.debug_barrier()

    # A group that holds tokens starts with a real id, so a block's slot is its first id's slot.
    b = tl.arange(0, BLOCK_B)
    m_pad = tl.sum(padded)
    used = b * BM < m_pad
    first = tl.load(sorted_ids_ptr + b * BM, mask=used, other=0)
    slot = tl.load(slots_ptr + first, mask=used, other=P).to(tl.int32)  # [BB] in [0, P]
    if HAS_LOCAL:
        slot = tl.load(local_slot_ptr + slot, mask=slot < P, other=-1).to(tl.int32)
    else:
        slot = tl.where(slot < P, slot, -1)
    tl.store(block_slot_ptr + b, slot, mask=b < num_blocks)
    tl.store(num_padded_ptr, m_pad)


@dataclass(frozen=True)
class AlignedSlots:
    """Block layout for one MoE layer call; see the module docstring for the invariants."""

    sorted_token_ids: torch.Tensor  # [M_max] int32, N = padding
    block_slot: torch.Tensor  # [M_max / BM] int32, -1 = skip the block
    num_tokens_padded: torch.Tensor  # [1] int32
    block_m: int


def max_padded_slots(num_token_slots: int, num_slots: int, block_m: int) -> int:
    """M_max: the padded total's bound for N token-slots over P slots, a multiple of BM."""
    bound = num_token_slots + min(num_token_slots, num_slots) * (block_m - 1)
    return -(-bound // block_m) * block_m


def moe_align_block_size(
    slots: torch.Tensor, num_slots: int, block_m: int, local_slot: torch.Tensor | None = None
) -> AlignedSlots:
    """slots [T, K] in [0, P] (P = no expert) -> AlignedSlots.

    local_slot [P] (optional, expert parallelism) maps a physical slot to its index in this rank's
    weight tensors, -1 for slots owned by another rank: their blocks get block_slot -1 and are
    skipped by the kernel (their rows stay zero and are filled by the combine after the return
    trip).
    """
    P, BM = num_slots, block_m
    flat = slots.reshape(-1).to(torch.int64)  # [N]
    N = flat.numel()
    m_max = max_padded_slots(N, P, BM)
    num_blocks = m_max // BM
    block_p, block_b = triton.next_power_of_2(P + 1), triton.next_power_of_2(num_blocks)
    if 0 < N <= ALIGN_KERNEL_MAX_SLOTS and block_p <= ALIGN_KERNEL_MAX_BINS:
        return _align_kernel(flat, P, BM, m_max, num_blocks, block_p, block_b, local_slot)
    return _align_torch(flat, P, BM, m_max, local_slot)


def _align_kernel(flat, P, BM, m_max, num_blocks, block_p, block_b, local_slot) -> AlignedSlots:
    device = flat.device
    sorted_ids = torch.empty(m_max, dtype=torch.int32, device=device)
    block_slot = torch.empty(num_blocks, dtype=torch.int32, device=device)
    num_padded = torch.empty(1, dtype=torch.int32, device=device)
    shift = torch.empty(block_p, dtype=torch.int32, device=device)
    moe_align_kernel[(1,)](
        flat, sorted_ids, block_slot, num_padded, local_slot if local_slot is not None else flat, shift,
        flat.numel(), P, m_max, num_blocks,
        HAS_LOCAL=local_slot is not None, BM=BM, BLOCK_N=triton.next_power_of_2(flat.numel()),
        BLOCK_P=block_p, BLOCK_B=block_b, FILL=1024,
    )
    return AlignedSlots(sorted_ids, block_slot, num_padded, BM)


def _align_torch(flat, P, BM, m_max, local_slot) -> AlignedSlots:
    device = flat.device
    N = flat.numel()

    counts = torch.zeros(P + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))  # [P + 1], the last is "no expert"
    counts = counts[:P]
    padded = (counts + BM - 1) // BM * BM  # [P]
    padded_end = torch.cumsum(padded, 0)  # [P]
    padded_start = padded_end - padded  # [P]
    count_start = torch.cumsum(counts, 0) - counts  # [P]

    order = torch.argsort(flat, stable=True)  # [N] token-slot ids grouped by slot, P last
    sorted_slot = flat[order]  # [N]
    active = sorted_slot < P
    s = sorted_slot.clamp(max=P - 1)
    rank_in_slot = torch.arange(N, device=device) - count_start[s]  # [N]
    dest = torch.where(active, padded_start[s] + rank_in_slot, m_max)  # [N], m_max = dropped
    sorted_ids = torch.full((m_max + 1,), N, dtype=torch.int32, device=device)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))

    block_start = torch.arange(0, m_max, BM, device=device)  # [M_max / BM]
    block_slot = torch.searchsorted(padded_end, block_start, right=True)  # [M_max / BM] in [0, P]
    if local_slot is not None:
        block_slot = torch.cat([local_slot.to(torch.int64), local_slot.new_full((1,), -1).to(torch.int64)])[block_slot]
    else:
        block_slot = torch.where(block_slot < P, block_slot, -1)
    return AlignedSlots(
        sorted_token_ids=sorted_ids[:m_max],
        block_slot=block_slot.to(torch.int32),
        num_tokens_padded=padded_end[-1:].to(torch.int32),
        block_m=BM,
    )
