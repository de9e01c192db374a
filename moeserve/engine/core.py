"""EngineCore: the step loop on its own thread, behind a small client.

The loop owns the LLMEngine; callers never touch it. Commands (add, abort, shutdown) go through
a queue that the loop drains between steps, so a step never races an add or an abort, and an
abort releases the request's blocks before the next step starts. Each request's outputs go to
its own queue. When there is no work the loop blocks on the command queue (no busy wait).
Input validation runs on the caller's thread, so a bad request raises there at once.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

from moeserve.engine.llm_engine import EngineConfig, LLMEngine, Prompt
from moeserve.outputs import RequestOutput
from moeserve.sampling_params import SamplingParams

_SHUTDOWN = object()


class RequestStream:
    """Outputs of one request, in order; iteration ends after the finished one. An engine-side
    failure arrives as the exception it raised."""

    def __init__(self, request_id: str):
        self.request_id = request_id
        self._queue: queue.Queue[RequestOutput | BaseException] = queue.Queue()

    def put(self, item: RequestOutput | BaseException) -> None:
        self._queue.put(item)

    def get(self, timeout: float | None = None) -> RequestOutput:
        item = self._queue.get(timeout=timeout)
        if isinstance(item, BaseException):
            raise item
        return item

    def __iter__(self) -> Iterator[RequestOutput]:
        while True:
            out = self.get()
            yield out
            if out.finished:
                return


class EngineCoreClient:
    def __init__(self, config: EngineConfig | None = None, engine: LLMEngine | None = None):
        self.engine = engine or LLMEngine(config)
        self._commands: queue.Queue[Any] = queue.Queue()
        self._streams: dict[str, RequestStream] = {}
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="moeserve-engine-core", daemon=True)
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def add_request(self, request_id: str, prompt: Prompt, params: SamplingParams | dict | None = None,
                    priority: int = 0) -> RequestStream:
        group = self.engine.process_request(request_id, prompt, params, priority)  # raises on bad input
        stream = RequestStream(request_id)
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._streams[request_id] = stream
        self._commands.put(("add", group))
        return stream

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def shutdown(self, timeout: float = 10.0) -> None:
        self._commands.put(_SHUTDOWN)
        self._thread.join(timeout)

    def _loop(self) -> None:
        engine = self.engine
        while True:
            block = not engine.has_unfinished_requests()
            try:
                while True:
                    command = self._commands.get(block=block)
                    block = False
                    if command is _SHUTDOWN:
                        return
                    self._apply(*command)
            except queue.Empty:
                pass
            if not engine.has_unfinished_requests():
                continue
            for out in engine.step():
                with self._lock:
                    stream = self._streams.pop(out.request_id, None) if out.finished else self._streams.get(out.request_id)
                if stream is not None:
                    stream.put(out)

    def _apply(self, kind: str, payload: Any) -> None:
        if kind == "add":
            try:
                self.engine.add_processed(payload)
            except ValueError as e:
                with self._lock:
                    stream = self._streams.pop(payload.request_id, None)
                if stream is not None:
                    stream.put(e)
        elif kind == "abort":
            self.engine.abort_request(payload)
            with self._lock:
                self._streams.pop(payload, None)
