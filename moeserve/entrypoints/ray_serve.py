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
one ReplicaRefusal that the ingress turns into the API's 400/429/500/503. The replica's first
message is its admission answer, which the ingress waits for before it answers the client, so a
refusal is a plain 400/429/503 response, streamed or not. Ray Serve's own backpressure (more
than max_queued_requests waiting for a replica) is a 503 with Retry-After, as the admission
issue's overload is; a replica that dies mid-stream fails its requests with a 503
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
_POLL_TIMEOUT_S = 5.0  # a replica slower than this to report is left out of that poll


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
        keys = raw.get("api_keys") or ()
        if isinstance(keys, str) or not all(isinstance(k, str) and k for k in keys):
            raise ValueError("api_keys must be a list of non-empty strings")
        args = cls(**{**raw, "api_keys": tuple(keys)})
        if args.num_replicas is not None and args.num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {args.num_replicas}")
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
class ReplicaAdmitted:
    """The replica's admission control took the request (its first message)."""

    predicted_ttft: float | None


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
        self._outstanding: dict[str, ReplicaRequest] = {}  # in flight here, by request id

    def info(self) -> EngineInfo:
        return self.engine.info

    async def generate(self, request: ReplicaRequest
                       ) -> AsyncIterator[ReplicaAdmitted | RequestOutput | ReplicaRefusal]:
        """ReplicaAdmitted or a ReplicaRefusal first; then outputs, ending with the finished one
        or a refusal. Cancelled (the ingress's client left): the request is aborted here."""
        try:
            submitted = self.engine.submit(request.request_id, request.prompt, request.params, request.priority,
                                           request.tenant)
        except Exception as e:
            yield _refusal(e)
            return
        self.requests_served += 1
        self._outstanding[request.request_id] = request
        try:
            yield ReplicaAdmitted(submitted.predicted_ttft)
            async for out in self.engine.stream(submitted):
                yield out
        except Exception as e:
            yield _refusal(e)
        finally:
            self._outstanding.pop(request.request_id, None)

    def outstanding_tokens(self) -> int:
        """Tokens its requests in flight have still to compute, from the engine's progress
        (which every step updates, whatever the requests' output_kind)."""
        max_len = self.engine.max_model_len
        return sum(request_budget(r, max_len, self.engine.generated(rid)) for rid, r in self._outstanding.items())

    def stats(self) -> ReplicaStats:
        s = self.engine.latest_stats
        import ray

        return ReplicaStats(self.replica, ray.get_runtime_context().get_actor_name() or "",
                            ray.util.get_node_ip_address(), os.getpid(), self.requests_served, self.engine.num_in_flight,
                            self.outstanding_tokens(), s.num_blocks if s else 0, s.num_free_blocks if s else 0,
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


def request_budget(request: ReplicaRequest, max_model_len: int | None = None, generated: int | None = None) -> int:
    """Prompt and output tokens a request has still to compute: its prompt (until its first
    token, `generated` None) and max_tokens per sequence (the context's room when unset) less
    the `generated` tokens of all its sequences."""
    prompt = request.prompt
    prompt_tokens = len(prompt.get("prompt_token_ids", ())) if isinstance(prompt, dict) else 0
    n = request.params.n or 1
    room = request.params.max_tokens or max(0, (max_model_len or prompt_tokens) - prompt_tokens)
    if generated is None:
        return prompt_tokens + n * room
    return max(0, n * room - generated)


def _refusal(e: BaseException) -> ReplicaRefusal:
    if isinstance(e, AdmissionRejected):
        return ReplicaRefusal(e.status, e.reason, e.message, e.retry_after)
    if isinstance(e, ValueError):
        return ReplicaRefusal(400, "invalid", str(e))
    if isinstance(e, EngineDeadError):
        return ReplicaRefusal(503, "replica_failure", f"the replica's engine stopped: {e}", _RETRY_AFTER_S)
    return ReplicaRefusal(500, "failed", str(e))


# ---- the ingress ----


@dataclass
class _Call:
    """A submitted request's Ray Serve call (Submitted carries only its id) and the iterator
    its messages are read from (the admission message first)."""

    response: Any  # DeploymentResponseGenerator
    messages: Any  # its async iterator


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
        reports = await self._control.broadcast("report").results_async(timeout_s=_POLL_TIMEOUT_S,
                                                                        return_exceptions=True)
        reports = [r for r in reports if not isinstance(r, BaseException)]  # a replica going away
        self.replica_stats = {stats.replica: stats for stats, _ in reports}
        self.metrics.update({stats.replica: text for stats, text in reports})

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(_POLL_S)
            try:
                await self.poll()
            except Exception as e:  # the broadcast as a whole timed out: no replica answered
                logger.warning("no replica answered the poll: %s", e)
                self.replica_stats = {}

    @property
    def max_model_len(self) -> int:
        return self.info.max_model_len

    @property
    def num_in_flight(self) -> int:
        return len(self._calls)

    def new_request_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}-{time.monotonic_ns() % 10**9}"

    def is_alive(self) -> bool:
        """False only when replicas answered and every one's engine is gone. With no replica
        running (scaled to zero, or all being replaced) requests go on to Ray Serve, which
        queues them and starts replicas."""
        return not self.replica_stats or any(s.alive for s in self.replica_stats.values())

    def dead_reason(self) -> str:
        return "every replica's engine has stopped"

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
        try:  # a full queue may be known at once
            response = self.handle.generate.remote(ReplicaRequest(request_id, prompt, params, priority, tenant))
        except Exception as e:
            raise _ray_error(e, self.metrics) from e
        self._calls[request_id] = _Call(response, response.__aiter__())
        return Submitted(request_id, None)

    async def admitted(self, submitted: Submitted) -> Submitted:
        """The replica's admission answer: the Submitted with its TTFT prediction, or the
        refusal raised (AdmissionRejected 429/503, ValueError, RequestFailedError)."""
        call = self._calls[submitted.request_id]
        try:
            first = await self._next(call)
        except BaseException:
            self.cancel(submitted)
            raise
        if isinstance(first, ReplicaRefusal):
            self._calls.pop(submitted.request_id, None)
            raise _as_exception(first)
        return Submitted(submitted.request_id, first.predicted_ttft)

    async def _next(self, call: _Call) -> ReplicaAdmitted | RequestOutput | ReplicaRefusal:
        """The call's next message; Ray Serve's and Ray's own failures as the API's errors."""
        try:
            return await call.messages.__anext__()
        except StopAsyncIteration:
            raise
        except Exception as e:
            raise _ray_error(e, self.metrics) from e

    async def stream(self, submitted: Submitted) -> AsyncIterator[RequestOutput]:
        call = self._calls[submitted.request_id]
        finished = False
        try:
            while not finished:
                try:
                    item = await self._next(call)
                except StopAsyncIteration:
                    raise RequestFailedError("the replica ended the request without finishing it") from None
                except BaseException:
                    finished = True
                    raise
                if isinstance(item, ReplicaAdmitted):
                    continue
                if isinstance(item, ReplicaRefusal):
                    finished = True
                    raise _as_exception(item)
                finished = item.finished
                yield item
        finally:
            self._calls.pop(submitted.request_id, None)
            if not finished:
                _cancel(call)  # the replica's generator is cancelled: it aborts the request there

    async def generate(self, request_id: str, prompt: Prompt, params: SamplingParams, priority: int = 0,
                       tenant: str = DEFAULT_TENANT) -> AsyncIterator[RequestOutput]:
        submitted = self.submit(request_id, prompt, params, priority, tenant)
        async for out in self.stream(submitted):
            yield out

    def cancel(self, submitted: Submitted) -> None:
        call = self._calls.pop(submitted.request_id, None)
        if call is not None:
            _cancel(call)

    def shutdown(self) -> None:
        if self._poller is not None:
            self._poller.cancel()


def _cancel(call: _Call) -> None:
    """Cancel a call; one that already failed (refused by Ray Serve's queue, say) re-raises its
    error from cancel(), which has nothing left to cancel."""
    try:
        call.response.cancel()
    except Exception as e:
        logger.debug("cancelling a finished call: %s", e)


def _ray_error(e: Exception, metrics: Any) -> Exception:
    """Ray Serve's full queue and a failed replica as 503s the client may retry; anything else
    as a failed request (500)."""
    from ray.exceptions import RayError
    from ray.serve.exceptions import BackPressureError, RayServeException

    if isinstance(e, BackPressureError):
        metrics.reject("backpressure")
        retry = max(1, round(e._retry_after_s or _RETRY_AFTER_S))
        return AdmissionRejected(503, "backpressure", f"every replica is busy: {e}", retry)
    if isinstance(e, (RayServeException, RayError)):
        return AdmissionRejected(503, "replica_failure", f"the replica serving this request failed: {e}",
                                 _RETRY_AFTER_S)
    return RequestFailedError(f"{type(e).__name__}: {e}")


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
            request_router_class="moeserve.entrypoints.ray_serve_router:OutstandingTokensRouter",
            request_router_kwargs={"max_model_len": int(args.engine.get("max_model_len") or 2048)})
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
    application of cluster/local.yaml; until SIGTERM or SIGINT (also while it is still
    deploying), then everything stops and it returns."""
    import signal
    import threading

    import ray
    from ray import serve

    node_ip = "127.0.0.1" if host in ("127.0.0.1", "localhost") else None
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address=node_ip,
             runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}})
    stop = threading.Event()

    class _Stop(Exception):
        pass

    def on_signal(*_) -> None:
        stop.set()
        if not running.is_set():
            raise _Stop  # still deploying (a slow or retrying start): leave serve.run at once

    running = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init, whose own handlers they replace
        signal.signal(sig, on_signal)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_app(serve_args_dict(args)), name=APP_NAME, route_prefix="/")
        running.set()
        if stop.is_set():
            return
        logger.info("serving %s with %s replica(s) through Ray Serve on %s:%d", args.name,
                    args.num_replicas or "autoscaled", host, port)
        stop.wait()
    except _Stop:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
