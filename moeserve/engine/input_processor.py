"""InputProcessor (front): a caller's prompt and SamplingParams -> the engine's requests.

Tokenises (text prompts), validates (empty prompt, ids outside the vocabulary, prompt too long
for max_model_len), and expands n > 1 into n sequences "{i}_{id}" with seeds seed + i, which the
engine runs separately and which share the prompt's blocks through the prefix cache. It raises
ValueError naming the problem and touches nothing, so a bad request costs no engine work.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

from moeserve.engine.messages import EngineCoreRequest, EngineInfo
from moeserve.sampling_params import SamplingParams
from moeserve.tokenizer import Tokenizer

Prompt = str | list[int] | dict[str, Any]


@dataclass
class ParentRequest:
    """A caller's request: what the output processor needs to put its sequences together."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    children: list[EngineCoreRequest]
    arrival_time: float = field(default_factory=time.monotonic)

    @property
    def child_ids(self) -> list[str]:
        return [c.request_id for c in self.children]


class InputProcessor:
    def __init__(self, tokenizer: Tokenizer, info: EngineInfo):
        self.tokenizer = tokenizer
        self.info = info
        eos = set(info.eos_token_ids)
        if tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_token_ids = tuple(sorted(eos))

    def process(self, request_id: str, prompt: Prompt, params: SamplingParams | dict | None = None,
                priority: int = 0) -> ParentRequest:
        if isinstance(params, dict):
            params = SamplingParams.from_dict(params)
        params = params or SamplingParams()
        text: str | None = None
        if isinstance(prompt, str):
            text, token_ids = prompt, self.tokenizer.encode(prompt)
        elif isinstance(prompt, dict):
            unknown = set(prompt) - {"prompt_token_ids", "prompt"}
            if unknown or "prompt_token_ids" not in prompt:
                raise ValueError("a dict prompt must be {'prompt_token_ids': [...]}")
            token_ids = list(prompt["prompt_token_ids"])
        else:
            token_ids = list(prompt)
        self.validate(token_ids)
        if params.moe_top_k is not None and params.moe_top_k > self.info.top_k:
            raise ValueError(f"moe_top_k={params.moe_top_k} is more than the model's {self.info.top_k} experts per "
                             "token")
        children = []
        for i in range(params.n):
            child_params = params
            if params.n > 1:
                child_params = replace(params, n=1, seed=None if params.seed is None else params.seed + i)
            child_id = request_id if params.n == 1 else f"{i}_{request_id}"
            children.append(EngineCoreRequest(child_id, token_ids, child_params, self.eos_token_ids, priority))
        return ParentRequest(request_id, text, token_ids, params, children)

    def validate(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise ValueError("the prompt is empty")
        vocab, limit = self.info.vocab_size, self.info.max_model_len
        bad = [t for t in token_ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token id {bad[0]!r} is outside the vocabulary [0, {vocab})")
        if len(token_ids) >= limit:
            raise ValueError(
                f"the prompt has {len(token_ids)} tokens; max_model_len={limit} leaves no room to generate"
            )
