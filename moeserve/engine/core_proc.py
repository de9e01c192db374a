"""The engine process: one EngineCore behind two ZMQ sockets.

    front --PUSH--> [PULL input]   EngineCoreRequest, AbortRequests, UtilityCall, Shutdown
    front <--PULL-- [PUSH output]  EngineInfo | StartFailed, then EngineCoreOutputs, UtilityResult,
                                   and EngineDead as its last word if the core fails

The loop: take every command waiting (blocking while there is no work, waking each second to
check that the front is still there), then run one step and send its outputs and stats. A
command that changed the engine while it has no work is answered with fresh stats, so the
front's gauges (free blocks after an abort) are never stale.

The process ignores SIGINT (Ctrl-C reaches the whole process group; the front shuts the core
down in order) and dies with its parent (PR_SET_PDEATHSIG on Linux, and the parent check).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
from dataclasses import dataclass

import zmq

from moeserve.config import EngineConfig
from moeserve.engine.messages import (
    AbortRequests,
    Codec,
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    EngineDead,
    Shutdown,
    StartFailed,
    UtilityCall,
    UtilityResult,
)

logger = logging.getLogger("moeserve.engine")
_PARENT_CHECK_MS = 1000


@dataclass(frozen=True)
class CoreAddresses:
    input: str  # the front binds, the core connects
    output: str


def run_engine_core(config: EngineConfig, addresses: CoreAddresses, parent_pid: int, log_level: str) -> None:
    """Entry point of the engine process (multiprocessing, spawn)."""
    logging.basicConfig(level=getattr(logging, log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s[engine]: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    ctx = zmq.Context()
    commands = ctx.socket(zmq.PULL)
    commands.connect(addresses.input)
    results = ctx.socket(zmq.PUSH)
    results.setsockopt(zmq.SNDHWM, 0)
    results.setsockopt(zmq.LINGER, 5000)
    results.connect(addresses.output)
    codec = Codec()
    try:
        from moeserve.engine.core import EngineCore

        core = EngineCore(config)
    except Exception as e:
        logger.exception("the engine could not start")
        results.send_multipart(codec.encode(StartFailed(str(e) if isinstance(e, ValueError)
                                                        else f"{type(e).__name__}: {e}")))
        ctx.destroy(linger=5000)
        sys.exit(1)
    results.send_multipart(codec.encode(core.info))
    try:
        EngineCoreProc(core, commands, results, codec, parent_pid).run()
    except BaseException as e:
        logger.exception("the engine loop died")
        results.send_multipart(codec.encode(EngineDead(f"{type(e).__name__}: {e}")))
        ctx.destroy(linger=5000)
        sys.exit(1)
    core.shutdown()
    ctx.destroy(linger=5000)


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass  # the parent check in the loop still ends an orphaned core


class EngineCoreProc:
    def __init__(self, core, commands: zmq.Socket, results: zmq.Socket, codec: Codec, parent_pid: int):
        self.core, self.commands, self.results, self.codec = core, commands, results, codec
        self.parent_pid = parent_pid

    def run(self) -> None:
        core = self.core
        while True:
            changed = False
            timeout = 0 if core.has_work() else _PARENT_CHECK_MS
            while self.commands.poll(timeout):
                if not self._handle(self.codec.decode(self.commands.recv_multipart())):
                    return
                changed, timeout = True, 0
            if core.needs_recovery:  # a worker was lost in a control call
                self._recover()
            elif core.has_work():
                self._send(core.step())
                if core.needs_recovery:
                    self._recover()
            elif changed:
                self._send(EngineCoreOutputs([], core.stats()))
            elif os.getppid() != self.parent_pid:
                logger.warning("the front (pid %d) is gone: the engine stops", self.parent_pid)
                return

    def _recover(self) -> None:
        """Tell the front what failed and why (it answers 503 meanwhile), rebuild, say so."""
        self._send(EngineCoreOutputs(self.core.take_failed(), self.core.stats()))
        self.core.recover()
        self._send(EngineCoreOutputs(self.core.take_failed(), self.core.stats()))

    def _handle(self, message) -> bool:
        """Apply one command; False means stop."""
        if isinstance(message, EngineCoreRequest):
            try:
                self.core.add_request(message)
            except ValueError as e:
                self._send(EngineCoreOutputs([EngineCoreOutput(message.request_id, error=str(e))]))
        elif isinstance(message, AbortRequests):
            self.core.abort_requests(message.request_ids)
        elif isinstance(message, UtilityCall):
            try:
                result = UtilityResult(message.call_id, self.core.call(message.method, *message.args))
            except (ValueError, TypeError) as e:
                result = UtilityResult(message.call_id, error=f"{type(e).__name__}: {e}")
            self._send(result)
        elif isinstance(message, Shutdown):
            return False
        return True

    def _send(self, message) -> None:
        self.results.send_multipart(self.codec.encode(message), copy=False)
