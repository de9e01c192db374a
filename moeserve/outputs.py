"""What a caller gets back (vLLM's RequestOutput / CompletionOutput)."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: tuple[int, ...]
    cumulative_logprob: float | None
    logprobs: tuple[dict[int, float], ...] | None  # per token: top-N and the sampled token
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


def merge_outputs(older: RequestOutput, newer: RequestOutput, delta: bool = False) -> RequestOutput:
    """One output that says what two consecutive ones of a request say (for a consumer that has
    not taken the older yet): the newer's state with both deltas. With `delta` (output_kind
    DELTA) text, token_ids and logprobs hold deltas too, and are joined as well."""
    merged = []
    for old, new in zip(older.outputs, newer.outputs):
        change = dict(delta_text=old.delta_text + new.delta_text,
                      delta_token_ids=old.delta_token_ids + new.delta_token_ids)
        if delta:
            change.update(text=old.text + new.text, token_ids=old.token_ids + new.token_ids,
                          logprobs=None if new.logprobs is None else (old.logprobs or ()) + new.logprobs)
        merged.append(replace(new, **change))
    return replace(newer, outputs=tuple(merged))
