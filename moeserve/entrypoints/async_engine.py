"""AsyncEngine: the front's view of one engine, shared by the HTTP and gRPC fronts.

    generate(): InputProcessor (tokenise, validate, n -> sequences) -> EngineClient.add
                ... engine outputs -> OutputProcessor (detokenise, stop strings) -> this
                request's collector -> the caller's async iterator

Everything here runs on the front's event loop and never waits on a step: the engine runs in
its own process (EngineClient). Engine outputs arrive as a callback on the loop; each caller's
request has its own collector, which merges outputs the caller has not taken yet. Leaving a
stream early (client gone, deadline, cancellation) aborts the request; the engine frees its
blocks before its next step. Request-level metrics are observed here, where arrival and
delivery times are known; the engine's stats (sent with each step) feed the gauges and the
expert-load monitor. If the engine dies, every request in flight gets EngineDeadError at once.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from moeserve.config import AdmissionConfig, EngineConfig
from moeserve.engine.client import EngineClient, MPEngineClient
from moeserve.engine.input_processor import InputProcessor, Prompt
from moeserve.engine.load_monitor import LoadMonitor
from moeserve.engine.messages import EngineCoreOutputs, EngineStats
from moeserve.engine.output_processor import OutputProcessor
from moeserve.entrypoints.admission import DEFAULT_TENANT, AdmissionController, AdmissionPolicy, AdmissionRejected
from moeserve.errors import EngineDeadError, RequestFailedError
from moeserve.metrics import ServerMetrics
from moeserve.outputs import RequestOutput, merge_outputs
from moeserve.sampling_params import RequestOutputKind, SamplingParams
from moeserve.tokenizer import Tokenizer

_RECOVERY_RETRY_S = 5  # Retry-After while lost expert-parallel workers are rebuilt


class _Collector:
    """One caller's request: what the engine produced that the caller has not taken yet. While
    the caller is busy, new outputs merge into the pending one (as vLLM's output collector
    does), so a slow consumer gets fewer, larger deltas instead of a growing queue and the
    front's work per step stays bounded. An error replaces whatever is pending. It also keeps
    the request's timing for the token metrics, which every step updates whether or not an
    output reaches the caller (output_kind FINAL_ONLY sends one)."""

    def __init__(self, delta: bool) -> None:
        self._pending: RequestOutput | BaseException | None = None
        self._ready = asyncio.Event()
        self._delta = delta  # outputs hold deltas only (output_kind DELTA): merging joins them
        self.start = time.monotonic()
        self.first: float | None = None  # when its first token arrived
        self.last: float | None = None  # when its latest token arrived
        self.generated: tuple[int, ...] = ()  # per sequence: tokens produced so far

    def put(self, item: RequestOutput | BaseException) -> None:
        pending = self._pending
        if isinstance(pending, RequestOutput) and isinstance(item, RequestOutput):
            self._pending = merge_outputs(pending, item, self._delta)
        elif not isinstance(pending, BaseException):
            self._pending = item
        self._ready.set()

    async def get(self) -> RequestOutput | BaseException:
        await self._ready.wait()
        item, self._pending = self._pending, None
        self._ready.clear()
        return item


@dataclass(frozen=True)
class Submitted:
    """A request the engine has; read its outputs with AsyncEngine.stream."""

    request_id: str
    predicted_ttft: float | None  # seconds, from the admission predictor (None before the first step)


class AsyncEngine:
    def __init__(self) -> None:
        raise TypeError("use `await AsyncEngine.start(...)`")

    @classmethod
    async def start(cls, config: EngineConfig, model_name: str, log_level: str = "info",
                    admission: AdmissionConfig | None = None) -> AsyncEngine:
        """Start the engine process and wait until it is ready (EngineStartError if it cannot)."""
        policy = AdmissionPolicy.from_config(admission or AdmissionConfig())  # a bad quota file fails first
        self = cls.__new__(cls)
        self._queues: dict[str, _Collector] = {}
        self._ids = itertools.count()
        self.latest_stats: EngineStats | None = None
        self.death_listeners: list[Callable[[str], None]] = []
        self.availability_listeners: list[Callable[[bool], None]] = []  # rebuilding workers: False, then True
        self.client: EngineClient = await MPEngineClient.start(config, self._on_outputs, self._on_dead, log_level)
        try:
            info = self.info = self.client.info
            self.tokenizer = Tokenizer(config.model)
            self.input = InputProcessor(self.tokenizer, info)
            self.output = OutputProcessor(self.tokenizer)
            self.load_monitor = LoadMonitor(len(info.moe_layer_ids), info.num_experts)
            self.admission = AdmissionController(policy, info, lambda: self.latest_stats)
            self.metrics = ServerMetrics(info, lambda: self.latest_stats, self.load_monitor, model_name,
                                         config.control.expert_metrics, self.admission)
            self.latest_stats = self.latest_stats or await self.client.call("stats", result_type=EngineStats)
        except BaseException:
            self.client.shutdown()  # no engine process outlives a front that failed to start
            raise
        return self

    @property
    def max_model_len(self) -> int:
        return self.info.max_model_len

    @property
    def num_in_flight(self) -> int:
        return len(self._queues)

    def generated(self, request_id: str) -> int | None:
        """Tokens a request in flight has produced (all its sequences); None before its first."""
        collector = self._queues.get(request_id)
        return sum(collector.generated) if collector is not None and collector.first is not None else None

    def new_request_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}-{time.monotonic_ns() % 10**9}"

    def is_alive(self) -> bool:
        return self.client.is_alive()

    def dead_reason(self) -> str:
        return self.client.dead_reason()

    def unavailable_reason(self) -> str | None:
        """Why the engine cannot serve for now (rebuilding lost workers), None when it can."""
        stats = self.latest_stats
        return stats.unavailable if stats is not None else None

    def validate(self, token_ids: list[int]) -> None:
        """Raise ValueError for a prompt the engine would refuse, without queueing anything."""
        self.input.validate(token_ids)

    def submit(self, request_id: str, prompt: Prompt, params: SamplingParams, priority: int = 0,
               tenant: str = DEFAULT_TENANT) -> Submitted:
        """Validate, admit and hand one request to the engine; its outputs are then read with
        `stream`. Raises at once, with nothing queued: ValueError for bad input,
        AdmissionRejected (429/503) when admission control refuses it, EngineDeadError if the
        engine has stopped. Queued requests of a lower class may be dropped to admit it."""
        request = self.input.process(request_id, prompt, params, priority)
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already in use")
        if not self.is_alive():
            raise EngineDeadError(self.dead_reason())
        if self.unavailable_reason() is not None:
            self.metrics.reject("recovering", tenant)
            raise AdmissionRejected(503, "recovering", self.unavailable_reason(), _RECOVERY_RETRY_S)
        sequences, prompt_tokens = len(request.children), len(request.prompt_token_ids)
        max_tokens = params.max_tokens or self.info.max_model_len - prompt_tokens
        try:
            if self.admission.config.enabled:
                predicted, dropped = self.admission.admit(request_id, tenant, priority, prompt_tokens, sequences,
                                                          max_tokens)
            else:
                predicted, dropped = self.admission.predict_ttft(priority, sequences * prompt_tokens, sequences), []
                self.admission.track(request_id, tenant, priority, prompt_tokens, sequences, max_tokens)
        except AdmissionRejected as e:
            self.metrics.reject(e.reason, tenant)
            raise
        self.metrics.admitted(tenant, predicted)
        self.output.add(request)
        self._queues[request_id] = _Collector(request.params.output_kind == RequestOutputKind.DELTA)
        try:
            self.client.add(request.children)
        except EngineDeadError:
            self._forget(request_id)
            raise
        for victim in dropped:
            self._drop(victim)
        return Submitted(request_id, predicted)

    async def admitted(self, submitted: Submitted) -> Submitted:
        """`submit` admits here and now: nothing to wait for (a replica set's front waits)."""
        return submitted

    async def stream(self, submitted: Submitted) -> AsyncIterator[RequestOutput]:
        """Outputs of a submitted request as the engine produces them (those the caller has not
        taken yet arrive merged). Raises RequestFailedError if the engine fails the request,
        EngineDeadError if the engine stops, AdmissionRejected if it is dropped from the queue.
        Leaving early aborts the request."""
        request_id = submitted.request_id
        queue = self._queues[request_id]
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True  # nothing of it is left in the engine
                    if isinstance(item, RequestFailedError):
                        self.metrics.model_series.request_failure.inc()
                    raise item
                if item.finished:
                    finished = True
                    self._observe_finished(item, queue)
                yield item
                if finished:
                    return
        finally:
            running = self._forget(request_id)
            if not finished:
                self.client.abort(running)

    async def generate(self, request_id: str, prompt: Prompt, params: SamplingParams, priority: int = 0,
                       tenant: str = DEFAULT_TENANT) -> AsyncIterator[RequestOutput]:
        """`submit` then `stream`, as one iterator."""
        submitted = self.submit(request_id, prompt, params, priority, tenant)
        async for out in self.stream(submitted):
            yield out

    def cancel(self, submitted: Submitted) -> None:
        """Give up a submitted request that will not be streamed."""
        self.client.abort(self._forget(submitted.request_id))

    def _forget(self, request_id: str) -> list[str]:
        """Drop the request from the front; returns its sequences still running in the engine."""
        self._queues.pop(request_id, None)
        self.admission.finished(request_id)
        return self.output.remove(request_id)

    def _drop(self, request_id: str) -> None:
        """Take a queued request out to make room for a higher class: aborted in the engine, and
        its caller told so as a 503."""
        queue = self._queues.get(request_id)
        self.metrics.reject("dropped", self.admission.tenant_of(request_id))
        self.client.abort(self._forget(request_id))
        self._queues[request_id] = queue  # its stream still reads the rejection, then forgets it
        queue.put(AdmissionRejected(503, "dropped", "dropped from the queue to admit a higher-priority request",
                                    self.admission.retry_after()))

    # ---- callbacks from the engine client (on the event loop) ----

    def _on_outputs(self, outputs: EngineCoreOutputs) -> None:
        if outputs.stats is not None:
            was = self.unavailable_reason()
            self.latest_stats = outputs.stats
            if (was is None) != (outputs.stats.unavailable is None):
                for listener in self.availability_listeners:
                    listener(outputs.stats.unavailable is None)
            if outputs.stats.expert_load is not None:
                self.load_monitor.update(outputs.stats.expert_load)
        if not outputs.outputs:
            return
        processed = self.output.process(outputs.outputs)
        now, series = time.monotonic(), self.metrics.model_series
        for progress in processed.progress:
            collector = self._queues.get(progress.request_id)
            if collector is None:
                continue
            self.admission.progress(progress.request_id, sum(progress.generated))
            collector.generated = progress.generated
            if progress.new_tokens:
                if collector.first is None:
                    collector.first = now
                    series.ttft.observe(now - collector.start)
                else:
                    series.itl.observe(now - collector.last)
                collector.last = now
                series.generation_tokens.inc(progress.new_tokens)
        for out in processed.request_outputs:
            queue = self._queues.get(out.request_id)
            if queue is not None:
                queue.put(out)
        for failure in processed.failures:
            queue = self._queues.get(failure.request_id)
            if queue is not None:
                if failure.unavailable:  # a worker was lost: retry once the engine has rebuilt it
                    queue.put(AdmissionRejected(503, "worker_failure", failure.message, _RECOVERY_RETRY_S))
                else:
                    queue.put(RequestFailedError(failure.message))
        self.client.abort(processed.aborts)

    def _on_dead(self, reason: str) -> None:
        for queue in self._queues.values():
            queue.put(EngineDeadError(reason))
        for listener in self.death_listeners:
            listener(reason)

    def _observe_finished(self, out: RequestOutput, collector: _Collector) -> None:
        m, name, now = self.metrics, self.metrics.model_name, time.monotonic()
        m.e2e.labels(name).observe(now - collector.start)
        m.prompt_tokens.labels(name).inc(len(out.prompt_token_ids))
        if out.queue_time_s is not None:
            m.queue_time.labels(name).observe(out.queue_time_s)
        for o, generated in zip(out.outputs, collector.generated):
            m.request_success.labels(name, o.finish_reason).inc()
            if collector.first is not None and generated > 1:
                m.tpot.labels(name).observe((now - collector.first) / (generated - 1))

    def shutdown(self) -> None:
        self.client.shutdown()
