"""MultiprocExecutor: N expert-parallel workers as processes on this host, no Ray (tests, one
machine without a Ray install). Ray's executor is the one for clusters."""

from __future__ import annotations

import atexit
import multiprocessing

from moeserve.config import EngineConfig
from moeserve.engine.faults import FaultInjector
from moeserve.executor.multi import MultiWorkerExecutor, grace_seconds
from moeserve.executor.worker_proc import free_port, run_worker

_START_TIMEOUT_S = 120.0


class MultiprocExecutor(MultiWorkerExecutor):
    def __init__(self, config: EngineConfig, faults: FaultInjector | None = None):
        self.config = config
        self.world_size = config.parallel.world_size
        self.grace_s = grace_seconds(config.parallel.distributed_timeout)
        self._address = self._open("127.0.0.1")
        dist_url = f"tcp://127.0.0.1:{free_port('127.0.0.1')}"
        self.procs: list[multiprocessing.Process | None] = [None] * self.world_size
        self._closed = False
        atexit.register(self.shutdown)  # before multiprocessing joins its children at exit
        for rank in range(self.world_size):
            self._start_worker(rank, dist_url)
        try:
            self._await_hello(list(range(self.world_size)), _START_TIMEOUT_S)
            self.model_config = self.collective_rpc("load_model")[0]
        except BaseException:
            self.shutdown()
            raise

    def _start_worker(self, rank: int, dist_url: str) -> None:
        spawn = multiprocessing.get_context("spawn")
        p = spawn.Process(target=_worker_main, name=f"moeserve-worker-{rank}",
                          args=(self.config, rank, dist_url, self._address, self.procs[rank] is not None))
        p.start()
        self.procs[rank] = p

    def _kill_worker(self, rank: int) -> None:
        p = self.procs[rank]
        if p is not None and p.is_alive():
            p.kill()
        if p is not None:
            p.join(5)

    def _fresh_rendezvous(self) -> tuple[str, int]:
        return "127.0.0.1", free_port("127.0.0.1")

    def _dead(self) -> dict[int, str]:
        return {rank: f"(pid {p.pid}) exited with {p.exitcode}" for rank, p in enumerate(self.procs)
                if p is not None and not p.is_alive()}

    def worker_pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.shutdown)
        self._stop_workers()
        for p in self.procs:
            if p is None:
                continue
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
        self._close()


def _worker_main(config: EngineConfig, rank: int, dist_url: str, address: str, restarted: bool) -> None:
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # die with the engine
    except OSError:
        pass
    run_worker(config, rank, dist_url, address, "127.0.0.1", restarted)
