"""The driver side of N workers in other processes: one ZMQ ROUTER socket, a call broadcast to
every worker, one reply gathered from each (multiproc.py and ray_executor.py only differ in how
the workers are started and watched).

A step's SchedulerOutput is pickled once and sent to every worker; each runs its own requests
and the executor merges their ModelRunnerOutputs (tokens concatenated, expert-load counts
summed over ranks).

Failures reach the caller within seconds, never as a hang:
- a worker that died (its process or actor is gone; polled every 0.5 s) fails the call with
  WorkerFailure naming it;
- a worker that hangs stops answering while its peers' collectives time out (the group's
  timeout) and they answer with errors: once a peer has failed, the others get one more timeout
  to answer, then the silent ones are named in a WorkerFailure;
- a step that raised on some worker fails with WorkerFailure naming none: the group is no
  longer in step and must be rebuilt.
`recover(ranks)` rebuilds: the named workers are killed and started again (their shard read
from the checkpoint, the group's placement maps re-applied), every worker joins a fresh group on
a new rendezvous, and the new workers get the KV cache the others have.
"""

from __future__ import annotations

import dataclasses
import logging
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

logger = logging.getLogger(__name__)
_POLL_MS = 500


def grace_seconds(distributed_timeout: float) -> float:
    """How long the others may stay silent after one worker failed a call: a peer that entered a
    collective just before the failure errors out one group timeout later, plus slack."""
    return 1.5 * distributed_timeout + 2.0


class WorkerFailure(RuntimeError):
    """Workers are gone or silent (`ranks`), or a step failed on the group (`ranks` empty): the
    data-plane group must be rebuilt (`recover`) before another step."""

    def __init__(self, message: str, ranks: list[int] | tuple[int, ...] = ()):
        super().__init__(message)
        self.ranks = tuple(sorted(ranks))


class WorkerCallError(RuntimeError):
    pass


class MultiWorkerExecutor(Executor):
    world_size: int
    grace_s: float = 10.0  # how long the others may stay silent once one worker has failed
    _seq = 0
    _pending: set[int] = frozenset()  # ranks that still owe a reply to the last call
    _num_blocks: int | None = None

    def _open(self, host: str) -> str:
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted worker takes over its rank's identity
        port = self._sock.bind_to_random_port(f"tcp://{host}")
        return f"tcp://{host}:{port}"

    @abstractmethod
    def _dead(self) -> dict[int, str]:
        """rank -> why, for each worker that is gone."""

    @abstractmethod
    def _start_worker(self, rank: int, dist_url: str) -> None:
        """Start (or start again) worker `rank`, joining the group at `dist_url`."""

    @abstractmethod
    def _kill_worker(self, rank: int) -> None: ...

    def _check_dead(self, ranks) -> None:
        dead = {r: why for r, why in self._dead().items() if r in ranks}
        if dead:
            raise WorkerFailure("; ".join(f"worker {r} {why}" for r, why in sorted(dead.items())), list(dead))

    def _poll(self) -> WorkerReply | None:
        if self._sock.poll(_POLL_MS):
            _, data = self._sock.recv_multipart()
            return pickle.loads(data)
        return None

    def _await_hello(self, ranks: list[int], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        waiting = set(ranks)
        while waiting:
            reply = self._poll()
            if reply is not None and reply.value == HELLO:
                waiting.discard(reply.rank)
            self._check_dead(ranks)
            if time.monotonic() > deadline:
                raise WorkerFailure(f"worker(s) {sorted(waiting)} did not start in {timeout:.0f} s", sorted(waiting))

    def _send(self, rank: int, data: bytes) -> None:
        try:
            self._sock.send_multipart([b"w%d" % rank, data])
        except zmq.ZMQError as e:  # its connection is gone (ROUTER_MANDATORY): so is the worker
            raise WorkerFailure(f"worker {rank} is unreachable ({e})", [rank]) from e

    def _call(self, call: WorkerCall, ranks: list[int] | None = None) -> list[Any]:
        """`call` on the given workers (all by default); their results in rank order."""
        ranks = list(range(self.world_size)) if ranks is None else ranks
        self._seq += 1
        call = dataclasses.replace(call, seq=self._seq)
        data = pickle.dumps(call)
        self._check_dead(ranks)
        self._pending = set()  # only the ranks that got the call owe a reply
        for rank in ranks:
            self._send(rank, data)
            self._pending.add(rank)
        replies: dict[int, WorkerReply] = {}
        first_failure = None
        # In a step every worker finishes within a collective's reach of the others: once one has
        # answered, the others get a grace period (ok or not). Control calls (loading a shard,
        # ...) may legitimately differ by more, so there only a failure starts the clock.
        step = call.method == "execute_model"
        while self._pending:
            reply = self._poll()
            if reply is not None and reply.seq == self._seq:
                replies[reply.rank] = reply
                self._pending.discard(reply.rank)
                if (step or not reply.ok) and first_failure is None:
                    first_failure = time.monotonic()
            self._check_dead(ranks)
            if self._pending and first_failure is not None and time.monotonic() - first_failure > self.grace_s:
                raise WorkerFailure(f"worker(s) {sorted(self._pending)} stopped answering (hung)", sorted(self._pending))
        failed = [replies[r] for r in ranks if not replies[r].ok]
        if failed:
            message = f"{call.method} failed on worker {failed[0].rank}: {failed[0].value.splitlines()[0]}"
            if call.method == "execute_model" and self.world_size > 1:
                raise WorkerFailure(message)
            raise WorkerCallError(message)
        return [replies[r].value for r in ranks]

    def initialize_cache(self, num_blocks: int) -> None:
        self._num_blocks = num_blocks
        super().initialize_cache(num_blocks)

    def recover(self, failed: tuple[int, ...]) -> tuple[int, ...]:
        """Rebuild the group after a WorkerFailure (see the module docstring). Returns every rank
        it restarted (those named, and any that died or stayed silent meanwhile): their KV and
        request state are gone. Raises if it cannot, and then nothing more can be served."""
        failed_set = set(failed)
        # the others finish the failed call first (their collectives error out within the timeout)
        deadline = time.monotonic() + self.grace_s + 5
        while self._pending - failed_set and time.monotonic() < deadline:
            reply = self._poll()
            if reply is not None and reply.seq == self._seq:
                self._pending.discard(reply.rank)
            failed_set |= set(self._dead())
        failed_set |= self._pending
        survivors = [r for r in range(self.world_size) if r not in failed_set]
        logger.warning("rebuilding the expert-parallel group: restarting worker(s) %s", sorted(failed_set))
        maps = self._call(WorkerCall("placement_maps"), [survivors[0]])[0] if survivors else None
        for rank in sorted(failed_set):
            self._kill_worker(rank)
        host, port = self._call(WorkerCall("rendezvous"), [0])[0] if 0 in survivors else self._fresh_rendezvous()
        dist_url = f"tcp://{host}:{port}"
        for rank in sorted(failed_set):  # first: they take the longest to reach the rendezvous
            self._start_worker(rank, dist_url)
        self._seq += 1
        rejoin = pickle.dumps(WorkerCall("rejoin_group", (dist_url,), seq=self._seq))
        for rank in survivors:  # they wait in the new group's rendezvous for the new ones
            self._send(rank, rejoin)
        hello, rejoined = set(failed_set), set(survivors)  # both answer on the one socket, in any order
        deadline = time.monotonic() + 180.0
        while hello or rejoined:
            reply = self._poll()
            if reply is not None and reply.value == HELLO:
                hello.discard(reply.rank)
            elif reply is not None and reply.seq == self._seq:
                if not reply.ok:
                    raise WorkerFailure(f"worker {reply.rank} could not rejoin: {reply.value.splitlines()[0]}",
                                        [reply.rank])
                rejoined.discard(reply.rank)
            self._check_dead(range(self.world_size))
            if time.monotonic() > deadline:
                raise WorkerFailure(f"the group was not rebuilt in 180 s (waiting for {sorted(hello | rejoined)})",
                                    sorted(hello | rejoined))
        new = sorted(failed_set)
        self._call(WorkerCall("load_model"), new)
        if maps is not None:  # every worker: a move cut short may have reached some ranks only
            self._call(WorkerCall("set_placement", (maps,)))
        if self._num_blocks is not None:
            self._call(WorkerCall("initialize_cache", (self._num_blocks,)), new)
        return tuple(new)

    def _fresh_rendezvous(self) -> tuple[str, int]:
        raise WorkerFailure("worker 0 is gone and this executor cannot host a new rendezvous", [0])

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return merge_outputs(self._call(WorkerCall("execute_model", (scheduler_output,))))

    def collective_rpc(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        return self._call(WorkerCall(method, args, kwargs))

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
