"""The gRPC front (proto/moeserve.proto): Generate and GenerateStream over the same AsyncEngine
as HTTP, plus grpc.health.v1 and server reflection.

The same rules as HTTP: admission control refuses with RESOURCE_EXHAUSTED (quota; HTTP 429) or
UNAVAILABLE (overload; HTTP 503), the message and a `retry-after` trailer saying what HTTP says;
the tenant is the API key, else metadata `x-tenant`. With API keys set, every Generation call needs metadata
`authorization: Bearer <key>` (UNAUTHENTICATED otherwise); health and reflection stay open, as
/health does. While draining, health answers NOT_SERVING and new calls get UNAVAILABLE; calls in
flight run on. A cancelled RPC or an exceeded deadline cancels the handler, which aborts the
request (its blocks are free before the next step).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from moeserve.errors import EngineDeadError, RequestFailedError
from moeserve.entrypoints.admission import AdmissionRejected
from moeserve.entrypoints.state import ServerState
from moeserve.grpc_gen import moeserve_pb2 as pb
from moeserve.grpc_gen import moeserve_pb2_grpc as pb_grpc
from moeserve.outputs import RequestOutput
from moeserve.sampling_params import RequestOutputKind, SamplingParams

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generation"].full_name
_OPEN_SERVICES = (health.SERVICE_NAME, reflection.SERVICE_NAME, "grpc.reflection.v1.ServerReflection")
_OPTIONAL = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
             "repetition_penalty", "seed", "min_tokens", "ignore_eos", "logprobs", "skip_special_tokens", "moe_top_k")


def sampling_params(options: pb.SamplingOptions) -> SamplingParams:
    values = {name: getattr(options, name) for name in _OPTIONAL if options.HasField(name)}
    if options.stop:
        values["stop"] = tuple(options.stop)
    if options.stop_token_ids:
        values["stop_token_ids"] = tuple(options.stop_token_ids)
    return SamplingParams(**values)


def _response(out: RequestOutput, completion_tokens: int) -> pb.GenerateResponse:
    """One message with what `out` carries: the whole completion (a FINAL_ONLY request's one
    output) or what is new (a DELTA request's); `completion_tokens` counts all so far."""
    c = out.outputs[0]
    logprobs = []
    if c.logprobs is not None:
        logprobs = [pb.TokenLogprob(token_id=t, logprob=lp[t], top=lp) for t, lp in zip(c.token_ids, c.logprobs)]
    return pb.GenerateResponse(
        request_id=out.request_id, text=c.text, token_ids=list(c.token_ids),
        logprobs=logprobs, finish_reason=c.finish_reason or "", prompt_tokens=len(out.prompt_token_ids),
        completion_tokens=completion_tokens, degraded_tokens=c.num_degraded_tokens,
    )


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls to every service but health and reflection without an accepted key."""

    def __init__(self, state: ServerState):
        self.state = state

    async def intercept_service(self, continuation: Callable[..., Awaitable], details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        service = details.method.lstrip("/").split("/")[0]
        if handler is None or service in _OPEN_SERVICES:
            return handler
        authorization = next((v for k, v in details.invocation_metadata or () if k == "authorization"), None)
        if self.state.key_ok(authorization):
            return handler
        self.state.engine.metrics.reject("auth")

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "invalid or missing API key (metadata authorization: Bearer <key>)")

        codecs = dict(request_deserializer=handler.request_deserializer,
                      response_serializer=handler.response_serializer)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(deny, **codecs)
        return grpc.unary_unary_rpc_method_handler(deny, **codecs)


class GenerationServicer(pb_grpc.GenerationServicer):
    def __init__(self, state: ServerState):
        self.state = state
        self.engine = state.engine

    async def _stream(self, request: pb.GenerateRequest, context, kind: RequestOutputKind):
        if self.state.draining:
            self.engine.metrics.reject("draining")
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        try:
            params = sampling_params(request.sampling)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if params.n != 1:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "n must be 1 over gRPC")
        params = replace(params, output_kind=kind)
        which = request.WhichOneof("prompt")
        if which is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the request has no prompt (text or token_ids)")
        prompt = request.text if which == "text" else {"prompt_token_ids": list(request.token_ids.ids)}
        request_id = request.request_id or self.engine.new_request_id("grpc")
        metadata = dict(context.invocation_metadata() or ())
        key = metadata.get("authorization", "").removeprefix("Bearer ") if self.state.api_keys else None
        tenant = self.engine.admission.tenant_for(key, metadata.get("x-tenant"))
        try:
            async for out in self.engine.generate(request_id, prompt, params, request.priority, tenant):
                yield out
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except AdmissionRejected as e:
            code = grpc.StatusCode.RESOURCE_EXHAUSTED if e.status == 429 else grpc.StatusCode.UNAVAILABLE
            context.set_trailing_metadata((("retry-after", str(e.retry_after)),))
            await context.abort(code, e.message)
        except RequestFailedError as e:
            await context.abort(grpc.StatusCode.INTERNAL, f"the engine failed this request: {e}")
        except EngineDeadError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))

    async def Generate(self, request, context):
        final = None
        async for out in self._stream(request, context, RequestOutputKind.FINAL_ONLY):
            final = out
        return _response(final, len(final.outputs[0].token_ids))

    async def GenerateStream(self, request, context):
        completion_tokens = 0
        async for out in self._stream(request, context, RequestOutputKind.DELTA):
            completion_tokens += len(out.outputs[0].delta_token_ids)
            yield _response(out, completion_tokens)


class GrpcFront:
    """A started gRPC server and its health service."""

    def __init__(self, server: grpc.aio.Server, health_servicer: health.aio.HealthServicer, port: int):
        self.server, self.health, self.port = server, health_servicer, port

    async def drain(self) -> None:
        """Health turns NOT_SERVING (on SIGTERM, or when the engine dies); new calls are refused
        by the servicer, which reads the server state and the engine's."""
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def set_serving(self, serving: bool) -> None:
        """Health follows the engine while it rebuilds lost expert-parallel workers."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)

    async def stop(self, grace: float) -> None:
        await self.server.stop(grace=grace)


async def start_grpc_server(state: ServerState, host: str, port: int) -> GrpcFront:
    """Start serving; port 0 picks a free one (GrpcFront.port is the one bound)."""
    server = grpc.aio.server(interceptors=[AuthInterceptor(state)])
    pb_grpc.add_GenerationServicer_to_server(GenerationServicer(state), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    for service in ("", SERVICE_NAME):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    return GrpcFront(server, health_servicer, bound)
