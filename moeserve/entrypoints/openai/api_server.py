"""The OpenAI-compatible HTTP API (FastAPI): completions, chat completions, models, health,
readiness and metrics. Errors use OpenAI's shape {"error": {message, type, param, code}}:
400 for anything wrong with the request (never FastAPI's 422), 401 without a valid key, 404 for
another model name, 500 when the engine fails the request, 503 while draining or when the
engine loop is gone.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from pydantic import BaseModel, ValidationError

import moeserve
from moeserve.entrypoints.admission import AdmissionRejected
from moeserve.entrypoints.async_engine import AsyncEngine, Submitted
from moeserve.entrypoints.openai.protocol import UNSUPPORTED_FIELDS, ChatCompletionRequest, CompletionRequest
from moeserve.entrypoints.state import ServerState
from moeserve.errors import EngineDeadError, RequestFailedError
from moeserve.outputs import CompletionOutput, RequestOutput
from moeserve.router import safety
from moeserve.router.config import ROUTED_NAME, Profile
from moeserve.router.features import extract
from moeserve.router.pipeline import Attempt, RoutedTrace, apply_profile
from moeserve.router.verifier import Verification, verify
from moeserve.sampling_params import RequestOutputKind, SamplingParams

_ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 429: "RateLimitError",
                500: "InternalServerError", 503: "ServiceUnavailableError"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def _error_event(status: int, message: str) -> str:
    """An error inside a stream that has already answered 200: one SSE event in the error shape."""
    body = {"error": {"message": message, "type": _ERROR_TYPES[status], "param": None, "code": status}}
    return f"data: {json.dumps(body)}\n\n"


def error_response(status: int, message: str, param: str | None = None, headers=None) -> JSONResponse:
    body = {"error": {"message": message, "type": _ERROR_TYPES.get(status, "APIError"), "param": param,
                      "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not valid UTF-8 (byte {e.start})") from e
    try:
        body = json.loads(text)
    except json.JSONDecodeError as e:
        raise APIError(400, f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from e
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


def _parse(model: type[BaseModel], body: dict[str, Any]) -> Any:
    for key in body:
        if key in UNSUPPORTED_FIELDS:
            raise APIError(400, f"'{key}' is not supported by moeserve", param=key)
        if key not in model.model_fields:
            raise APIError(400, f"unknown field '{key}'", param=key)
    try:
        return model.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first["loc"])
        raise APIError(400, f"invalid '{loc}': {first['msg']}", param=loc) from e


def _degraded(outputs: list[RequestOutput]) -> int:
    return sum(c.num_degraded_tokens for o in outputs for c in o.outputs)


def _usage(outputs: list[RequestOutput], completion: int | None = None) -> dict[str, int]:
    """Token counts of the outputs; `completion` when they are deltas (output_kind DELTA)."""
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    if completion is None:
        completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _merge(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several requests' outputs as they come. Leaving early (client gone) cancels
    every pump, which aborts every request. One request (the usual case) needs no pump."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in stream:
                await queue.put((i, out))
        except Exception as e:
            await queue.put((i, e))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _Gate:
    """/v1/* only: 503 while draining, 401 without an accepted key. A plain ASGI middleware
    (not Starlette's BaseHTTPMiddleware, which relays every streamed chunk through an extra
    memory stream and task: a third of the front's time under a flood of streams)."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            refusal = self._refusal(scope)
            if refusal is not None:
                await refusal(scope, receive, send)
                return
            await self.app(scope, receive, self._timing_refusals(send))
            return
        await self.app(scope, receive, send)

    def _timing_refusals(self, send):
        """`send`, recording how long the app took to refuse (429/503) a request it answered so."""
        start = time.perf_counter()
        refusal_seconds = self.state.engine.metrics.refusal_seconds

        async def timed(message) -> None:
            if message["type"] == "http.response.start" and message["status"] in (429, 503):
                refusal_seconds.observe(time.perf_counter() - start)
            await send(message)

        return timed

    def _refusal(self, scope) -> Response | None:
        state, metrics = self.state, self.state.engine.metrics
        if state.draining:
            metrics.reject("draining")
            return error_response(503, "the server is shutting down", headers={"Retry-After": "5"})
        authorization = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None)
        if not state.key_ok(authorization):
            metrics.reject("auth")
            return error_response(401, "invalid or missing API key (Authorization: Bearer <key>)")
        return None


def _json_body_schema(model: type[BaseModel]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


class _ClientGone(Exception):
    """The client closed the connection before its response was ready."""


async def _unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """Await `work` while watching the connection: if the client hangs up first, cancel `work`
    (which aborts its requests in the engine) and raise _ClientGone. The body has been read,
    so the next ASGI message can only be the disconnect."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
    if not task.done() or task.cancelled():
        await asyncio.gather(task, return_exceptions=True)
        raise _ClientGone()
    return task.result()


class _Handler:
    """One completions/chat request: tokenised prompts, sampling params, response shaping."""

    def __init__(self, state: ServerState, chat: bool, body: Any, prompts: list[list[int]], params: SamplingParams,
                 priority: int, tenant: str, engine: AsyncEngine | None = None, model_name: str | None = None,
                 show_logprobs: bool = True):
        self.state, self.chat, self.body, self.prompts, self.params = state, chat, body, prompts, params
        self.priority, self.tenant = priority, tenant
        self.engine = engine or state.engine
        self.model_name = model_name or state.model_name
        self.show_logprobs = show_logprobs  # False: logprobs asked for by the router's verifier, not the client
        self.tokenizer = self.engine.tokenizer
        self.id = self.engine.new_request_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        self._chunk_head: str | None = None
        self.submitted: list[Submitted] = []
        self.degraded_tokens: int | None = None
        self.extra_headers: dict[str, str] = {}
        self.extra_fields: dict[str, Any] = {}  # added to the body's / the last chunk's "moeserve" object
        # a stream's end: called once with its latest outputs and whether every one finished;
        # returns what to add to the closing event's "moeserve" object
        self.on_stream_end: Callable[[list[RequestOutput], bool], dict[str, Any]] | None = None

    def output_kind(self) -> RequestOutputKind:
        """A stream gets deltas (the whole completion when `on_stream_end` needs it at the
        end); a whole response only its final outputs."""
        if not self.body.stream:
            return RequestOutputKind.FINAL_ONLY
        return RequestOutputKind.CUMULATIVE if self.on_stream_end is not None else RequestOutputKind.DELTA

    def submit(self) -> None:
        """Admit every prompt's request, or none (a refusal withdraws the ones already in)."""
        engine, params = self.engine, replace(self.params, output_kind=self.output_kind())
        try:
            for i, p in enumerate(self.prompts):
                self.submitted.append(engine.submit(f"{self.id}-{i}", {"prompt_token_ids": p}, params,
                                                    self.priority, self.tenant))
        except BaseException:
            self.close()
            raise

    async def admitted(self) -> None:
        """Wait until every prompt's request is admitted: at once for a local engine; a replica
        set's replica answers (admitted, or refused) before the response starts."""
        try:
            self.submitted = [await self.engine.admitted(s) for s in self.submitted]
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Withdraw whatever of this request is still in the engine (nothing, once streamed to the end)."""
        for submitted in self.submitted:
            self.engine.cancel(submitted)

    def headers(self) -> dict[str, str]:
        """The admission's TTFT prediction; once the response is whole, how many of its tokens
        ran with fewer experts than asked (a stream says it in its last chunks instead)."""
        headers = {}
        predicted = [s.predicted_ttft for s in self.submitted if s.predicted_ttft is not None]
        if predicted:
            headers["x-moeserve-predicted-ttft-ms"] = f"{1000 * max(predicted):.1f}"
        if self.degraded_tokens is not None:
            headers["x-moeserve-degraded-tokens"] = str(self.degraded_tokens)
        return headers | self.extra_headers

    def streams(self) -> list[AsyncIterator[RequestOutput]]:
        return [self.engine.stream(s) for s in self.submitted]

    def _logprobs(self, c: CompletionOutput, start: int) -> dict[str, Any] | None:
        if c.logprobs is None or not self.show_logprobs:
            return None
        tokens = c.token_ids[start:]
        entries = c.logprobs[start : start + len(tokens)]
        text = [self.tokenizer.decode([t], skip_special_tokens=False) for t in tokens]
        if self.chat:
            return {"content": [
                {"token": s, "logprob": lp[t], "bytes": list(s.encode()),
                 "top_logprobs": [{"token": self.tokenizer.decode([k], skip_special_tokens=False), "logprob": v,
                                   "bytes": list(self.tokenizer.decode([k], skip_special_tokens=False).encode())}
                                  for k, v in sorted(lp.items(), key=lambda kv: -kv[1])[: self.params.logprobs]]}
                for s, t, lp in zip(text, tokens, entries)
            ]}
        offsets, pos = [], 0
        for s in text:
            offsets.append(pos)
            pos += len(s)
        return {"tokens": text, "token_logprobs": [lp[t] for t, lp in zip(tokens, entries)],
                "top_logprobs": [{self.tokenizer.decode([k], skip_special_tokens=False): v for k, v in lp.items()}
                                 for lp in entries],
                "text_offset": offsets}

    def _choice(self, index: int, c: CompletionOutput) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": index, "logprobs": self._logprobs(c, 0), "finish_reason": c.finish_reason,
                                  "stop_reason": c.stop_reason}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": c.text}
        else:
            choice["text"] = c.text
        return choice

    async def finals(self) -> list[RequestOutput]:
        """Every prompt's finished output, in prompt order."""
        finals: dict[int, RequestOutput] = {}
        async for i, out in _merge(self.streams()):
            if out.finished:
                finals[i] = out
        return [finals[i] for i in range(len(self.prompts))]

    def body_of(self, outs: list[RequestOutput]) -> dict[str, Any]:
        n = self.params.n
        choices = [self._choice(i * n + c.index, c) for i, o in enumerate(outs) for c in o.outputs]
        self.degraded_tokens = _degraded(outs)
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model_name,
                "choices": choices, "usage": _usage(outs),
                "moeserve": {"degraded_tokens": self.degraded_tokens, **self.extra_fields}}

    def _chunk(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None,
               moeserve: dict[str, Any] | None = None) -> str:
        """One SSE event; the fields that never change are serialised once per request."""
        if self._chunk_head is None:
            head = {"id": self.id, "object": self.object + ("" if not self.chat else ".chunk"),
                    "created": self.created, "model": self.model_name}
            self._chunk_head = "data: " + json.dumps(head, ensure_ascii=False)[:-1] + ', "choices": '
        tail = "" if usage is None else f', "usage": {json.dumps(usage)}'
        if moeserve is not None:
            tail += f', "moeserve": {json.dumps(moeserve)}'
        tail += "}\n\n"
        return self._chunk_head + json.dumps(choices, ensure_ascii=False) + tail

    async def sse(self) -> AsyncIterator[str]:
        n = self.params.n
        sent_role: set[int] = set()
        finish_sent: set[int] = set()  # choices whose finishing chunk is out
        completion = 0  # tokens streamed so far, all choices (outputs may hold deltas only)
        latest: dict[int, RequestOutput] = {}
        options = self.body.stream_options
        include_usage = bool(options and options.include_usage)
        # vLLM's extension: with include_usage, every chunk also carries the usage so far.
        continuous = include_usage and options.continuous_usage_stats
        try:
            async for i, out in _merge(self.streams()):
                latest[i] = out
                choices = []
                for c in out.outputs:
                    index = i * n + c.index
                    completion += len(c.delta_token_ids)
                    if not c.delta_token_ids and not c.delta_text and not c.finished:
                        continue
                    if c.finished and index in finish_sent:
                        continue  # its finish chunk is out already
                    start = len(c.token_ids) - len(c.delta_token_ids)
                    choice: dict[str, Any] = {"index": index, "logprobs": self._logprobs(c, start) if c.delta_token_ids
                                              else None, "finish_reason": c.finish_reason}
                    if self.chat:
                        delta: dict[str, Any] = {"content": c.delta_text}
                        if index not in sent_role:
                            delta["role"] = "assistant"
                            sent_role.add(index)
                        choice["delta"] = delta
                    else:
                        choice["text"] = c.delta_text
                        choice["stop_reason"] = c.stop_reason
                    if c.finished:
                        choice["moeserve"] = {"degraded_tokens": c.num_degraded_tokens}
                    if c.finished:
                        finish_sent.add(index)
                    choices.append(choice)
                if choices:
                    yield self._chunk(choices, _usage(list(latest.values()), completion) if continuous else None)
            outs = [latest[i] for i in sorted(latest)]
            done = len(outs) == len(self.prompts) and all(o.finished for o in outs)
            end, self.on_stream_end = self.on_stream_end, None
            extra = end(outs, done) if end is not None else {}
            if include_usage or extra:
                yield self._chunk([], _usage(outs, completion) if include_usage else None,
                                  {"degraded_tokens": _degraded(outs), **self.extra_fields, **extra})
        except RequestFailedError as e:
            yield _error_event(500, str(e))
        except (EngineDeadError, AdmissionRejected) as e:
            yield _error_event(503, str(e))
        finally:
            self.close()
            if self.on_stream_end is not None:  # cut short (the client left, or the engine failed it)
                end, self.on_stream_end = self.on_stream_end, None
                end([latest[i] for i in sorted(latest)], False)
        yield "data: [DONE]\n\n"


class _MergedCollector:
    """Several registries as one: a metric family present in more than one (the same series of
    several engines, told apart by their model_name label) is yielded once with all samples."""

    def __init__(self, registries: list[CollectorRegistry]):
        self.registries = registries

    def collect(self):
        families: dict[str, Metric] = {}
        for registry in self.registries:
            for family in registry.collect():
                if family.name not in families:
                    merged = Metric(family.name, family.documentation, family.type, family.unit)
                    families[family.name] = merged
                families[family.name].samples.extend(family.samples)
        yield from families.values()


def _strings(value: Any) -> list[str]:
    """Every string inside a JSON-like value (a chat message and its extra fields)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def _redacted(value: Any, redact: Callable[[str], str]) -> Any:
    """`value` with `redact` applied to every string in it (keys, "role" and "type" excepted)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: v if k in ("role", "type") else _redacted(v, redact) for k, v in value.items()}
    if isinstance(value, list):
        return [_redacted(v, redact) for v in value]
    return value


def _attempt(profile: Profile, handler: _Handler, outs: list[RequestOutput], seconds: float) -> Attempt:
    """One generation under `profile`, verified: it passes when every choice passes."""
    config = handler.state.router.config.verifier
    failures: list[str] = []
    completion = 0
    finish = None
    for o in outs:
        for c in o.outputs:
            completion += len(c.token_ids)
            finish = c.finish_reason if finish != "length" else finish
            logprobs = [lp[t] for t, lp in zip(c.token_ids, c.logprobs)] if c.logprobs is not None else None
            failures += [f for f in verify(config, c.text, c.finish_reason, logprobs).failures if f not in failures]
    prompt = sum(len(o.prompt_token_ids) for o in outs)
    return Attempt(profile.name, prompt, completion, seconds, finish, Verification(not failures, tuple(failures)))


def build_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="moeserve", version=moeserve.__version__, docs_url=None, redoc_url=None)
    app.state.server = state
    engine = state.engine

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.param)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return error_response(400, str(exc))

    @app.exception_handler(AdmissionRejected)
    async def _rejected(request: Request, exc: AdmissionRejected):
        return error_response(exc.status, exc.message, headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(_ClientGone)
    async def _client_gone(request: Request, exc: _ClientGone):
        return Response(status_code=499)  # nobody reads it; nginx's "client closed request"

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")

    app.add_middleware(_Gate, state=state)

    @app.get("/health")
    async def health():
        for eng in state.all_engines:  # the served model's engine, then the router's other models'
            if not eng.is_alive():
                return error_response(503, f"the engine is not running: {eng.dead_reason()}")
            if eng.unavailable_reason() is not None:
                return error_response(503, eng.unavailable_reason())
        return Response(status_code=200)

    @app.get("/ready")
    async def ready():
        if not state.draining and all(e.is_alive() and e.unavailable_reason() is None for e in state.all_engines):
            return Response(status_code=200)
        return error_response(503, "not ready")

    scrape = engine.metrics.registry
    if state.engines:  # one exposition: each family once, with every engine's samples (by model_name)
        scrape = CollectorRegistry(auto_describe=False)
        scrape.register(_MergedCollector([e.metrics.registry for e in state.all_engines]))

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(scrape), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        card = {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "moeserve",
                "max_model_len": engine.max_model_len}
        cards = [card]
        if state.router is not None:
            for profile in state.router.config.profiles:
                cards.append({"id": profile.name, "object": "model", "created": state.created, "owned_by": "moeserve",
                              "max_model_len": state.engine_for(profile).max_model_len, "root": profile.model or
                              state.model_name, "moeserve": {"profile": {
                                  "model": profile.model or state.model_name, "top_k": profile.top_k,
                                  "cost_per_token": profile.cost_per_token, "max_tokens": profile.max_tokens,
                                  "slo_ttft_s": profile.slo_ttft_s, "version": state.router.config.version}}})
            cards.append({"id": ROUTED_NAME, "object": "model", "created": state.created, "owned_by": "moeserve",
                          "max_model_len": min(c["max_model_len"] for c in cards[1:]),
                          "moeserve": {"routed": list(state.router.config.names)}})
        return {"object": "list", "data": cards}

    def _prepare(request: Request, req: CompletionRequest | ChatCompletionRequest, prompts: list[Any],
                 chat: bool, profile: Profile | None = None, model_name: str | None = None) -> _Handler:
        eng = engine if profile is None else state.engine_for(profile)
        verifier_logprobs = profile is not None and state.router.config.verifier.min_mean_logprob is not None
        try:
            params = req.sampling_params(eng.info.generation_defaults)
            client_logprobs = params.logprobs is not None
            if profile is not None:
                params = apply_profile(params, profile, req.model_fields_set, verifier_logprobs)
        except ValueError as e:
            raise APIError(400, str(e)) from e
        tok, limit = eng.tokenizer, eng.max_model_len
        token_lists = []
        for p in prompts:
            ids = list(p["prompt_token_ids"]) if isinstance(p, dict) else tok.encode(p, add_special_tokens=not chat)
            try:
                eng.validate(ids)
            except ValueError as e:
                raise APIError(400, str(e), param="messages" if chat else "prompt") from e
            if params.max_tokens is not None and len(ids) + params.max_tokens > limit:
                raise APIError(400, f"this model's maximum context length is {limit} tokens; the request asks for "
                                    f"{len(ids)} prompt + {params.max_tokens} completion tokens",
                               param="max_tokens")
            token_lists.append(ids)
        priority = req.priority
        if "priority" not in req.model_fields_set and "x-priority" in request.headers:
            try:
                priority = int(request.headers["x-priority"])
            except ValueError as e:
                raise APIError(400, "the x-priority header must be an integer") from e
        handler = _Handler(state, chat, req, token_lists, params, priority, _tenant(request), eng, model_name,
                           show_logprobs=client_logprobs)
        if profile is not None:
            handler.extra_headers["x-moeserve-profile"] = profile.name
            handler.extra_fields["profile"] = profile.name
        return handler

    def _tenant(request: Request) -> str:
        key = request.headers.get("authorization", "").removeprefix("Bearer ") if state.api_keys else None
        return engine.admission.tenant_for(key, request.headers.get("x-tenant"))

    def _target(req: CompletionRequest | ChatCompletionRequest) -> Profile | str | None:
        """None: the served model; a Profile: that profile, unrouted; ROUTED_NAME: the router."""
        if req.model is None or req.model == state.model_name:
            return None
        if state.router is not None:
            if req.model == ROUTED_NAME:
                return ROUTED_NAME
            if req.model in state.router.config.names:
                return state.router.config.profile(req.model)
        names = [state.model_name] + ([*state.router.config.names, ROUTED_NAME] if state.router else [])
        raise APIError(404, f"the model '{req.model}' does not exist; this server serves "
                            f"{', '.join(repr(n) for n in names)}", param="model")

    async def _submit(handler: _Handler) -> None:
        """Submitted and admitted (or refused: 400, 429/503, before any response starts)."""
        eng = handler.engine
        if not eng.is_alive():
            raise APIError(503, f"the engine is not running: {eng.dead_reason()}")
        try:
            handler.submit()
            await handler.admitted()
        except ValueError as e:  # what only the engine's own checks know (moe_top_k above the model's K)
            raise APIError(400, str(e)) from e
        except EngineDeadError as e:
            raise APIError(503, str(e)) from e
        except RequestFailedError as e:
            raise APIError(500, f"the engine failed this request: {e}") from e

    async def _finals(request: Request, handler: _Handler) -> list[RequestOutput]:
        """A submitted request's whole result; whatever is left of it is withdrawn on the way out."""
        try:
            return await _unless_disconnected(request, handler.finals())
        except RequestFailedError as e:
            raise APIError(500, f"the engine failed this request: {e}") from e
        except EngineDeadError as e:
            raise APIError(503, str(e)) from e
        finally:
            handler.close()

    async def _respond(request: Request, handler: _Handler, stream: bool):
        await _submit(handler)
        if stream:  # Starlette cancels the body iterator when the client leaves: that aborts
            return StreamingResponse(handler.sse(), media_type="text/event-stream", headers=handler.headers())
        body = handler.body_of(await _finals(request, handler))
        return JSONResponse(body, headers=handler.headers())  # after body_of: it counts the degraded tokens

    async def _routed(request: Request, req: CompletionRequest | ChatCompletionRequest, prompts: list[Any],
                      chat: bool):
        """The router's pipeline (moeserve/router/pipeline.py). Streams are verified at their end
        and never escalated: their tokens are already with the client. Exactly one audit line
        per request, whatever happens."""
        router = state.router
        trace = RoutedTrace(engine.new_request_id("route"), _tenant(request), bool(req.stream))
        finishing_here = True
        try:
            try:
                texts = [p if isinstance(p, str) else engine.tokenizer.decode(p["prompt_token_ids"]) for p in prompts]
            except (OverflowError, TypeError, ValueError) as e:
                raise APIError(400, f"the prompt holds token ids this model does not have: {e}", param="prompt") from e
            if chat:
                # every string the template may render: contents and the messages' other fields
                texts = [s for m in req.messages for s in _strings(m.as_template_input())]
            verdict = router.gate(trace, "\n".join(texts))
            if verdict.refused:
                raise APIError(400, f"refused by the router's safety rule '{verdict.refused_by}'",
                               param="messages" if chat else "prompt")
            if verdict.redactions:
                redact = (lambda s: safety.check(router.config.safety, s).text)
                if chat:
                    req = req.model_copy(update={"messages": [
                        type(m).model_validate(_redacted(m.model_dump(exclude_none=True), redact))
                        for m in req.messages]})
                else:
                    prompts = [redact(t) for t in texts]

            joined = "\n".join(texts)
            features = extract(joined, len(engine.tokenizer.encode(joined)), trace.tenant)
            route = router.route(trace, features)
            if route.rejected:
                raise APIError(429, f"tenant '{trace.tenant}' is over its token budget for this period")
            profile = router.config.profile(route.profile)
            outs, served = None, None
            while True:
                try:
                    eng = state.engine_for(profile)
                    # token ids mean nothing to another model's tokenizer: it gets the text
                    sent = prompts if eng is engine else [p if isinstance(p, str) else t for p, t in zip(prompts, texts)]
                    handler = _prepare(request, req, _render(req, sent, chat, eng), chat, profile, ROUTED_NAME)
                    if req.stream:
                        started = time.monotonic()

                        def at_end(outs, finished, handler=handler, profile=profile, started=started):
                            try:
                                if not finished:
                                    trace.error = "the stream did not finish"
                                    router.budgets.charge(trace.tenant, sum(  # what it did use
                                        len(o.prompt_token_ids) + sum(len(c.token_ids) for c in o.outputs)
                                        for o in outs))
                                else:
                                    router.record(trace, _attempt(profile, handler, outs, time.monotonic() - started))
                            finally:
                                router.finish(trace)
                            return {"verified": trace.passed, "escalated": False, "failed_checks":
                                    list(trace.attempts[-1].verification.failures) if trace.attempts else []}

                        handler.on_stream_end = at_end
                        handler.extra_headers["x-moeserve-escalated"] = "false"
                        finishing_here = False
                        try:
                            return await _respond(request, handler, stream=True)
                        except BaseException:
                            finishing_here = True
                            raise
                    started = time.monotonic()
                    await _submit(handler)
                    attempt_outs = await _finals(request, handler)
                except _ClientGone:
                    raise
                except Exception as e:
                    if outs is None:
                        raise
                    # an escalation attempt failed: answer with the attempt that ran
                    trace.escalations.append({"from": profile.name, "to": None, "why": "error",
                                              "failed": [getattr(e, "message", None) or f"{type(e).__name__}: {e}"]})
                    break
                outs, served = attempt_outs, handler
                router.record(trace, _attempt(profile, handler, outs, time.monotonic() - started))
                following = router.escalation(trace, lambda name, h=handler: _planned_tokens(h, name))
                if following is None:
                    break
                profile = router.config.profile(following)
            handler = served
            escalated = sum(1 for e in trace.escalations if e["to"] is not None)
            handler.extra_fields.update(escalated=escalated > 0, escalations=escalated, verified=trace.passed,
                                        failed_checks=list(trace.attempts[-1].verification.failures))
            handler.extra_headers["x-moeserve-escalated"] = "true" if escalated else "false"
            return JSONResponse(handler.body_of(outs), headers=handler.headers())
        except _ClientGone:
            trace.error = "the client left"
            raise
        except Exception as e:
            if trace.refused_by is None and trace.budget_action != "rejected":
                trace.error = getattr(e, "message", None) or f"{type(e).__name__}: {e}"
            raise
        finally:
            if finishing_here:
                router.finish(trace)

    def _planned_tokens(handler: _Handler, name: str) -> int:
        """The most tokens an attempt of `handler`'s request under profile `name` can take: each
        prompt plus its max_tokens there (capped by the profile and the context), times n."""
        profile = state.router.config.profile(name)
        eng = state.engine_for(profile)
        asked = getattr(handler.body, "max_completion_tokens", None) or handler.body.max_tokens
        total = 0
        for ids in handler.prompts:
            cap = eng.max_model_len - len(ids)
            cap = min(cap, asked) if asked is not None else cap
            cap = min(cap, profile.max_tokens) if profile.max_tokens is not None else cap
            total += len(ids) + handler.params.n * max(cap, 0)
        return total

    def _render(req, prompts: list[Any], chat: bool, eng: AsyncEngine) -> list[Any]:
        """The prompts as `_prepare` takes them: a chat's messages rendered by `eng`'s template."""
        if not chat:
            return prompts
        try:
            return [eng.tokenizer.apply_chat_template([m.as_template_input() for m in req.messages],
                                                      req.add_generation_prompt, **(req.chat_template_kwargs or {}))]
        except Exception as e:
            raise APIError(400, f"the chat template cannot render these messages: {e}", param="messages") from e

    async def _serve(request: Request, req: CompletionRequest | ChatCompletionRequest, chat: bool):
        target = _target(req)
        prompts = [] if chat else req.prompts()
        if target == ROUTED_NAME:
            return await _routed(request, req, prompts, chat)
        eng = engine if target is None else state.engine_for(target)
        handler = _prepare(request, req, _render(req, prompts, chat, eng), chat, target, req.model)
        return await _respond(request, handler, req.stream)

    @app.post("/v1/completions", openapi_extra=_json_body_schema(CompletionRequest))
    async def completions(request: Request):
        return await _serve(request, _parse(CompletionRequest, await _json_body(request)), chat=False)

    @app.post("/v1/chat/completions", openapi_extra=_json_body_schema(ChatCompletionRequest))
    async def chat_completions(request: Request):
        return await _serve(request, _parse(ChatCompletionRequest, await _json_body(request)), chat=True)

    def openapi() -> dict[str, Any]:
        """FastAPI's document plus the request bodies, which the routes parse themselves (to
        answer 400 with a named field, never FastAPI's 422)."""
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (CompletionRequest, ChatCompletionRequest):
                body = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(body.pop("$defs", {}))
                components[model.__name__] = body
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app
