"""moeserve as a Ray Serve application: replicas, autoscaling and request routing are Ray Serve's.

    HTTP ──> Ray Serve proxy ──> MoeServeIngress (moeserve's own OpenAI app, openai/api_server.py)
                                   │ ReplicaSetEngine: AsyncEngine's interface over a deployment
                                   │ handle, handle.options(stream=True).generate.remote(...)
                                   ▼
                                 EngineReplica × N: one AsyncEngine each (its engine process, its
                                 workers, its KV pool); N fixed or set by Ray Serve's autoscaler

A request is tokenised and validated in the ingress, routed by Ray Serve to one replica
(its default power-of-two choices on ongoing requests, or `request_router: outstanding_tokens`,
moeserve/entrypoints/ray_serve_router.py, which ranks by the token budgets of the requests each
replica has in flight), admitted there
by the replica's own admission control and streamed back as typed messages: RequestOutput, or
one ReplicaRefusal that the ingress turns into the API's 400/429/500/503. Ray Serve's own
backpressure (more than max_queued_requests waiting for a replica) is a 503 with Retry-After, as
the admission issue's overload is; a replica that dies mid-stream fails its requests with a 503
the client may retry, and Ray Serve replaces it (check_health fails as soon as its engine
process is gone). A client that leaves cancels the replica's generator, which aborts the
request in that replica's engine: its blocks come back there.

/metrics: every replica's series with a `replica` label, plus counters and histograms summed
over replicas (no label); /health is 200 while at least one replica serves.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from typing import Any

from moeserve.config import AdmissionConfig, engine_config
from moeserve.engine.input_processor import InputProcessor, Prompt
from moeserve.engine.messages import EngineInfo
from moeserve.entrypoints.admission import DEFAULT_TENANT, AdmissionController, AdmissionPolicy, AdmissionRejected
from moeserve.entrypoints.async_engine import AsyncEngine, Submitted
from moeserve.errors import EngineDeadError, RequestFailedError
from moeserve.outputs import RequestOutput
from moeserve.sampling_params import SamplingParams
from moeserve.tokenizer import Tokenizer

logger = logging.getLogger("moeserve.ray_serve")

REQUEST_ROUTERS = ("pow2", "outstanding_tokens")
_RETRY_AFTER_S = 1  # a replica lost or Ray Serve's queue full: retry soon, another replica will answer
_POLL_S = 1.0  # how often the ingress asks every replica for its stats and metrics


@dataclass(frozen=True)
class ServeArgs:
    """The application's arguments, as `args:` in a Ray Serve config file gives them.

    `engine` holds engine settings by their flag names with underscores (max_model_len, ...).
    `num_replicas` fixes the replica count; `autoscaling_config` (Ray Serve's: min_replicas,
    max_replicas, target_ongoing_requests, upscale_delay_s, downscale_delay_s, ...) lets
    Ray Serve set it instead; at most one of the two. `max_ongoing_requests` bounds the requests
    Ray Serve sends one replica at a time (the replica's own scheduler queues beyond its batch);
    `max_queued_requests` bounds those waiting for a replica (-1: no bound)."""

    model: str
    served_model_name: str | None = None
    num_replicas: int | None = None
    autoscaling_config: dict[str, Any] | None = None
    engine: dict[str, Any] = field(default_factory=dict)
    max_ongoing_requests: int = 64
    max_queued_requests: int = 256
    request_router: str = "pow2"
    api_keys: tuple[str, ...] = ()
    admission: dict[str, Any] = field(default_factory=dict)  # AdmissionConfig fields, per replica
    ray_actor_options: dict[str, Any] = field(default_factory=lambda: {"num_cpus": 1})
    health_check_period_s: float = 2.0
    health_check_timeout_s: float = 10.0
    log_level: str = "info"

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ServeArgs:
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown moeserve application arg(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        if "model" not in raw:
            raise ValueError("the moeserve application needs `model` (a checkpoint directory)")
        args = cls(**{**raw, "api_keys": tuple(raw.get("api_keys", ()))})
        if args.num_replicas is not None and args.autoscaling_config is not None:
            raise ValueError("give num_replicas or autoscaling_config, not both")
        if args.request_router not in REQUEST_ROUTERS:
            raise ValueError(f"request_router must be one of {', '.join(REQUEST_ROUTERS)}, got {args.request_router!r}")
        engine_config(args.model, **args.engine)  # unknown settings fail here, before any replica starts
        AdmissionConfig(**args.admission)
        return args

    @property
    def name(self) -> str:
        return self.served_model_name or self.model


# ---- messages between the ingress and the replicas ----


@dataclass(frozen=True)
class ReplicaRequest:
    request_id: str
    prompt: Prompt
    params: SamplingParams
    priority: int = 0
    tenant: str = DEFAULT_TENANT


@dataclass(frozen=True)
class ReplicaRefusal:
    """The replica did not (or could not) finish the request: the API's status and message."""

    status: int  # 400, 429, 500 or 503
    reason: str
    message: str
    retry_after: int | None = None


@dataclass(frozen=True)
class ReplicaStats:
    replica: str
    actor_name: str  # the replica's Ray actor (namespace "serve")
    node_ip: str
    pid: int
    requests_served: int  # requests this replica admitted since it started
    in_flight: int
    outstanding_tokens: int  # prompt and output tokens its requests in flight still have to compute
    num_blocks: int
    num_free_blocks: int
    alive: bool


# ---- the engine replica ----


class EngineReplica:
    """One Ray Serve replica: one AsyncEngine (engine process, workers, KV pool)."""

    async def __init__(self, args: ServeArgs):
        from ray import serve

        self.args = args
        self.replica = serve.get_replica_context().replica_id.unique_id
        settings = dict(args.engine)
        if settings.get("expert_parallel_size", 1) > 1 and not settings.get("ray_address"):
            import ray

            # A replica of N expert-parallel workers places them on this replica's cluster.
            settings["ray_address"] = ray.get_runtime_context().gcs_address
        config = engine_config(args.model, **settings)
        self.engine = await AsyncEngine.start(config, args.name, args.log_level, AdmissionConfig(**args.admission))
        self.requests_served = 0
        self._outstanding: dict[str, int] = {}  # request id -> tokens still to compute

    def info(self) -> EngineInfo:
        return self.engine.info

    async def generate(self, request: ReplicaRequest) -> AsyncIterator[RequestOutput | ReplicaRefusal]:
        try:
            submitted = self.engine.submit(request.request_id, request.prompt, request.params, request.priority,
                                           request.tenant)
        except (ValueError, AdmissionRejected, EngineDeadError) as e:
            yield _refusal(e)
            return
        self.requests_served += 1
        prompt_tokens = len(request.prompt.get("prompt_token_ids", ())) if isinstance(request.prompt, dict) else 0
        budget = prompt_tokens + (request.params.max_tokens or 0)
        self._outstanding[request.request_id] = budget
        try:
            async for out in self.engine.stream(submitted):
                self._outstanding[request.request_id] = budget - sum(len(o.token_ids) for o in out.outputs)
                yield out
        except (AdmissionRejected, RequestFailedError, EngineDeadError) as e:
            yield _refusal(e)
        finally:
            self._outstanding.pop(request.request_id, None)

    def stats(self) -> ReplicaStats:
        s = self.engine.latest_stats
        import ray

        return ReplicaStats(self.replica, ray.get_runtime_context().get_actor_name() or "",
                            ray.util.get_node_ip_address(), os.getpid(), self.requests_served, self.engine.num_in_flight,
                            sum(self._outstanding.values()), s.num_blocks if s else 0, s.num_free_blocks if s else 0,
                            self.engine.is_alive())

    def report(self) -> tuple[ReplicaStats, bytes]:
        """Its stats and its Prometheus exposition text, taken together."""
        from prometheus_client import generate_latest

        return self.stats(), generate_latest(self.engine.metrics.registry)

    def check_health(self) -> None:
        """Ray Serve restarts the replica when this raises."""
        if not self.engine.is_alive():
            raise RuntimeError(f"engine process gone: {self.engine.dead_reason()}")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


def _refusal(e: BaseException) -> ReplicaRefusal:
    if isinstance(e, AdmissionRejected):
        return ReplicaRefusal(e.status, e.reason, e.message, e.retry_after)
    if isinstance(e, ValueError):
        return ReplicaRefusal(400, "invalid", str(e))
    if isinstance(e, EngineDeadError):
        return ReplicaRefusal(503, "replica_failure", f"the replica's engine stopped: {e}", _RETRY_AFTER_S)
    return ReplicaRefusal(500, "failed", str(e))


# ---- the ingress ----


@dataclass(frozen=True)
class _Call:
    """A submitted request's Ray Serve call (Submitted carries only its id)."""

    response: Any  # DeploymentResponseGenerator


class ReplicaSetEngine:
    """AsyncEngine's interface (what the OpenAI and gRPC fronts use) over the replicas' handle.
    Validation and tokenisation run here; admission, scheduling and metrics in the replicas."""

    def __init__(self, handle: Any, info: EngineInfo, args: ServeArgs):
        from moeserve.entrypoints.ray_serve_metrics import IngressMetrics

        self.handle = handle.options(stream=True)
        self._control = handle
        self.info, self.args = info, args
        self.tokenizer = Tokenizer(args.model)
        self.input = InputProcessor(self.tokenizer, info)
        # Tenants are named here (API key -> tenant) with the replicas' policy; admission itself
        # runs in each replica.
        self.admission = AdmissionController(AdmissionPolicy.from_config(AdmissionConfig(**args.admission)), info,
                                             lambda: None)
        self.metrics = IngressMetrics(args.name)
        self.latest_stats = None
        self.replica_stats: dict[str, ReplicaStats] = {}
        self._calls: dict[str, _Call] = {}
        self._ids = iter(range(1 << 62))
        self._poller: asyncio.Task | None = None

    async def start(self) -> None:
        await self.poll()
        self._poller = asyncio.ensure_future(self._poll_forever())

    async def poll(self) -> None:
        """Every replica's stats and metrics (a control-plane broadcast, once per _POLL_S)."""
        reports = await self._control.broadcast("report").results_async()
        self.replica_stats = {stats.replica: stats for stats, _ in reports}
        self.metrics.update({stats.replica: text for stats, text in reports})

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(_POLL_S)
            try:
                await self.poll()
            except Exception as e:  # a replica going away mid-broadcast: the next poll sees the new set
                logger.debug("replica poll failed: %s", e)

    @property
    def max_model_len(self) -> int:
        return self.info.max_model_len

    @property
    def num_in_flight(self) -> int:
        return len(self._calls)

    def new_request_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}-{time.monotonic_ns() % 10**9}"

    def is_alive(self) -> bool:
        return any(s.alive for s in self.replica_stats.values())

    def dead_reason(self) -> str:
        return "no replica is serving"

    def unavailable_reason(self) -> str | None:
        return None

    def validate(self, token_ids: list[int]) -> None:
        self.input.validate(token_ids)

    def submit(self, request_id: str, prompt: Prompt, params: SamplingParams, priority: int = 0,
               tenant: str = DEFAULT_TENANT) -> Submitted:
        """Validate here (ValueError at once), then hand the request to Ray Serve's router."""
        self.input.process(request_id, prompt, params, priority)
        if request_id in self._calls:
            raise ValueError(f"request id {request_id!r} is already in use")
        response = self.handle.generate.remote(ReplicaRequest(request_id, prompt, params, priority, tenant))
        self._calls[request_id] = _Call(response)
        return Submitted(request_id, None, time.monotonic())

    async def stream(self, submitted: Submitted) -> AsyncIterator[RequestOutput]:
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import BackPressureError

        call = self._calls[submitted.request_id]
        finished = False
        try:
            try:
                async for item in call.response:
                    if isinstance(item, ReplicaRefusal):
                        finished = True
                        raise _as_exception(item)
                    finished = item.finished
                    yield item
            except BackPressureError as e:
                finished = True
                self.metrics.reject("backpressure")
                raise AdmissionRejected(503, "backpressure", f"every replica is busy: {e}", _RETRY_AFTER_S) from e
            except RayActorError as e:
                finished = True
                raise AdmissionRejected(503, "replica_failure", f"the replica serving this request died: {e}",
                                        _RETRY_AFTER_S) from e
        finally:
            self._calls.pop(submitted.request_id, None)
            if not finished:
                call.response.cancel()  # the replica's generator is cancelled: it aborts the request there

    async def generate(self, request_id: str, prompt: Prompt, params: SamplingParams, priority: int = 0,
                       tenant: str = DEFAULT_TENANT) -> AsyncIterator[RequestOutput]:
        submitted = self.submit(request_id, prompt, params, priority, tenant)
        async for out in self.stream(submitted):
            yield out

    def cancel(self, submitted: Submitted) -> None:
        call = self._calls.pop(submitted.request_id, None)
        if call is not None:
            call.response.cancel()

    def shutdown(self) -> None:
        if self._poller is not None:
            self._poller.cancel()


def _as_exception(refusal: ReplicaRefusal) -> Exception:
    if refusal.status in (429, 503):
        return AdmissionRejected(refusal.status, refusal.reason, refusal.message, refusal.retry_after or 1)
    if refusal.status == 400:
        return ValueError(refusal.message)
    return RequestFailedError(refusal.message)


class MoeServeIngress:
    """The ingress deployment: moeserve's OpenAI app over the replica set."""

    async def __init__(self, engines: Any, args: ServeArgs):
        from moeserve.entrypoints.state import ServerState

        info = await engines.info.remote()
        self.engine = ReplicaSetEngine(engines, info, args)
        await self.engine.start()
        self.state = ServerState(self.engine, args.name, args.api_keys)

    def __serve_build_asgi_app__(self):
        from moeserve.entrypoints.openai.api_server import build_app

        return build_app(self.state)

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


def build_app(raw_args: dict[str, Any]):
    """The Ray Serve application (`import_path: moeserve.entrypoints.ray_serve:build_app` in a
    Serve config file, its `args:` as `raw_args`)."""
    from ray import serve

    args = ServeArgs.from_dict(dict(raw_args))
    options: dict[str, Any] = dict(
        max_ongoing_requests=args.max_ongoing_requests,
        max_queued_requests=args.max_queued_requests,
        ray_actor_options=args.ray_actor_options,
        health_check_period_s=args.health_check_period_s,
        health_check_timeout_s=args.health_check_timeout_s,
    )
    if args.autoscaling_config is not None:
        options["autoscaling_config"] = args.autoscaling_config
    else:
        options["num_replicas"] = args.num_replicas or 1
    if args.request_router == "outstanding_tokens":
        from ray.serve.config import RequestRouterConfig

        options["request_router_config"] = RequestRouterConfig(
            request_router_class="moeserve.entrypoints.ray_serve_router:OutstandingTokensRouter")
    engines = serve.deployment(EngineReplica, name="MoeServeEngine", **options).bind(args)
    ingress = serve.deployment(serve.ingress()(MoeServeIngress), name="MoeServeIngress",
                               ray_actor_options={"num_cpus": 0}).bind(engines, args)
    return ingress


def serve_args_dict(args: ServeArgs) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(args).items()}


APP_NAME = "moeserve"


def run_local(args: ServeArgs, host: str, port: int, num_cpus: int | None = None) -> None:
    """`moeserve serve MODEL --replicas N`: a Ray cluster of this machine alone (started here,
    on `host`'s address when that is a loopback one), Ray Serve's proxy on host:port, the
    application of cluster/local.yaml; until SIGTERM or SIGINT, then everything stops."""
    import signal
    import threading

    import ray
    from ray import serve

    node_ip = "127.0.0.1" if host in ("127.0.0.1", "localhost") else None
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address=node_ip,
             runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}})
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_app(serve_args_dict(args)), name=APP_NAME, route_prefix="/")
        logger.info("serving %s with %s replica(s) through Ray Serve on %s:%d", args.name,
                    args.num_replicas or "autoscaled", host, port)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
