"""MultiprocExecutor: N expert-parallel workers as processes on this host, no Ray (tests, one
machine without a Ray install). Ray's executor is the one for clusters."""

from __future__ import annotations

import atexit
import multiprocessing

from moeserve.config import EngineConfig
from moeserve.engine.faults import FaultInjector
from moeserve.executor.multi import MultiWorkerExecutor
from moeserve.executor.worker_proc import free_port, run_worker

_START_TIMEOUT_S = 120.0


class MultiprocExecutor(MultiWorkerExecutor):
    def __init__(self, config: EngineConfig, faults: FaultInjector | None = None):
        self.world_size = config.parallel.world_size
        address = self._open("127.0.0.1")
        dist_url = f"tcp://127.0.0.1:{free_port('127.0.0.1')}"
        spawn = multiprocessing.get_context("spawn")
        self.procs = [spawn.Process(target=_worker_main, name=f"moeserve-worker-{rank}",
                                    args=(config, rank, dist_url, address)) for rank in range(self.world_size)]
        for p in self.procs:
            p.start()
        self._closed = False
        atexit.register(self.shutdown)  # before multiprocessing joins its children at exit
        try:
            self._await_hello(_START_TIMEOUT_S)
            self.model_config = self.collective_rpc("load_model")[0]
        except BaseException:
            self.shutdown()
            raise

    def _dead(self) -> str | None:
        for rank, p in enumerate(self.procs):
            if not p.is_alive():
                return f"worker {rank} (pid {p.pid}) exited with {p.exitcode}"
        return None

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.shutdown)
        self._stop_workers()
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
        self._close()


def _worker_main(config: EngineConfig, rank: int, dist_url: str, address: str) -> None:
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # die with the engine
    except OSError:
        pass
    run_worker(config, rank, dist_url, address, "127.0.0.1")
