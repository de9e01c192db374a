"""EngineCore: the step loop on its own thread, behind a small client.

The loop owns the LLMEngine; callers never touch it. Commands (add, abort, shutdown) go through
a queue that the loop drains between steps, so a step never races an add or an abort, and an
abort releases the request's blocks before the next step starts. Each request's outputs go to
its own sink (a callable, called on the loop's thread). When there is no work the loop blocks on
the command queue (no busy wait). Input validation runs on the caller's thread, so a bad
request raises there at once. A request the engine fails on gets a RequestFailedError in its
sink; the loop goes on. Any other exception ends the loop: every request in flight gets an
EngineDeadError at once, and so does every later add, so no caller waits on a dead loop.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

from moeserve.engine.llm_engine import EngineConfig, LLMEngine, Prompt, RequestFailure
from moeserve.outputs import RequestOutput
from moeserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)
_SHUTDOWN = object()
Sink = Callable[[RequestOutput | BaseException], None]


class RequestFailedError(RuntimeError):
    """The engine failed this request (and only this request)."""


class EngineDeadError(RuntimeError):
    """The engine loop has stopped; nothing can be served until the server restarts."""


class RequestStream:
    """A blocking iterator over one request's outputs; ends after the finished one."""

    def __init__(self) -> None:
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
        self._sinks: dict[str, Sink] = {}
        self._lock = threading.Lock()
        self._dead: str | None = None  # why the loop stopped; set once, under the lock
        self._thread = threading.Thread(target=self._loop, name="moeserve-engine-core", daemon=True)
        self._thread.start()

    def is_alive(self) -> bool:
        return self._dead is None and self._thread.is_alive()

    def dead_reason(self) -> str:
        """Why the loop stopped ("" while it runs)."""
        if self._dead is not None:
            return self._dead
        return "" if self._thread.is_alive() else "the engine loop is not running"

    @property
    def num_in_flight(self) -> int:
        with self._lock:
            return len(self._sinks)

    def add_request(self, request_id: str, prompt: Prompt, params: SamplingParams | dict | None = None,
                    priority: int = 0, sink: Sink | None = None) -> RequestStream | None:
        """Queue a request; its outputs go to `sink`, or to the returned RequestStream."""
        group = self.engine.process_request(request_id, prompt, params, priority)  # raises on bad input
        stream = None
        if sink is None:
            stream = RequestStream()
            sink = stream.put
        with self._lock:
            if self._dead is not None:
                raise EngineDeadError(self._dead)
            if request_id in self._sinks:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._sinks[request_id] = sink
        self._commands.put(("add", group))
        return stream

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def shutdown(self, timeout: float = 10.0) -> None:
        self._commands.put(_SHUTDOWN)
        self._thread.join(timeout)

    def _loop(self) -> None:
        reason = "the engine was shut down"
        try:
            self._run()
        except BaseException as e:
            logger.exception("the engine loop died")
            reason = f"the engine loop died: {type(e).__name__}: {e}"
        with self._lock:
            self._dead = reason
            sinks, self._sinks = list(self._sinks.values()), {}
        for sink in sinks:
            sink(EngineDeadError(reason))

    def _run(self) -> None:
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
                failed = isinstance(out, RequestFailure)
                with self._lock:
                    done = failed or out.finished
                    sink = self._sinks.pop(out.request_id, None) if done else self._sinks.get(out.request_id)
                if sink is not None:
                    sink(RequestFailedError(out.message) if failed else out)

    def _apply(self, kind: str, payload: Any) -> None:
        if kind == "add":
            try:
                self.engine.add_processed(payload)
            except ValueError as e:
                with self._lock:
                    sink = self._sinks.pop(payload.request_id, None)
                if sink is not None:
                    sink(e)
        elif kind == "abort":
            self.engine.abort_request(payload)
            with self._lock:
                self._sinks.pop(payload, None)
