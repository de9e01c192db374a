"""RayExecutor: N expert-parallel workers as Ray actors in a placement group.

Ray is the control plane only: it starts the actors (one bundle each: one GPU on GPU hosts, one
CPU otherwise; PACK on one node, SPREAD across nodes), tells where they run, and reports a dead
actor. Steps and control calls travel over the executor's ZMQ channel (multi.py), and the
expert all-to-all over the workers' torch.distributed group, never as Ray method calls (one
costs ~10 ms here). Without `--ray-address` a local Ray instance is started on 127.0.0.1 and
shut down with the engine; with one, the engine joins that cluster (moeserve must be installed
on every node).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from moeserve.config import EngineConfig
from moeserve.engine.faults import FaultInjector
from moeserve.executor.multi import MultiWorkerExecutor, grace_seconds
from moeserve.executor.worker_proc import free_port, run_worker

logger = logging.getLogger(__name__)

_START_TIMEOUT_S = 180.0
_PLACEMENT_TIMEOUT_S = 60.0


def node_ip() -> str:
    """The address Ray registered for the node this process runs on (its --node-ip-address)."""
    import ray

    me = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node["NodeID"] == me:
            return node["NodeManagerAddress"]
    return ray.util.get_node_ip_address()


class RayWorkerActor:
    """The actor's body: where it runs, a port for the group's rendezvous, then `run` for life."""

    def node_ip(self) -> str:
        return node_ip()

    def rendezvous(self) -> tuple[str, int]:
        ip = self.node_ip()
        return ip, free_port(ip)

    def run(self, config: EngineConfig, rank: int, dist_url: str, executor_address: str, restarted: bool) -> None:
        run_worker(config, rank, dist_url, executor_address, node_ip(), restarted)


class RayExecutor(MultiWorkerExecutor):
    def __init__(self, config: EngineConfig, faults: FaultInjector | None = None):
        try:
            import ray
            from ray.util.placement_group import placement_group
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        except ImportError as e:
            raise ValueError("expert parallelism over Ray needs Ray: pip install 'moeserve[ray]' "
                             "(or --distributed-executor-backend mp on one host)") from e
        from moeserve.model_config import resolve_device

        parallel = config.parallel
        self.config = config
        self.world_size = parallel.world_size
        self.grace_s = grace_seconds(parallel.distributed_timeout)
        self._ray = ray
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            if parallel.ray_address:
                ray.init(address=parallel.ray_address, logging_level=logging.WARNING)
            else:
                ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, logging_level=logging.WARNING,
                         num_cpus=max(os.cpu_count() or 1, self.world_size))
        self.pg = self.actors = None
        self.runs: list[Any] = []
        self._started: set[int] = set()
        try:
            self._start(config, placement_group, PlacementGroupSchedulingStrategy, resolve_device(config.load.device))
        except BaseException:
            self.shutdown()
            raise

    def _start(self, config, placement_group, strategy_cls, device: str) -> None:
        ray, parallel = self._ray, config.parallel
        self._address = self._open(node_ip())
        gpu = device.startswith("cuda")
        self._strategy_cls = strategy_cls
        self._actor_cls = ray.remote(num_cpus=1, num_gpus=1 if gpu else 0, max_restarts=0)(RayWorkerActor)
        bundle = {"GPU": 1, "CPU": 1} if gpu else {"CPU": 1}
        self.pg = placement_group([bundle] * self.world_size, strategy=parallel.ray_placement_strategy)
        ready, _ = ray.wait([self.pg.ready()], timeout=_PLACEMENT_TIMEOUT_S)
        if not ready:
            raise ValueError(f"the Ray cluster cannot place {self.world_size} workers of {bundle} "
                             f"({parallel.ray_placement_strategy}) within {_PLACEMENT_TIMEOUT_S:.0f} s: "
                             f"it has {ray.cluster_resources()}")
        self.actors = [self._new_actor(rank) for rank in range(self.world_size)]
        self.worker_nodes = ray.get([a.node_ip.remote() for a in self.actors], timeout=_START_TIMEOUT_S)
        ip, port = ray.get(self.actors[0].rendezvous.remote(), timeout=_START_TIMEOUT_S)
        dist_url = f"tcp://{ip}:{port}"
        self.runs = [None] * self.world_size
        for rank in range(self.world_size):
            self._start_worker(rank, dist_url)
        self._await_hello(list(range(self.world_size)), _START_TIMEOUT_S)
        self.model_config = self.collective_rpc("load_model")[0]
        logger.info("%d expert-parallel workers on %s", self.world_size, ", ".join(self.worker_nodes))

    def _new_actor(self, rank: int):
        strategy = self._strategy_cls(placement_group=self.pg, placement_group_bundle_index=rank)
        env = {k: v for k, v in os.environ.items() if k == "MOESERVE_INJECT_FAULTS"}  # tests' faults reach actors
        return self._actor_cls.options(scheduling_strategy=strategy, name=f"moeserve-{os.getpid()}-worker-{rank}",
                                       runtime_env={"env_vars": env} if env else None).remote()

    def _start_worker(self, rank: int, dist_url: str) -> None:
        restarted = rank in self._started
        if self.actors[rank] is None:
            self.actors[rank] = self._new_actor(rank)
            self.worker_nodes[rank] = self._ray.get(self.actors[rank].node_ip.remote(), timeout=_START_TIMEOUT_S)
        self.runs[rank] = self.actors[rank].run.remote(self.config, rank, dist_url, self._address, restarted)
        self._started.add(rank)

    def _kill_worker(self, rank: int) -> None:
        if self.actors[rank] is not None:
            self._ray.kill(self.actors[rank], no_restart=True)
        self.actors[rank] = None
        self.runs[rank] = None

    def _fresh_rendezvous(self) -> tuple[str, int]:
        self.actors[0] = self._new_actor(0)
        self.worker_nodes[0] = self._ray.get(self.actors[0].node_ip.remote(), timeout=_START_TIMEOUT_S)
        return tuple(self._ray.get(self.actors[0].rendezvous.remote(), timeout=_START_TIMEOUT_S))

    def _dead(self) -> dict[int, str]:
        ray = self._ray
        live = [ref for ref in self.runs if ref is not None]
        if not live:
            return {}
        done, _ = ray.wait(live, num_returns=len(live), timeout=0)
        out = {}
        for ref in done:
            rank = self.runs.index(ref)
            try:
                ray.get(ref)
                out[rank] = "stopped"
            except Exception as e:
                out[rank] = f"died: {str(e).splitlines()[0]}"
        return out

    def shutdown(self) -> None:
        ray = self._ray
        live = [ref for ref in self.runs if ref is not None]
        if live:
            self._stop_workers()
            ray.wait(live, num_returns=len(live), timeout=5)
        for a in self.actors or []:
            if a is not None:
                ray.kill(a)
        if self.pg is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.pg)
        if hasattr(self, "_sock"):
            self._close()
        if self._owns_ray:
            ray.shutdown()
