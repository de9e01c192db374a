"""OutputProcessor (front): the engine's per-sequence token outputs -> the caller's RequestOutputs.

For every sequence it keeps the tokens, logprobs and an incremental detokenizer, and applies
stop strings (the engine stops on token ids only). A stop string ends the sequence here; its
id is returned in `aborts` so the engine releases it (a token or two the engine produced
meanwhile are dropped). A caller's request with n > 1 is reported as one RequestOutput with n
completions whenever any of them moved (FINAL_ONLY: once, when all are done). An engine error on
one sequence, or an exception while detokenising it, fails the whole caller's request (a
RequestFailure) and aborts its siblings; other requests are untouched.

What an output carries follows the request's `output_kind` (vLLM's): the whole completion so
far (CUMULATIVE), only what is new (DELTA), or one output with everything when the request is
done (FINAL_ONLY). With DELTA and FINAL_ONLY no output copies the completion's token ids or
logprobs so far (the detokenizer's text still grows by string concatenation, which copies it on
every token). Whatever the kind, `process` reports each request that moved as a `Progress`,
which the front's accounting (admission, token metrics) reads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from moeserve.engine.detokenizer import IncrementalDetokenizer
from moeserve.engine.input_processor import ParentRequest
from moeserve.engine.messages import EngineCoreOutput
from moeserve.outputs import CompletionOutput, RequestFailure, RequestOutput
from moeserve.sampling_params import RequestOutputKind
from moeserve.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


@dataclass
class _Sequence:
    parent: str
    index: int
    detokenizer: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    sent: int = 0  # tokens already reported
    cumulative_logprob: float = 0.0
    num_degraded_tokens: int = 0


@dataclass
class _Parent:
    request: ParentRequest
    sequences: list[_Sequence]
    num_cached_tokens: int = 0
    queue_time_s: float | None = None
    prompt_token_ids: tuple[int, ...] = ()  # made once: every output of the request shares it


@dataclass(frozen=True)
class Progress:
    """How far a caller's request got in one `process` call, whatever its outputs carry."""

    request_id: str
    new_tokens: int  # tokens its sequences produced in this call
    generated: tuple[int, ...]  # per sequence: tokens produced so far


@dataclass
class ProcessedOutputs:
    request_outputs: list[RequestOutput] = field(default_factory=list)  # as each request's output_kind says
    progress: list[Progress] = field(default_factory=list)  # every request that moved, finished ones included
    failures: list[RequestFailure] = field(default_factory=list)
    aborts: list[str] = field(default_factory=list)  # sequences the engine should release


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._parents: dict[str, _Parent] = {}
        self._sequences: dict[str, _Sequence] = {}

    def __len__(self) -> int:
        return len(self._parents)

    def add(self, request: ParentRequest) -> None:
        if request.request_id in self._parents:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        sequences = []
        for i, child in enumerate(request.children):
            detok = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids, child.sampling_params)
            sequences.append(_Sequence(request.request_id, i, detok))
            self._sequences[child.request_id] = sequences[-1]
        self._parents[request.request_id] = _Parent(request, sequences,
                                                    prompt_token_ids=tuple(request.prompt_token_ids))

    def remove(self, request_id: str) -> list[str]:
        """Forget a caller's request; returns its sequences still running in the engine."""
        parent = self._parents.pop(request_id, None)
        if parent is None:
            return []
        running = []
        for child, seq in zip(parent.request.children, parent.sequences):
            self._sequences.pop(child.request_id, None)
            if seq.finish_reason is None:
                running.append(child.request_id)
        return running

    def request_ids(self) -> list[str]:
        return list(self._parents)

    def process(self, outputs: list[EngineCoreOutput]) -> ProcessedOutputs:
        result = ProcessedOutputs()
        touched: dict[str, int] = {}  # parent -> tokens its sequences took in this call
        for out in outputs:
            seq = self._sequences.get(out.request_id)
            if seq is None or seq.finish_reason is not None:
                continue  # its caller left, or it ended here on a stop string
            parent = self._parents[seq.parent]
            if out.error is not None:
                result.failures.append(self._fail(seq.parent, out.error, result, out.unavailable))
                touched.pop(seq.parent, None)
                continue
            try:
                touched[seq.parent] = touched.get(seq.parent, 0) + self._apply(parent, seq, out, result)
            except Exception as e:
                logger.exception("request %s failed in output processing", seq.parent)
                result.failures.append(self._fail(seq.parent, f"{type(e).__name__}: {e}", result))
                touched.pop(seq.parent, None)
        for parent_id, new_tokens in touched.items():
            parent = self._parents[parent_id]
            sequences = parent.sequences
            done = all(s.finish_reason is not None for s in sequences)
            if done or parent.request.params.output_kind != RequestOutputKind.FINAL_ONLY:
                try:
                    result.request_outputs.append(self._output(parent, done))
                except Exception as e:
                    logger.exception("request %s failed in output processing", parent_id)
                    result.failures.append(self._fail(parent_id, f"{type(e).__name__}: {e}", result))
                    continue
            result.progress.append(Progress(parent_id, new_tokens, tuple(len(s.token_ids) for s in sequences)))
            if done:
                self.remove(parent_id)
        return result

    def _apply(self, parent: _Parent, seq: _Sequence, out: EngineCoreOutput, result: ProcessedOutputs) -> int:
        """Take one engine output of `seq`; returns how many of its tokens were kept."""
        if out.num_cached_tokens is not None:
            parent.num_cached_tokens = max(parent.num_cached_tokens, out.num_cached_tokens)
        if out.queue_time_s is not None and parent.queue_time_s is None:
            parent.queue_time_s = out.queue_time_s
        params = parent.request.children[seq.index].sampling_params
        seq.num_degraded_tokens = out.num_degraded_tokens
        for i, token in enumerate(out.new_token_ids):
            seq.token_ids.append(token)
            if out.new_logprobs is not None:
                seq.logprobs.append(out.new_logprobs[i])
                seq.cumulative_logprob += out.new_logprobs[i][token]
            stop = seq.detokenizer.add_token(token)
            if stop is not None and len(seq.token_ids) >= params.min_tokens:
                seq.finish_reason, seq.stop_reason = "stop", stop
                if out.finish_reason is None:
                    result.aborts.append(parent.request.children[seq.index].request_id)
                return i + 1
        if out.finish_reason is not None:
            seq.finish_reason, seq.stop_reason = out.finish_reason, out.stop_reason
        return len(out.new_token_ids)

    def _fail(self, parent_id: str, message: str, result: ProcessedOutputs, unavailable: bool = False) -> RequestFailure:
        result.aborts.extend(self.remove(parent_id))
        return RequestFailure(parent_id, message, unavailable)

    def _output(self, parent: _Parent, done: bool) -> RequestOutput:
        request = parent.request
        delta_only = request.params.output_kind == RequestOutputKind.DELTA
        completions = []
        for seq in parent.sequences:
            finished = seq.finish_reason is not None
            if finished:
                seq.detokenizer.flush()
            params = request.children[seq.index].sampling_params
            delta_text = seq.detokenizer.take_delta(finished)
            delta_token_ids = tuple(seq.token_ids[seq.sent:])
            logprobs = None
            if params.logprobs is not None:
                logprobs = tuple(seq.logprobs[seq.sent:] if delta_only else seq.logprobs)
            completions.append(CompletionOutput(
                index=seq.index,
                text=delta_text if delta_only else seq.detokenizer.text,
                token_ids=delta_token_ids if delta_only else tuple(seq.token_ids),
                cumulative_logprob=seq.cumulative_logprob if params.logprobs is not None else None,
                logprobs=logprobs,
                finish_reason=seq.finish_reason,
                stop_reason=seq.stop_reason,
                delta_text=delta_text,
                delta_token_ids=delta_token_ids,
                num_degraded_tokens=seq.num_degraded_tokens,
            ))
            seq.sent = len(seq.token_ids)
        return RequestOutput(request.request_id, request.prompt, parent.prompt_token_ids, tuple(completions),
                             done, parent.num_cached_tokens, parent.queue_time_s)
