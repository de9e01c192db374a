"""`moeserve serve`: the front process (HTTP via uvicorn, optional gRPC, one asyncio loop) and
the engine process it starts (moeserve/engine/core_proc.py). The front starts listening once
the engine has loaded the model and answered.

Shutdown: the first SIGTERM starts draining — /v1/* answer 503 with Retry-After, /ready turns
503, gRPC health turns NOT_SERVING and new gRPC calls get UNAVAILABLE, requests in flight run to
completion for up to `shutdown_timeout` seconds — then the servers stop, the engine process is
stopped, and the front exits 0. SIGINT (Ctrl-C) stops at once, as uvicorn does. If the engine
process dies, the front stays up and answers 503 (/health included) until it is restarted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import time

import uvicorn

from moeserve.config import AdmissionConfig, EngineConfig, ServerConfig
from moeserve.entrypoints.async_engine import AsyncEngine
from moeserve.entrypoints.openai.api_server import build_app
from moeserve.entrypoints.state import ServerState
from moeserve.router.config import ROUTED_NAME, RouterConfig
from moeserve.router.pipeline import Router

logger = logging.getLogger("moeserve.server")


class _DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState, timeout: float, grpc_front=None):
        super().__init__(config)
        self.state, self.timeout, self.grpc_front = state, timeout, grpc_front
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        if sig != signal.SIGTERM or self.state.draining or self._loop is None:
            return super().handle_exit(sig, frame)
        self.state.draining = True  # not recorded as a captured signal: the process exits 0
        logger.info("SIGTERM: draining %d request(s) for up to %.0fs", self.state.engine.num_in_flight, self.timeout)
        self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain()))

    async def _drain(self) -> None:
        if self.grpc_front is not None:
            await self.grpc_front.drain()
        engine = self.state.engine
        deadline = time.monotonic() + self.timeout
        while engine.num_in_flight and engine.is_alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if engine.num_in_flight:
            logger.warning("shutdown: %d request(s) still running are dropped", engine.num_in_flight)
        self.should_exit = True


async def serve(engine_config: EngineConfig, config: ServerConfig, admission: AdmissionConfig | None = None) -> None:
    name = config.served_model_name or engine_config.model
    router_config = RouterConfig.load(config.router_config) if config.router_config else None  # bad file: fail now
    engine = await AsyncEngine.start(engine_config, name, config.log_level, admission)
    extra: dict[str, AsyncEngine] = {}
    try:
        state = ServerState(engine, name, config.api_key)
        if router_config is not None:
            # each distinct model a profile names gets its own engine (own process, own KV pool),
            # with the served model's engine settings
            for model in dict.fromkeys(p.model for p in router_config.profiles):
                if model is not None and model not in (engine_config.model, name) and model not in extra:
                    settings = dataclasses.replace(engine_config, load=dataclasses.replace(engine_config.load,
                                                                                           model=model))
                    extra[model] = await AsyncEngine.start(settings, model, config.log_level, admission)
            state.engines = extra
            state.router = Router(router_config, engine.metrics.registry)
            logger.info("router: profiles %s behind %r (config version %s)", ", ".join(router_config.names),
                        ROUTED_NAME, router_config.version)
        if not config.api_key:
            logger.warning("no --api-key given: the API is open to anyone who can reach %s:%d", config.host,
                           config.port)
        grpc_front = None
        if config.grpc_port is not None:
            from moeserve.entrypoints.grpc_server import start_grpc_server

            grpc_front = await start_grpc_server(state, config.host, config.grpc_port)
            engine.death_listeners.append(lambda reason: asyncio.ensure_future(grpc_front.drain()))
            engine.availability_listeners.append(
                lambda serving: None if state.draining else asyncio.ensure_future(grpc_front.set_serving(serving)))
            logger.info("gRPC on %s:%d", config.host, grpc_front.port)
        uv_config = uvicorn.Config(build_app(state), host=config.host, port=config.port, log_level=config.log_level,
                                   timeout_graceful_shutdown=5)
        server = _DrainingServer(uv_config, state, config.shutdown_timeout, grpc_front)
        try:
            await server.serve()
        finally:
            if grpc_front is not None:
                await grpc_front.stop(grace=1.0)
    finally:
        for e in extra.values():
            e.shutdown()
        engine.shutdown()
