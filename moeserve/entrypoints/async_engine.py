"""AsyncEngine: asyncio streams over the EngineCore client, for the HTTP and gRPC fronts.

The step loop runs on the EngineCore thread; this side only queues requests and awaits outputs,
so health checks, streaming and rejections never wait for a step. Outputs cross threads by
`loop.call_soon_threadsafe`. Leaving a stream early (client gone, deadline, cancellation)
aborts the request; the engine frees its blocks before its next step. Request-level metrics are
observed here, where arrival and delivery times are known.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator

from moeserve.engine.core import EngineCoreClient
from moeserve.engine.llm_engine import Prompt
from moeserve.metrics import ServerMetrics
from moeserve.outputs import RequestOutput
from moeserve.sampling_params import SamplingParams


class AsyncEngine:
    def __init__(self, client: EngineCoreClient, metrics: ServerMetrics):
        self.client = client
        self.engine = client.engine
        self.metrics = metrics
        self._ids = itertools.count()

    def new_request_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}-{time.monotonic_ns() % 10**9}"

    def is_alive(self) -> bool:
        return self.client.is_alive()

    def dead_reason(self) -> str:
        return self.client.dead_reason()

    def validate(self, request_id: str, prompt: Prompt, params: SamplingParams) -> None:
        """Raise ValueError for input the engine would refuse, without queueing anything."""
        self.engine.process_request(request_id, prompt, params)

    async def generate(self, request_id: str, prompt: Prompt, params: SamplingParams,
                       priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as the engine produces them. Raises ValueError at once for bad
        input, RequestFailedError if the engine fails the request, EngineDeadError if the engine
        stops (before or while it runs)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        start = time.monotonic()
        self.client.add_request(request_id, prompt, params, priority,
                                sink=lambda item: loop.call_soon_threadsafe(queue.put_nowait, item))
        finished = False
        first = last = None
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    self.metrics.request_failure.labels(self.metrics.model_name).inc()
                    raise item
                now = time.monotonic()
                new_tokens = sum(len(o.delta_token_ids) for o in item.outputs)
                if new_tokens:
                    if first is None:
                        first = now
                        self.metrics.ttft.labels(self.metrics.model_name).observe(now - start)
                    else:
                        self.metrics.itl.labels(self.metrics.model_name).observe(now - last)
                    last = now
                    self.metrics.generation_tokens.labels(self.metrics.model_name).inc(new_tokens)
                if item.finished:
                    finished = True
                    self._observe_finished(item, start, first, now)
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.client.abort(request_id)

    def _observe_finished(self, out: RequestOutput, start: float, first: float | None, now: float) -> None:
        m, name = self.metrics, self.metrics.model_name
        m.e2e.labels(name).observe(now - start)
        m.prompt_tokens.labels(name).inc(len(out.prompt_token_ids))
        if out.queue_time_s is not None:
            m.queue_time.labels(name).observe(out.queue_time_s)
        for o in out.outputs:
            m.request_success.labels(name, o.finish_reason).inc()
            if first is not None and len(o.token_ids) > 1:
                m.tpot.labels(name).observe((now - first) / (len(o.token_ids) - 1))
