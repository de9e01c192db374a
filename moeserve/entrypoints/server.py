"""`moeserve serve`: one process with the engine loop thread, the HTTP front (uvicorn) and the
optional gRPC front on the same asyncio loop.

Shutdown: the first SIGTERM starts draining — /v1/* answer 503 with Retry-After, /ready turns
503, gRPC health turns NOT_SERVING and new gRPC calls get UNAVAILABLE, requests in flight run to completion for up to `shutdown_timeout` seconds — then the
servers stop and the process exits 0. SIGINT (Ctrl-C) stops at once, as uvicorn does.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from dataclasses import dataclass

import uvicorn

from moeserve.engine.core import EngineCoreClient
from moeserve.engine.llm_engine import EngineConfig
from moeserve.entrypoints.async_engine import AsyncEngine
from moeserve.entrypoints.openai.api_server import build_app
from moeserve.entrypoints.state import ServerState
from moeserve.metrics import ServerMetrics

logger = logging.getLogger("moeserve.server")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    grpc_port: int | None = None
    api_keys: tuple[str, ...] = ()
    served_model_name: str | None = None  # default: the model path as given
    expert_metrics: str = "layer"
    shutdown_timeout: float = 30.0
    log_level: str = "info"


class _DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState, client: EngineCoreClient, timeout: float,
                 grpc_front=None):
        super().__init__(config)
        self.state, self.client, self.timeout, self.grpc_front = state, client, timeout, grpc_front
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        if sig != signal.SIGTERM or self.state.draining or self._loop is None:
            return super().handle_exit(sig, frame)
        self.state.draining = True  # not recorded as a captured signal: the process exits 0
        logger.info("SIGTERM: draining %d request(s) for up to %.0fs", self.client.num_in_flight, self.timeout)
        self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain()))

    async def _drain(self) -> None:
        if self.grpc_front is not None:
            await self.grpc_front.drain()
        deadline = time.monotonic() + self.timeout
        while self.client.num_in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.client.num_in_flight:
            logger.warning("shutdown timeout: %d request(s) still running are dropped", self.client.num_in_flight)
        self.should_exit = True


async def serve(engine_config: EngineConfig, config: ServerConfig) -> None:
    client = EngineCoreClient(engine_config)
    name = config.served_model_name or engine_config.model
    metrics = ServerMetrics(client.engine, name, config.expert_metrics)
    state = ServerState(AsyncEngine(client, metrics), name, config.api_keys)
    if not config.api_keys:
        logger.warning("no --api-key given: the API is open to anyone who can reach %s:%d", config.host, config.port)
    grpc_front = None
    if config.grpc_port is not None:
        from moeserve.entrypoints.grpc_server import start_grpc_server

        grpc_front = await start_grpc_server(state, config.host, config.grpc_port)
        logger.info("gRPC on %s:%d", config.host, grpc_front.port)
    uv_config = uvicorn.Config(build_app(state), host=config.host, port=config.port, log_level=config.log_level,
                               timeout_graceful_shutdown=5)
    server = _DrainingServer(uv_config, state, client, config.shutdown_timeout, grpc_front)
    try:
        await server.serve()
    finally:
        if grpc_front is not None:
            await grpc_front.stop(grace=1.0)
        client.shutdown()
