"""How to send: one streamed request over an OpenAI-compatible HTTP API or moeserve's gRPC,
timed on the client. TTFT = first content chunk - send; ITL = gap between content chunks;
E2E = last byte - send; output tokens from the server's `usage` when it reports it (else chunks)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import httpx

from moeserve.bench.workload import RequestSpec


@dataclass
class RequestResult:
    index: int
    sent_at: float  # seconds since the run started
    ok: bool = False
    status: int | None = None  # HTTP status; gRPC codes are mapped (UNAVAILABLE 503, RESOURCE_EXHAUSTED 429)
    error: str | None = None
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    e2e: float | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    refused_after: float | None = None  # seconds until a 429/503 answer came
    predicted_ttft: float | None = None  # the server's own prediction (moeserve's admission header)
    degraded_tokens: int | None = None  # tokens run with fewer experts than asked (moeserve says so)

    @property
    def tpot(self) -> float | None:
        """(E2E - TTFT) / (output tokens - 1), as vLLM defines it."""
        if not self.ok or self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


class _TokenClock:
    """Arrival times of content-carrying chunks: the first, the gaps, the count."""

    def __init__(self) -> None:
        self.first: float | None = None
        self.last: float | None = None
        self.chunks = 0

    def tick(self, result: RequestResult) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        else:
            result.itl.append(now - self.last)
        self.last = now
        self.chunks += 1


@dataclass(frozen=True)
class HttpTarget:
    base_url: str
    endpoint: str  # "completions" | "chat"
    model: str
    api_key: str | None = None
    temperature: float = 0.0
    ignore_eos: bool = True

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def body(self, spec: RequestSpec) -> dict:
        common = {"model": self.model, "max_tokens": spec.output_len, "temperature": self.temperature,
                  "stream": True, "stream_options": {"include_usage": True}}
        if self.ignore_eos:
            common["ignore_eos"] = True
        if self.endpoint == "chat":
            text = spec.prompt if isinstance(spec.prompt, str) else " ".join(map(str, spec.prompt))
            return {**common, "messages": [{"role": "user", "content": text}]}
        return {**common, "prompt": spec.prompt}

    async def send(self, client: httpx.AsyncClient, index: int, spec: RequestSpec, sent_at: float) -> RequestResult:
        result = RequestResult(index, sent_at)
        path = "/v1/chat/completions" if self.endpoint == "chat" else "/v1/completions"
        start = time.perf_counter()
        clock, usage = _TokenClock(), None
        try:
            async with client.stream("POST", path, json=self.body(spec), headers=self.headers()) as r:
                result.status = r.status_code
                predicted = r.headers.get("x-moeserve-predicted-ttft-ms")
                result.predicted_ttft = float(predicted) / 1000 if predicted else None
                if r.status_code != 200:
                    text = (await r.aread()).decode(errors="replace")
                    result.error = _error_message(text) or f"HTTP {r.status_code}"
                    if r.status_code in (429, 503):
                        result.refused_after = time.perf_counter() - start
                    return result
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        result.error = _error_message(data) or "error event in stream"
                        return result
                    for choice in chunk.get("choices") or []:
                        text = choice.get("text") or (choice.get("delta") or {}).get("content")
                        if text:
                            clock.tick(result)
                        if "moeserve" in choice:
                            result.degraded_tokens = choice["moeserve"].get("degraded_tokens")
                    if "moeserve" in chunk:
                        result.degraded_tokens = chunk["moeserve"].get("degraded_tokens")
                    usage = chunk.get("usage") or usage
            end = time.perf_counter()
        except (httpx.HTTPError, json.JSONDecodeError) as e:
            result.error = f"{type(e).__name__}: {e}"
            return result
        result.ok = clock.first is not None
        if not result.ok:
            result.error = "the stream carried no tokens"
            return result
        result.ttft, result.e2e = clock.first - start, end - start
        result.output_tokens = usage["completion_tokens"] if usage else clock.chunks
        result.prompt_tokens = usage["prompt_tokens"] if usage else (spec.input_len or 0)
        return result


def _error_message(text: str) -> str | None:
    try:
        err = json.loads(text).get("error")
        return err.get("message") if isinstance(err, dict) else str(err)
    except (json.JSONDecodeError, AttributeError):
        return text[:200] or None


@dataclass(frozen=True)
class GrpcTarget:
    """moeserve's gRPC GenerateStream (proto/moeserve.proto)."""

    address: str
    temperature: float = 0.0
    ignore_eos: bool = True

    async def send(self, channel, index: int, spec: RequestSpec, sent_at: float) -> RequestResult:
        import grpc

        from moeserve.grpc_gen import moeserve_pb2 as pb
        from moeserve.grpc_gen import moeserve_pb2_grpc as pb_grpc

        result = RequestResult(index, sent_at)
        options = pb.SamplingOptions(max_tokens=spec.output_len, temperature=self.temperature,
                                     ignore_eos=self.ignore_eos)
        if isinstance(spec.prompt, str):
            request = pb.GenerateRequest(text=spec.prompt, sampling=options)
        else:
            request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=spec.prompt), sampling=options)
        start = time.perf_counter()
        clock = _TokenClock()
        try:
            async for reply in pb_grpc.GenerationStub(channel).GenerateStream(request):
                if reply.token_ids:
                    clock.tick(result)
                result.output_tokens, result.prompt_tokens = reply.completion_tokens, reply.prompt_tokens
                result.degraded_tokens = reply.degraded_tokens
        except grpc.aio.AioRpcError as e:
            result.status = {grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
                             grpc.StatusCode.INVALID_ARGUMENT: 400}.get(e.code(), 500)
            result.error = f"{e.code().name}: {e.details()}"
            if result.status in (429, 503):
                result.refused_after = time.perf_counter() - start
            return result
        end = time.perf_counter()
        result.status, result.ok = 200, clock.first is not None
        if result.ok:
            result.ttft, result.e2e = clock.first - start, end - start
        else:
            result.error = "the stream carried no tokens"
        return result
