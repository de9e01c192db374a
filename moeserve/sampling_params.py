"""SamplingParams: what a request asks of the sampler and the stop checker (vLLM's names)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields
from typing import Any


class RequestOutputKind(enum.IntEnum):
    """What each RequestOutput of a request carries (vLLM's names and values). With DELTA and
    FINAL_ONLY no output copies the completion's token ids and logprobs so far."""

    CUMULATIVE = 0  # every output: the whole completion so far (text, token_ids, logprobs)
    DELTA = 1  # every output: only what is new since the previous one (text, token_ids, logprobs)
    FINAL_ONLY = 2  # one output, when the request is done, with the whole completion


@dataclass(frozen=True)
class SamplingParams:
    """Validated at construction; every error names the field.

    temperature 0 means greedy. top_k 0 (or -1) and top_p 1 disable those filters. max_tokens
    None means "up to the context length". Penalties follow vLLM/OpenAI: repetition_penalty
    divides positive (multiplies negative) logits of tokens seen in the prompt or output;
    presence/frequency penalties subtract from logits of tokens seen in the output.
    moe_top_k is not sampling but travels with it: the experts per token the request asks for
    (fewer than the model's K is cheaper and close; the engine may lower it further under load).
    output_kind is not sampling either: what each of the request's outputs carries.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    stop: tuple[str, ...] = field(default=())
    stop_token_ids: tuple[int, ...] = field(default=())
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    moe_top_k: int | None = None  # experts per token for this request (<= the model's K); None: the model's
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids or ()))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        try:
            object.__setattr__(self, "output_kind", RequestOutputKind(self.output_kind))
        except ValueError:
            raise ValueError(f"invalid sampling parameters: output_kind must be one of "
                             f"{', '.join(f'{k.name} ({k.value})' for k in RequestOutputKind)}") from None
        checks = [
            (self.n >= 1, "n must be >= 1"),
            (self.temperature >= 0, "temperature must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0 (0 or -1 disables it)"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (self.max_tokens is None or self.max_tokens >= 1, "max_tokens must be >= 1"),
            (self.min_tokens >= 0, "min_tokens must be >= 0"),
            (self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens must be <= max_tokens"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs must be in [0, 20]"),
            (all(s for s in self.stop), "stop strings must be non-empty"),
            (self.moe_top_k is None or self.moe_top_k >= 1, "moe_top_k must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"invalid sampling parameters: {message}")

    @property
    def penalised(self) -> bool:
        """Whether any repetition, presence or frequency penalty applies."""
        return self.repetition_penalty != 1.0 or bool(self.presence_penalty) or bool(self.frequency_penalty)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SamplingParams:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown sampling field(s): {', '.join(unknown)}")
        return cls(**values)
