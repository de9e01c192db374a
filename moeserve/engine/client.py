"""The front's handle on one engine: the EngineClient protocol, and MPEngineClient, which runs an
EngineCore in a process of its own and talks to it over ZMQ.

    add(requests)  abort(ids)  await call(method, *args)      front -> engine
    on_outputs(EngineCoreOutputs)  on_dead(reason)             engine -> front (callbacks, on
                                                               the front's event loop)

A front may hold several clients (one per hosted model); nothing here is global. The engine
process is watched through its sentinel: if it exits without a word (kill -9, out of memory),
`on_dead` fires within a fraction of a second, every later `add` raises EngineDeadError and
every pending call fails. The front does not restart a dead engine (as vLLM does not): it keeps
answering 503 and /health says so, which is what an orchestrator (Kubernetes, Ray Serve)
restarts a server on.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from typing import Any, Protocol

import msgspec
import zmq
import zmq.asyncio

from moeserve.config import EngineConfig
from moeserve.engine.core_proc import CoreAddresses, run_engine_core
from moeserve.engine.messages import (
    AbortRequests,
    Codec,
    EngineCoreOutputs,
    EngineCoreRequest,
    EngineDead,
    EngineInfo,
    Shutdown,
    StartFailed,
    UtilityCall,
    UtilityResult,
)
from moeserve.errors import EngineDeadError, EngineStartError

logger = logging.getLogger(__name__)
OutputsCallback = Callable[[EngineCoreOutputs], None]
DeadCallback = Callable[[str], None]
# After the process exits, how long to wait for its own last word (EngineDead) before
# reporting the exit itself.
_LAST_WORD_S = 0.05


class EngineClient(Protocol):
    info: EngineInfo

    def add(self, requests: list[EngineCoreRequest]) -> None: ...

    def abort(self, request_ids: list[str]) -> None: ...

    async def call(self, method: str, *args: Any, result_type: type | None = None) -> Any: ...

    def is_alive(self) -> bool: ...

    def dead_reason(self) -> str: ...

    def shutdown(self, timeout: float = 10.0) -> None: ...


class MPEngineClient:
    """Start with `await MPEngineClient.start(config, on_outputs, on_dead)` from the event loop
    that will receive the callbacks."""

    def __init__(self) -> None:
        raise TypeError("use `await MPEngineClient.start(...)`")

    @classmethod
    async def start(cls, config: EngineConfig, on_outputs: OutputsCallback, on_dead: DeadCallback,
                    log_level: str = "info") -> MPEngineClient:
        self = cls.__new__(cls)
        self._loop = asyncio.get_running_loop()
        self._on_outputs, self._on_dead = on_outputs, on_dead
        self._dead: str | None = None
        self._stopping = False
        self._calls: dict[int, asyncio.Future] = {}
        self._call_ids = itertools.count()
        self._codec = Codec()
        self._dir = tempfile.mkdtemp(prefix="moeserve-engine-")
        addresses = CoreAddresses(f"ipc://{self._dir}/input", f"ipc://{self._dir}/output")
        self._sync_ctx = zmq.Context()
        self._commands = self._sync_ctx.socket(zmq.PUSH)  # sends never block the event loop
        self._commands.setsockopt(zmq.SNDHWM, 0)
        self._commands.setsockopt(zmq.LINGER, 0)
        self._commands.bind(addresses.input)
        self._ctx = zmq.asyncio.Context()
        self._results = self._ctx.socket(zmq.PULL)
        self._results.setsockopt(zmq.LINGER, 0)
        self._results.bind(addresses.output)
        spawn = multiprocessing.get_context("spawn")
        self.process = spawn.Process(target=run_engine_core, name="moeserve-engine",
                                     args=(config, addresses, os.getpid(), log_level))
        self.process.start()
        try:
            self.info = await self._wait_ready()
        except BaseException:
            self._close(kill=True)
            raise
        threading.Thread(target=self._watch_process, name="moeserve-engine-watch", daemon=True).start()
        self._reader = asyncio.ensure_future(self._read())
        return self

    async def _wait_ready(self) -> EngineInfo:
        while True:
            if await self._results.poll(200):
                message = self._codec.decode(await self._results.recv_multipart())
                if isinstance(message, EngineInfo):
                    return message
                if isinstance(message, StartFailed):
                    raise EngineStartError(message.message)
                raise EngineStartError(f"unexpected first message from the engine: {type(message).__name__}")
            if not self.process.is_alive():
                raise EngineStartError(f"the engine process exited during start ({_exit_text(self.process.exitcode)})")

    # ---- front -> engine ----

    def add(self, requests: list[EngineCoreRequest]) -> None:
        if not self.is_alive():
            raise EngineDeadError(self.dead_reason())
        for request in requests:
            self._commands.send_multipart(self._codec.encode(request))

    def abort(self, request_ids: list[str]) -> None:
        if self.is_alive() and request_ids:
            self._commands.send_multipart(self._codec.encode(AbortRequests(list(request_ids))))

    async def call(self, method: str, *args: Any, result_type: type | None = None) -> Any:
        """A control call on the engine (EngineCore.call); raises ValueError if it refused. The
        result comes back as plain msgpack data, or typed as `result_type` (e.g. EngineStats)."""
        if not self.is_alive():
            raise EngineDeadError(self.dead_reason())
        call_id = next(self._call_ids)
        future = self._calls[call_id] = self._loop.create_future()
        self._commands.send_multipart(self._codec.encode(UtilityCall(call_id, method, list(args))))
        result = await future
        return result if result_type is None else msgspec.convert(result, result_type)

    # ---- engine -> front ----

    async def _read(self) -> None:
        while True:
            try:
                frames = await self._results.recv_multipart()
            except (asyncio.CancelledError, zmq.ZMQError):
                return
            message = self._codec.decode(frames)
            if isinstance(message, EngineCoreOutputs):
                try:
                    self._on_outputs(message)
                except Exception:
                    logger.exception("processing engine outputs failed")
            elif isinstance(message, UtilityResult):
                future = self._calls.pop(message.call_id, None)
                if future is not None and not future.done():
                    if message.error is None:
                        future.set_result(message.result)
                    else:
                        future.set_exception(ValueError(message.error))
            elif isinstance(message, EngineDead):
                self._die(f"the engine failed: {message.message}")

    def _watch_process(self) -> None:
        multiprocessing.connection.wait([self.process.sentinel])
        self.process.join(1.0)  # reap it, so that its exit code is known
        if not self._stopping:
            reason = f"the engine process exited ({_exit_text(self.process.exitcode)})"
            self._loop.call_soon_threadsafe(self._loop.call_later, _LAST_WORD_S, self._die, reason)

    def _die(self, reason: str) -> None:
        if self._dead is not None or self._stopping:
            return
        logger.error("%s", reason)
        self._dead = reason
        calls, self._calls = self._calls, {}
        for future in calls.values():
            if not future.done():
                future.set_exception(EngineDeadError(reason))
        self._on_dead(reason)

    # ---- state ----

    def is_alive(self) -> bool:
        return self._dead is None and not self._stopping

    def dead_reason(self) -> str:
        return self._dead or ("the engine was shut down" if self._stopping else "")

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine process: ask, wait up to `timeout`, then kill."""
        if self._stopping:
            return
        self._stopping = True
        if self.process.is_alive():
            self._commands.send_multipart(self._codec.encode(Shutdown()))
            self.process.join(timeout)
        self._close(kill=True)

    def _close(self, kill: bool) -> None:
        if kill and self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        reader = getattr(self, "_reader", None)
        if reader is not None:
            reader.cancel()
        self._results.close()
        self._commands.close()
        self._ctx.term()
        self._sync_ctx.term()
        shutil.rmtree(self._dir, ignore_errors=True)


def _exit_text(code: int | None) -> str:
    if code is None:
        return "still running"
    return f"killed by signal {-code}" if code < 0 else f"exit code {code}"
