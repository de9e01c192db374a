"""UniProcExecutor: one Worker in the engine's own process; calls are plain method calls."""

from __future__ import annotations

from typing import Any

from moeserve.config import EngineConfig
from moeserve.engine.faults import FaultInjector
from moeserve.engine.scheduler import SchedulerOutput
from moeserve.executor import Executor
from moeserve.worker.model_runner import ModelRunnerOutput
from moeserve.worker.worker import Worker


class UniProcExecutor(Executor):
    def __init__(self, config: EngineConfig, faults: FaultInjector | None = None):
        self.worker = Worker(config, faults)
        self.model_config = self.worker.load_model()

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.worker.execute_model(scheduler_output)

    def collective_rpc(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        return [getattr(self.worker, method)(*args, **kwargs)]
