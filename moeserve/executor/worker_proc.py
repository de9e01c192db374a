"""A worker in a process of its own (a local process or a Ray actor) and its channel to the
executor: ZMQ, never a Ray call per step.

    executor (ROUTER, bound on the engine's host)  <->  worker r (DEALER, identity b"w<r>")
    -> WorkerCall(method, args)          every step ("execute_model") and every control call
    <- WorkerReply(rank, ok, value)      the method's result, or the error's text

On start a worker joins the data-plane group (torch.distributed: gloo on CPU, NCCL on CUDA,
with the configured timeout), builds its Worker, says hello, and serves calls in order until
told to stop. Messages are pickled dataclasses: both ends are moeserve processes of one engine.
"""

from __future__ import annotations

import datetime
import logging
import os
import pickle
import socket
import traceback
from dataclasses import dataclass
from typing import Any

from moeserve.config import EngineConfig
from moeserve.engine.faults import FaultInjector, FaultPlan

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerCall:
    method: str
    args: tuple = ()
    kwargs: dict | None = None
    seq: int = 0  # the executor's call number: a late reply to an older call is recognised


@dataclass(frozen=True)
class WorkerReply:
    rank: int
    ok: bool
    value: Any = None  # the result, or the error's text
    seq: int = 0


STOP = WorkerCall("__stop__")
HELLO = "__hello__"


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def interface_of(ip: str) -> str | None:
    """The name of the network interface that holds `ip` (Linux), None when none does."""
    import fcntl
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
            except OSError:
                continue
            if socket.inet_ntoa(packed[20:24]) == ip:
                return name
    return None


def run_worker(config: EngineConfig, rank: int, dist_url: str, executor_address: str, host: str,
               restarted: bool = False) -> None:
    """The worker's whole life: join the group, build the Worker, serve calls until STOP.
    `host` is this worker's address as the cluster knows it: the data plane uses its interface
    (not whatever the hostname resolves to) unless GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME say.
    A restarted worker injects no faults (a test's fault hits the first life only)."""
    import torch
    import torch.distributed as dist
    import zmq

    from moeserve.model_config import resolve_device
    from moeserve.worker.worker import Worker

    parallel = config.parallel
    cuda = resolve_device(config.load.device).startswith("cuda")
    interface = interface_of(host)
    if interface is not None:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", interface)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", interface)
    if os.environ.get("MOESERVE_WORKER_THREADS"):
        torch.set_num_threads(int(os.environ["MOESERVE_WORKER_THREADS"]))
    elif not cuda:  # workers on one host share its cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // parallel.world_size))
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend, init_method=dist_url, rank=rank, world_size=parallel.world_size,
                            timeout=datetime.timedelta(seconds=parallel.distributed_timeout))
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, b"w%d" % rank)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(executor_address)
    try:
        faults = FaultInjector(FaultPlan() if restarted else None, rank=rank)
        worker = Worker(config, faults, rank=rank, group=dist.group.WORLD, host=host)
        sock.send(pickle.dumps(WorkerReply(rank, True, HELLO)))
        while True:
            call: WorkerCall = pickle.loads(sock.recv())
            if call.method == STOP.method:
                break
            try:
                value = getattr(worker, call.method)(*call.args, **(call.kwargs or {}))
                reply = WorkerReply(rank, True, value, call.seq)
            except Exception as e:  # the executor decides what a failed call means
                logger.exception("worker %d: %s failed", rank, call.method)
                reply = WorkerReply(rank, False, f"{type(e).__name__}: {e}\n{traceback.format_exc()}", call.seq)
            sock.send(pickle.dumps(reply))
    finally:
        sock.close()
        ctx.term()
        if dist.is_initialized():
            dist.destroy_process_group()

