"""The offline API, as vLLM's: LLM(model=...).generate(prompts, SamplingParams(...))."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from moeserve.config import EngineConfig, engine_config
from moeserve.engine.input_processor import Prompt
from moeserve.engine.llm_engine import LLMEngine
from moeserve.outputs import RequestFailure, RequestOutput
from moeserve.sampling_params import RequestOutputKind, SamplingParams


class LLM:
    """`LLM(model=PATH, dtype=..., max_num_seqs=..., max_model_len=..., ...)`; keyword arguments
    are the fields of the engine's config layers (moeserve.config; an unknown one is a
    TypeError naming it). The engine runs in this process."""

    def __init__(self, model: str, **kwargs: Any):
        self.engine = LLMEngine(engine_config(model, **kwargs))
        self._ids = itertools.count()

    @classmethod
    def from_config(cls, config: EngineConfig) -> LLM:
        llm = cls.__new__(cls)
        llm.engine = LLMEngine(config)
        llm._ids = itertools.count()
        return llm

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Run prompts to completion; results come back in prompt order. Every prompt is validated
        before any is queued, so a bad one raises ValueError and leaves the engine untouched.
        Only the final outputs are built (each request runs as output_kind FINAL_ONLY)."""
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params if isinstance(sampling_params, Sequence) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError("give one SamplingParams, or one per prompt")
        params = [replace(sp if isinstance(sp, SamplingParams) else SamplingParams.from_dict(sp or {}),
                          output_kind=RequestOutputKind.FINAL_ONLY) for sp in params]
        priorities = list(priority) if priority is not None else [0] * len(prompts)
        groups = [
            self.engine.process_request(str(next(self._ids)), p, sp, pr)
            for p, sp, pr in zip(prompts, params, priorities)
        ]
        for group in groups:
            self.engine.add_processed(group)
        done: dict[str, RequestOutput] = {}
        try:
            while len(done) < len(groups):
                for out in self.engine.step():
                    if isinstance(out, RequestFailure):
                        raise RuntimeError(f"request {out.request_id} failed in the engine: {out.message}")
                    if out.finished:
                        done[out.request_id] = out
        finally:
            for group in groups:
                if group.request_id not in done:
                    self.engine.abort_request(group.request_id)
        return [done[g.request_id] for g in groups]

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Render each conversation with the checkpoint's chat template, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tok = self.engine.tokenizer
        prompts = [
            {"prompt_token_ids": tok.encode(tok.apply_chat_template(c, add_generation_prompt), add_special_tokens=False)}
            for c in conversations
        ]
        return self.generate(prompts, sampling_params)
