"""A request carries its own token state; the scheduler only compares computed vs total tokens.

    all_token_ids = prompt_token_ids + output_token_ids
    0 ........ num_computed_tokens ........ num_tokens
    |  keys/values in the cache  | still to run |

Prefill, chunked prefill, decode and recompute after preemption are all "run the tokens
between num_computed_tokens and num_tokens": there are no phases.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from moeserve.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED)


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int]
    max_total_tokens: int  # prompt + output may not exceed this (max_model_len)
    priority: int = 0  # lower runs first, as in vLLM
    arrival: int = 0  # set by the scheduler when the request is added
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[dict[int, float]] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    block_keys: list[bytes] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_preemptions: int = 0
    stop_reason: int | None = None
    arrival_time: float = 0.0  # time.monotonic() when the engine took it
    first_scheduled_time: float | None = None
    num_cached_tokens: int = 0  # prompt tokens its first schedule found in the prefix cache
    reported: bool = False  # its first output (which carries the two above) has been sent
    num_degraded_tokens: int = 0  # tokens it ran with fewer experts than it asked for
    rank: int | None = None  # the worker (KV pool) it runs on, from its first schedule

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_range(self, start: int, end: int) -> list[int]:
        """Its tokens at positions [start, end), without copying the rest of its history."""
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p : end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - p]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def sort_key(self) -> tuple[int, int]:
        """Scheduling order: priority, then arrival (FCFS within a priority)."""
        return (self.priority, self.arrival)

    @property
    def max_output_tokens(self) -> int:
        room = self.max_total_tokens - len(self.prompt_token_ids)
        limit = self.sampling_params.max_tokens
        return room if limit is None else min(limit, room)

    def check_token_stop(self) -> RequestStatus | None:
        """Stop conditions that depend on token ids alone (stop strings are the detokenizer's)."""
        params, n = self.sampling_params, len(self.output_token_ids)
        last = self.output_token_ids[-1]
        if n >= params.min_tokens:
            if not params.ignore_eos and last in self.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if last in params.stop_token_ids:
                self.stop_reason = last
                return RequestStatus.FINISHED_STOPPED
        if n >= self.max_output_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None
