"""Two micro-batches per step: while one micro-batch's expert all-to-all travels, the other computes.

The model is written once, as a staged computation per micro-batch (`MoEForCausalLM.layer_steps`,
a generator): it runs its layers in order and yields right after issuing each async all-to-all
(every MoE layer's dispatch, then its combine). `interleave` runs two such generators in lock
step, A then B, so one MoE layer's schedule on every rank is

    A: attention, router, count exchange, issue dispatch(A)      | yield
    B: attention, router, count exchange, issue dispatch(B)      | yield   <- dispatch(A) in flight
    A: wait dispatch(A), local experts, issue combine(A)         | yield   <- dispatch(B) in flight
    B: wait dispatch(B), local experts, issue combine(B)         | yield   <- combine(A) in flight
    A: wait combine(A), shared expert, next layer's attention... | yield   <- combine(B) in flight

Every rank issues the same collectives in the same order only if every rank runs the same number
of micro-batches: the scheduler decides the split for all ranks at once (SchedulerOutput.
micro_batch_cut), never a rank alone. With one micro-batch the generator runs straight through
(run_to_end) and each all-to-all is waited for as soon as it is issued.

A micro-batch is a slice of the rank's flat batch: A holds its first `cut` tokens, B the rest. A
sequence cut in two is a chunked-prefill continuation: B's part attends to A's part through the
KV cache, which A wrote in the same layer just before (A runs each layer before B).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field

import torch

from moeserve.model.attention import AttentionMetadata


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch's inputs: T_m tokens in flat batch order."""

    input_ids: torch.Tensor  # [T_m] int64
    meta: AttentionMetadata
    token_top_k: object | None = None  # decoder.TokenTopK sliced to the micro-batch, or None


@dataclass
class OverlapTrace:
    """Events in the order they happened on this rank: (event, micro-batch, decoder layer).
    Events: "attention" (the layer's compute begins), "dispatch_ready" (routed, counts exchanged),
    "dispatch_issued"/"dispatch_wait"/"dispatch_done", and the same for "combine". `hook`, when set, is called with each event as
    it is recorded (a test uses it to hold a peer back)."""

    events: list[tuple[str, int, int]] = field(default_factory=list)
    hook: Callable[[str, int, int], None] | None = None

    def record(self, event: str, micro_batch: int, layer: int) -> None:
        self.events.append((event, micro_batch, layer))
        if self.hook is not None:
            self.hook(event, micro_batch, layer)


SequenceLists = tuple[list[int], list[int], list[list[int]]]  # query lens, seq lens, block tables


def cut_sequences(query_lens: list[int], seq_lens: list[int], block_tables: list[list[int]],
                  cut: int) -> tuple[SequenceLists, SequenceLists]:
    """The per-sequence lists of a flat batch split after its first `cut` tokens: a sequence
    cut in two runs its first part in A (a chunk ending at the cut) and the rest in B (a
    continuation whose context includes A's part); both keep its block table."""
    parts: tuple[SequenceLists, SequenceLists] = (([], [], []), ([], [], []))
    done = 0
    for q, n, table in zip(query_lens, seq_lens, block_tables):
        first = min(max(cut - done, 0), q)  # of this sequence's tokens, those before the cut
        for side, (sq, sn) in ((0, (first, n - q + first)), (1, (q - first, n))):
            if sq:
                parts[side][0].append(sq)
                parts[side][1].append(sn)
                parts[side][2].append(table)
        done += q
    return parts


def interleave(steps: Sequence[Generator]) -> list[object]:
    """Run staged computations round-robin, one stage of each in turn, until all have returned;
    their return values in order. Every rank must interleave the same number of them."""
    results: list[object] = [None] * len(steps)
    live = list(range(len(steps)))
    while live:
        for i in list(live):
            try:
                next(steps[i])
            except StopIteration as done:
                results[i] = done.value
                live.remove(i)
    return results
