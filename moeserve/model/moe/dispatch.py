"""Dispatch / combine across expert-parallel workers: each token-slot travels to the worker that
owns its slot, runs there, and comes back weighted.

Shape legend: T local tokens, K experts per token, D hidden, P physical slots (all workers),
P_local this worker's slots, R workers, N token-slots sent, M token-slots received.

    route (slots [T, K], global) -> sort token-slots by owner rank (slot_rank)
    -> exchange per-rank counts (all_to_all_single of [R])
    -> all_to_all_single of rows [N, D], their slots [N] and routing weights [N] (uneven splits)
    -> local expert compute ([M, 1] slots in [0, P_local), the weight applied there)
    -> all_to_all_single of the weighted rows back [N, D] -> index_add into [T, D]

Every worker calls this for every MoE layer of every step, with T = 0 when it has no tokens:
the collectives must match one for one on every rank, or the group hangs. The result equals the
one-worker layer up to the order of the K additions per token (fp32: the equality rule).
gloo has no bf16/fp16 all-to-all; half-precision rows travel bit-cast to bytes (exact).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


class CommTimer:
    """Wall seconds spent in this worker's all-to-alls (meaningful on gloo, where they block;
    on NCCL they are asynchronous and this measures only their launch)."""

    def __init__(self):
        self.seconds = 0.0
        self.calls = 0

    def take(self) -> tuple[float, int]:
        out = (self.seconds, self.calls)
        self.seconds, self.calls = 0.0, 0
        return out


@dataclass(frozen=True)
class ExpertParallelGroup:
    """This worker's place in the data-plane group: rank, world size, the process group, and the
    first global slot and number of slots it owns."""

    rank: int
    world_size: int
    group: object  # torch.distributed ProcessGroup
    slot_offset: int
    num_local_slots: int
    timer: CommTimer = field(default_factory=CommTimer, compare=False)


def wire(t: torch.Tensor) -> torch.Tensor:
    """What travels: half precision bit-cast to bytes (gloo all-to-all takes neither bf16 nor int16)."""
    if t.dtype not in (torch.bfloat16, torch.float16):
        return t
    return (t.unsqueeze(-1) if t.dim() == 1 else t).view(torch.uint8)  # a view: dim 0 (the split) unchanged


def _a2a(out: torch.Tensor, inp: torch.Tensor, out_splits: list[int], in_splits: list[int],
         ep: ExpertParallelGroup) -> None:
    start = time.perf_counter()
    dist.all_to_all_single(wire(out), wire(inp.contiguous()), out_splits, in_splits, group=ep.group)
    ep.timer.seconds += time.perf_counter() - start
    ep.timer.calls += 1


def dispatch_combine(x: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, slot_rank: torch.Tensor,
                     ep: ExpertParallelGroup, compute) -> torch.Tensor:
    """x [T, D], slots [T, K] global in [0, P] (P = none), weights [T, K] -> out [T, D].
    `compute(rows [M, D], local_slots [M, 1], weights [M, 1]) -> [M, D]` runs the local experts."""
    T, K = slots.shape
    P, R = slot_rank.shape[0], ep.world_size
    flat = slots.reshape(-1)  # [T*K]
    active = flat < P
    owner = torch.where(active, slot_rank[flat.clamp(max=P - 1)], R)  # [T*K], R = nowhere
    order = torch.argsort(owner, stable=True)  # [T*K]
    send_counts = torch.bincount(owner, minlength=R + 1)[:R]  # [R]
    recv_counts = torch.empty_like(send_counts)
    _a2a(recv_counts, send_counts, [1] * R, [1] * R, ep)
    send_splits, recv_splits = send_counts.tolist(), recv_counts.tolist()
    N, M = sum(send_splits), sum(recv_splits)
    picked = order[:N]  # [N] token-slots, grouped by owner rank
    tokens = picked // K  # [N]
    send_rows = x[tokens]  # [N, D]
    recv_rows = x.new_empty(M, x.shape[1])
    _a2a(recv_rows, send_rows, recv_splits, send_splits, ep)
    recv_slots = flat.new_empty(M)
    _a2a(recv_slots, flat[picked], recv_splits, send_splits, ep)
    flat_weights = weights.reshape(-1)
    recv_weights = flat_weights.new_empty(M)
    _a2a(recv_weights, flat_weights[picked], recv_splits, send_splits, ep)
    local = (recv_slots - ep.slot_offset)[:, None]  # [M, 1] in [0, P_local)
    y = compute(recv_rows, local, recv_weights[:, None]) if M else recv_rows  # [M, D] weighted
    back = x.new_empty(N, x.shape[1])
    _a2a(back, y, send_splits, recv_splits, ep)
    out = torch.zeros_like(x)
    out.index_add_(0, tokens, back)
    return out
