"""The executor seam: how the EngineCore reaches its workers.

    execute(SchedulerOutput) -> ModelRunnerOutput     every step
    collective_rpc(method, *args) -> [result per worker]   control calls, by Worker method name

UniProcExecutor: one worker in the engine process. With N expert-parallel workers
(multiproc.py: processes on this host; ray_executor.py: Ray actors in a placement group) the
calls are the same, so the core does not know how many workers there are.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from moeserve.config import EngineConfig
from moeserve.engine.faults import FaultInjector
from moeserve.engine.scheduler import SchedulerOutput
from moeserve.model_config import ModelConfig
from moeserve.worker.model_runner import ModelRunnerOutput


class Executor(ABC):
    """Invariant: after `__init__` every worker holds the model; after `initialize_cache` every
    worker holds a cache of the same number of blocks, and `execute` may be called."""

    model_config: ModelConfig

    @staticmethod
    def create(config: EngineConfig, faults: FaultInjector | None = None) -> Executor:
        backend = config.parallel.executor_backend
        if backend == "uni":
            from moeserve.executor.uniproc import UniProcExecutor

            return UniProcExecutor(config, faults)
        if backend == "mp":
            from moeserve.executor.multiproc import MultiprocExecutor

            return MultiprocExecutor(config, faults)
        if backend == "ray":
            from moeserve.executor.ray_executor import RayExecutor

            return RayExecutor(config, faults)
        raise ValueError(f"unknown executor backend {backend!r}")

    @abstractmethod
    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput: ...

    @abstractmethod
    def collective_rpc(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """Call `method` on every worker; their results in worker order."""

    def num_kv_blocks(self, max_model_len: int) -> int:
        """Blocks every worker can hold: the minimum of what each one measured."""
        return min(self.collective_rpc("available_kv_blocks", max_model_len))

    def initialize_cache(self, num_blocks: int) -> None:
        self.collective_rpc("initialize_cache", num_blocks)

    def shutdown(self) -> None:
        """Release the workers (nothing to do for one in this process)."""
