"""LLMEngine: the offline engine, all in the caller's process.

    InputProcessor -> EngineCore.step() -> OutputProcessor

the same stages the server runs, with the core in this process instead of behind ZMQ (faster to
start, nothing to serialise). `step()` is the whole loop; a request with n > 1 is reported
under its own id with n completions.
"""

from __future__ import annotations

from moeserve.config import EngineConfig
from moeserve.engine.core import EngineCore
from moeserve.engine.faults import FaultInjector
from moeserve.engine.input_processor import InputProcessor, ParentRequest, Prompt
from moeserve.engine.output_processor import OutputProcessor
from moeserve.generation_config import GenerationDefaults
from moeserve.outputs import RequestFailure, RequestOutput
from moeserve.sampling_params import SamplingParams
from moeserve.tokenizer import Tokenizer


class LLMEngine:
    def __init__(self, config: EngineConfig, faults: FaultInjector | None = None):
        self.config = config
        self.core = EngineCore(config, faults)
        self.tokenizer = Tokenizer(config.model)
        self.input = InputProcessor(self.tokenizer, self.core.info)
        self.output = OutputProcessor(self.tokenizer)

    @property
    def max_model_len(self) -> int:
        return self.core.max_model_len

    @property
    def generation_defaults(self) -> GenerationDefaults:
        return self.core.info.generation_defaults

    def process_request(self, request_id: str, prompt: Prompt, params: SamplingParams | dict | None = None,
                        priority: int = 0) -> ParentRequest:
        """Validate and tokenise; raises ValueError naming the problem, touching no engine state."""
        return self.input.process(request_id, prompt, params, priority)

    def add_processed(self, request: ParentRequest) -> None:
        self.output.add(request)
        try:
            for child in request.children:
                self.core.add_request(child)
        except ValueError:
            self.abort_request(request.request_id)
            raise

    def add_request(self, request_id: str, prompt: Prompt, params: SamplingParams | dict | None = None,
                    priority: int = 0) -> None:
        self.add_processed(self.process_request(request_id, prompt, params, priority))

    def abort_request(self, request_id: str) -> None:
        """Abort a caller's request (all its samples); its blocks are free when this returns."""
        self.core.abort_requests(self.output.remove(request_id))

    def has_unfinished_requests(self) -> bool:
        return len(self.output) > 0

    def step(self) -> list[RequestOutput | RequestFailure]:
        """One engine step. A failure in the batch's forward fails the requests of that batch;
        one in a request's own output processing fails that request alone. Either way the
        failed requests are released and the engine stays usable."""
        early = []
        if self.core.needs_recovery:  # lost in a control call since the last step
            self.core.recover()
            early = self.core.take_failed()
        outputs = early + self.core.step().outputs
        if self.core.needs_recovery:  # a lost expert-parallel worker: its requests failed above
            self.core.recover()
            outputs = outputs + self.core.take_failed()
        processed = self.output.process(outputs)
        if processed.aborts:
            self.core.abort_requests(processed.aborts)
        return [*processed.request_outputs, *processed.failures]
