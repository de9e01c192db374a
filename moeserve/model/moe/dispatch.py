"""Dispatch / combine across expert-parallel workers: each token-slot travels to the worker that
owns its slot, runs there, and comes back weighted.

Shape legend: T local tokens, K experts per token, D hidden, P physical slots (all workers),
P_local this worker's slots, R workers, N token-slots sent, M token-slots received.

    route (slots [T, K], global) -> sort token-slots by owner rank (slot_rank)
    -> exchange per-rank counts (all_to_all_single of [R], waited for at once)
    -> dispatch: all_to_all_single of rows [N, D] with their slots [N] and routing weights [N],
       packed as bytes into one [N, row bytes] matrix (uneven splits)
    -> local expert compute ([M, 1] slots in [0, P_local), the weight applied there)
    -> combine: all_to_all_single of the weighted rows back [N, D] -> index_add into [T, D]

Three collectives per MoE layer per micro-batch (six in a split step). The dispatch and combine are issued async
(`dispatch_combine_steps` yields after issuing each), so a caller running two micro-batches
computes one while the other's all-to-all travels (model/overlap.py).

Every worker calls this for every MoE layer of every micro-batch of every step, with T = 0 when
it has no tokens:
the collectives must match one for one on every rank, or the group hangs. The result equals the
one-worker layer up to the order of the K additions per token (fp32: the equality rule).
gloo has no bf16/fp16 all-to-all; half-precision rows travel bit-cast to bytes (exact).
"""

from __future__ import annotations

import time
from collections.abc import Generator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


class CommTimer:
    """Wall seconds this worker's host spent blocked on its all-to-alls: inside the count
    exchange and inside each wait (on gloo the transfer plus waiting for the slowest rank; on
    NCCL only what the host waits for, not the GPU's time in the collective)."""

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


def _start(out: torch.Tensor, inp: torch.Tensor, out_splits: list[int], in_splits: list[int],
           ep: ExpertParallelGroup):
    """Issue an all-to-all without waiting for it; `_wait` its handle before reading `out`."""
    return dist.all_to_all_single(wire(out), wire(inp.contiguous()), out_splits, in_splits, group=ep.group,
                                  async_op=True)


def _wait(work, ep: ExpertParallelGroup) -> None:
    start = time.perf_counter()
    work.wait()
    ep.timer.seconds += time.perf_counter() - start
    ep.timer.calls += 1


def _in_flight(work, name: str, ep: ExpertParallelGroup, trace) -> Generator[str, None, None]:
    """An issued all-to-all: yield `name` (the caller computes something else meanwhile), then
    wait for it when resumed, telling `trace` "<name>_issued", "<name>_wait" and "<name>_done"."""
    if trace is not None:
        trace(f"{name}_issued")
    yield name
    if trace is not None:
        trace(f"{name}_wait")
    _wait(work, ep)
    if trace is not None:
        trace(f"{name}_done")


def _pack(rows: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """rows [N, D], slots [N], weights [N] -> one byte matrix [N, row bytes] (one all-to-all)."""
    parts = (rows, slots[:, None], weights[:, None])
    return torch.cat([p.contiguous().view(torch.uint8) for p in parts], dim=1)


def _unpack(packed: torch.Tensor, D: int, dtype: torch.dtype, weight_dtype: torch.dtype):
    """The inverse of `_pack`: [M, row bytes] -> rows [M, D], slots [M], weights [M]."""
    a = D * dtype.itemsize
    b = a + 8

    def column(lo: int, hi: int, kind: torch.dtype) -> torch.Tensor:  # a fresh, aligned copy to view
        return packed.new_empty(packed.shape[0], hi - lo).copy_(packed[:, lo:hi]).view(kind)

    return column(0, a, dtype), column(a, b, torch.int64)[:, 0], column(b, packed.shape[1], weight_dtype)[:, 0]


def dispatch_combine_steps(x: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, slot_rank: torch.Tensor,
                           ep: ExpertParallelGroup, compute, trace=None) -> Generator[str, None, torch.Tensor]:
    """x [T, D], slots [T, K] global in [0, P] (P = none), weights [T, K] -> out [T, D], as a
    generator that yields right after issuing each payload all-to-all ("dispatch", "combine")
    and waits for it when resumed: the caller may compute something else in between (the other
    micro-batch). `compute(rows [M, D], local_slots [M, 1], weights [M, 1]) -> [M, D]` runs the
    local experts. `trace(event)`, when given, is told "dispatch_ready" before the dispatch is
    issued, "<name>_issued" after issuing each payload all-to-all, "<name>_wait" before waiting for
    it and "<name>_done" after."""
    T, K = slots.shape
    D = x.shape[1]
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
    send = _pack(x[tokens], flat[picked], weights.reshape(-1)[picked])  # [N, row bytes]
    recv = send.new_empty(M, send.shape[1])
    if trace is not None:
        trace("dispatch_ready")
    yield from _in_flight(_start(recv, send, recv_splits, send_splits, ep), "dispatch", ep, trace)
    rows, recv_slots, recv_weights = _unpack(recv, D, x.dtype, weights.dtype)
    local = (recv_slots - ep.slot_offset)[:, None]  # [M, 1] in [0, P_local)
    y = compute(rows, local, recv_weights[:, None]) if M else rows  # [M, D] weighted
    back = x.new_empty(N, D)
    yield from _in_flight(_start(back, y, send_splits, recv_splits, ep), "combine", ep, trace)
    out = torch.zeros_like(x)
    out.index_add_(0, tokens, back)
    return out


def run_to_end(steps: Generator) -> object:
    """Drive a staged computation with nothing to do at its yield points; its return value."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def dispatch_combine(x: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, slot_rank: torch.Tensor,
                     ep: ExpertParallelGroup, compute) -> torch.Tensor:
    """`dispatch_combine_steps` without overlap: each all-to-all is waited for at once."""
    return run_to_end(dispatch_combine_steps(x, slots, weights, slot_rank, ep, compute))
