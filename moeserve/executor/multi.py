"""The driver side of N workers in other processes: one ZMQ ROUTER socket, a call broadcast to
every worker, one reply gathered from each (multiproc.py and ray_executor.py only differ in how
the workers are started and watched).

A step's SchedulerOutput is pickled once and sent to every worker; each runs its own requests
and the executor merges their ModelRunnerOutputs (tokens concatenated, expert-load counts
summed over ranks). A worker that died is noticed while waiting (`_dead` polls every 0.5 s) and
the call fails with WorkerDiedError naming it; a worker whose call raised fails the call with
its error text. Either way the caller gets an exception within seconds, never a hang.
"""

from __future__ import annotations

import pickle
import time
from abc import abstractmethod
from typing import Any

import zmq

from moeserve.engine.messages import ExpertLoadStats
from moeserve.engine.scheduler import SchedulerOutput
from moeserve.executor import Executor
from moeserve.executor.worker_proc import HELLO, STOP, WorkerCall, WorkerReply
from moeserve.worker.model_runner import ModelRunnerOutput

_POLL_MS = 500


class WorkerDiedError(RuntimeError):
    pass


class WorkerCallError(RuntimeError):
    pass


class MultiWorkerExecutor(Executor):
    world_size: int

    def _open(self, host: str) -> str:
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        port = self._sock.bind_to_random_port(f"tcp://{host}")
        return f"tcp://{host}:{port}"

    @abstractmethod
    def _dead(self) -> str | None:
        """A sentence naming a worker that is gone, or None."""

    def _recv(self, deadline: float | None) -> WorkerReply:
        while True:
            if self._sock.poll(_POLL_MS):
                _, data = self._sock.recv_multipart()
                return pickle.loads(data)
            dead = self._dead()
            if dead is not None:
                raise WorkerDiedError(dead)
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError("a worker did not answer in time")

    def _await_hello(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        seen: set[int] = set()
        while len(seen) < self.world_size:
            reply = self._recv(deadline)
            if reply.value != HELLO:
                raise WorkerCallError(f"worker {reply.rank} said {reply.value!r} before hello")
            seen.add(reply.rank)

    def _call_all(self, call: WorkerCall) -> list[Any]:
        data = pickle.dumps(call)
        for rank in range(self.world_size):
            self._sock.send_multipart([b"w%d" % rank, data])
        replies: list[WorkerReply | None] = [None] * self.world_size
        for _ in range(self.world_size):
            reply = self._recv(None)
            replies[reply.rank] = reply
        failed = [r for r in replies if not r.ok]
        if failed:
            first = failed[0].value.splitlines()[0]
            raise WorkerCallError(f"{call.method} failed on worker {failed[0].rank}: {first}")
        return [r.value for r in replies]

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return merge_outputs(self._call_all(WorkerCall("execute_model", (scheduler_output,))))

    def collective_rpc(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        return self._call_all(WorkerCall(method, args, kwargs))

    def _stop_workers(self) -> None:
        data = pickle.dumps(STOP)
        for rank in range(self.world_size):
            try:
                self._sock.send_multipart([b"w%d" % rank, data], flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # already gone

    def _close(self) -> None:
        self._sock.close()
        self._ctx.term()


def merge_outputs(outputs: list[ModelRunnerOutput]) -> ModelRunnerOutput:
    """One step's results from every rank: each request appears on exactly one rank."""
    loads = [o.expert_load for o in outputs if o.expert_load is not None]
    load = None
    if loads:
        load = ExpertLoadStats(
            logical=[[sum(col) for col in zip(*rows)] for rows in zip(*(x.logical for x in loads))],
            gate_entropy=[sum(v) for v in zip(*(x.gate_entropy for x in loads))],
            num_tokens=sum(x.num_tokens for x in loads),
            overflow=[[sum(col) for col in zip(*rows)] for rows in zip(*(x.overflow for x in loads))],
        )
    return ModelRunnerOutput(
        req_ids=[r for o in outputs for r in o.req_ids],
        sampled_token_ids=[t for o in outputs for t in o.sampled_token_ids],
        logprobs=[lp for o in outputs for lp in o.logprobs],
        expert_load=load,
    )
