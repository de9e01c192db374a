"""What a caller gets back (vLLM's RequestOutput / CompletionOutput)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any


class History(Sequence):
    """A read-only view of the first `length` items of a list that only ever grows (a sequence's
    tokens or logprobs), so that a step's output costs O(1) however long the history: it reads
    as a tuple (len, indexing, slices as tuples, iteration, ==, hash) and pickles as one.
    Invariant: the list is only appended to, so the view never changes."""

    __slots__ = ("_items", "_length")

    def __init__(self, items: list, length: int | None = None):
        self._items = items
        self._length = len(items) if length is None else length

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return tuple(self._items[k] for k in range(*i.indices(self._length)))
        if not -self._length <= i < self._length:
            raise IndexError("history index out of range")
        return self._items[i % self._length]

    def __iter__(self):
        return itertools.islice(self._items, self._length)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, (Sequence, History)) or isinstance(other, str):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return repr(tuple(self))

    def __reduce__(self):
        return (tuple, (tuple(self),))


@dataclass(frozen=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: Sequence[int]  # a tuple, or a History view (no copy per step)
    cumulative_logprob: float | None
    logprobs: Sequence[dict[int, float]] | None  # per token: top-N and the sampled token
    finish_reason: str | None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    delta_text: str = ""  # text new since the previous output for this request (streaming)
    delta_token_ids: tuple[int, ...] = ()
    num_degraded_tokens: int = 0  # its tokens (prompt included) that ran with fewer experts than asked

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: tuple[int, ...]
    outputs: tuple[CompletionOutput, ...]
    finished: bool
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    queue_time_s: float | None = None  # from arrival to first scheduled


@dataclass(frozen=True)
class RequestFailure:
    """A request the engine could not serve: it is released; the others go on."""

    request_id: str
    message: str
    unavailable: bool = False  # failed because a worker was lost: retry later (503), not a 500


def merge_outputs(older: RequestOutput, newer: RequestOutput) -> RequestOutput:
    """One output that says what two consecutive ones of a request say: the newer's state with
    both deltas (for a consumer that has not taken the older yet)."""
    merged = tuple(
        replace(new, delta_text=old.delta_text + new.delta_text,
                delta_token_ids=old.delta_token_ids + new.delta_token_ids)
        for old, new in zip(older.outputs, newer.outputs)
    )
    return replace(newer, outputs=merged)
