"""The HTTP and gRPC fronts through real clients against a real `moeserve serve` process."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from moeserve import LLM, SamplingParams
from server_utils import start_server

pytestmark = pytest.mark.slow
PROMPT = "def f_7(x, y=3):\n    return"


@pytest.fixture(scope="module")
def server(checkpoints, tmp_path_factory):
    log = tmp_path_factory.mktemp("log") / "server.log"
    s = start_server(str(checkpoints("mixtral")), "--max-model-len", "128", "--expert-metrics", "expert",
                     "--no-enable-prefix-caching", "--served-model-name", "tiny-mixtral", log_path=str(log))
    yield s
    assert s.stop() == 0, log.read_text()


@pytest.fixture(scope="module")
def offline(checkpoints):
    return LLM(str(checkpoints("mixtral")), max_model_len=128)


def _openai(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key="unused")


def test_openai_client_completions_match_offline(server, offline):
    client = _openai(server)
    expected = offline.generate(PROMPT, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0].outputs[0]
    out = client.completions.create(model="tiny-mixtral", prompt=PROMPT, max_tokens=12, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.choices[0].text == expected.text
    assert out.usage.completion_tokens == 12 and out.usage.prompt_tokens == len(offline.get_tokenizer().encode(PROMPT))
    stream = client.completions.create(model="tiny-mixtral", prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == expected.text


def test_openai_client_chat_matches_offline(server, offline):
    client = _openai(server)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the expert router"}]
    expected = offline.chat(messages, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0].outputs[0]
    out = client.chat.completions.create(model="tiny-mixtral", messages=messages, max_tokens=10, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert out.choices[0].message.content == expected.text and out.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="tiny-mixtral", messages=messages, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert chunks[-1].usage.completion_tokens == 10 and chunks[-1].choices == []
    chunks = list(client.chat.completions.create(
        model="tiny-mixtral", messages=messages, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}, extra_body={"ignore_eos": True}))
    running = [c.usage.completion_tokens for c in chunks if c.choices]
    assert running == sorted(running) and running[-1] == 10 and chunks[-1].usage.completion_tokens == 10


def test_sampling_options_and_logprobs(server):
    client = _openai(server)
    out = client.completions.create(model="tiny-mixtral", prompt=PROMPT, max_tokens=6, temperature=0.8, seed=3, n=2,
                                    logprobs=2, extra_body={"top_k": 20, "min_p": 0.01, "repetition_penalty": 1.1})
    assert [c.index for c in out.choices] == [0, 1] and out.usage.completion_tokens <= 12
    again = client.completions.create(model="tiny-mixtral", prompt=PROMPT, max_tokens=6, temperature=0.8, seed=3, n=2,
                                      logprobs=2, extra_body={"top_k": 20, "min_p": 0.01, "repetition_penalty": 1.1})
    assert [c.text for c in out.choices] == [c.text for c in again.choices]
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) and all(v <= 0 for v in lp.token_logprobs)
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-mixtral"]


def test_grpc_matches_http_and_reports_health(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from moeserve.grpc_gen import moeserve_pb2 as pb
    from moeserve.grpc_gen import moeserve_pb2_grpc as pb_grpc

    http = httpx.post(f"{server.url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 9, "temperature": 0,
                                                           "ignore_eos": True, "logprobs": 0}).json()
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        stub = pb_grpc.GenerationStub(channel)
        request = pb.GenerateRequest(text=PROMPT, sampling=pb.SamplingOptions(max_tokens=9, temperature=0,
                                                                              ignore_eos=True))
        unary = stub.Generate(request, timeout=60)
        streamed = list(stub.GenerateStream(request, timeout=60))
    assert unary.text == http["choices"][0]["text"] and unary.finish_reason == "length"
    assert len(unary.token_ids) == 9 == http["usage"]["completion_tokens"]
    assert [t for r in streamed for t in r.token_ids] == list(unary.token_ids)
    assert "".join(r.text for r in streamed) == unary.text and streamed[-1].finish_reason == "length"
    counts = [r.completion_tokens for r in streamed]  # the tokens so far, though each message holds its delta
    assert unary.completion_tokens == 9 and counts[-1] == 9
    assert counts == [sum(len(r.token_ids) for r in streamed[: i + 1]) for i in range(len(streamed))]
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.GenerationStub(channel).Generate(
                pb.GenerateRequest(token_ids=pb.TokenIds(ids=[]), sampling=pb.SamplingOptions()), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "empty" in err.value.details()


def _metrics(server) -> dict:
    text = httpx.get(f"{server.url}/metrics").text
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_metrics_parse_and_expert_counters_add_up(server):
    before = _metrics(server)
    layer_before = {s.labels["layer"]: s.value for s in before["moeserve:moe_layer_tokens"].samples
                    if s.name.endswith("_total")}
    used = []
    for prompt in ("the expert router", "caché naïve 日本語", PROMPT):
        r = httpx.post(f"{server.url}/v1/completions", json={"prompt": prompt, "max_tokens": 7, "ignore_eos": True})
        used.append(r.json()["usage"])
    after = _metrics(server)
    # Tokens the model ran: each prompt once (no prefix cache), each output token but the last fed back.
    ran = sum(u["prompt_tokens"] + u["completion_tokens"] - 1 for u in used)
    k = {s.labels["layer"]: s.value for s in after["moeserve:moe_top_k"].samples}
    per_expert: dict[str, float] = {}
    for s in after["moeserve:expert_routed_tokens"].samples:
        if s.name.endswith("_total"):
            per_expert[s.labels["layer"]] = per_expert.get(s.labels["layer"], 0) + s.value
    for s in after["moeserve:moe_layer_tokens"].samples:
        if s.name.endswith("_total"):
            layer = s.labels["layer"]
            assert s.value - layer_before[layer] == ran
            assert per_expert[layer] == k[layer] * s.value
    for name in ("moeserve:time_to_first_token_seconds", "moeserve:inter_token_latency_seconds",
                 "moeserve:e2e_request_latency_seconds", "moeserve:request_queue_time_seconds",
                 "moeserve:time_per_output_token_seconds", "moeserve:kv_cache_usage_perc",
                 "moeserve:moe_balancedness", "moeserve:moe_gate_entropy", "moeserve:request_success"):
        assert name in after, name
    success = {s.labels["finished_reason"]: s.value for s in after["moeserve:request_success"].samples
               if s.name.endswith("_total")}
    assert success["length"] >= 3


BAD_REQUESTS = [
    (b'{"prompt": "x", "max_tokens": 4', "not valid JSON"),
    (b'\xff\xfe{"prompt": "x"}', "not valid UTF-8"),
    (b'["prompt"]', "must be a JSON object"),
    (json.dumps({"prompt": "x", "max_tokens": "four"}).encode(), "max_tokens"),
    (json.dumps({"prompt": "x", "max_tokens": -3}).encode(), "invalid 'max_tokens': Input should be greater than or equal to 1"),
    (json.dumps({"prompt": "x", "max_tokens": 10**9}).encode(), "maximum context length is 128"),
    (json.dumps({"prompt": "x " * 300, "max_tokens": 4}).encode(), "max_model_len=128"),
    (json.dumps({"prompt": "x", "logit_bias": {"5": 10}}).encode(), "'logit_bias' is not supported"),
    (json.dumps({"prompt": "x", "temperature": -1}).encode(), "invalid 'temperature': Input should be greater than or equal to 0"),
    (json.dumps({"prompt": "x", "frobnicate": 1}).encode(), "unknown field 'frobnicate'"),
    (json.dumps({"prompt": "x", "n": 129}).encode(), "invalid 'n': Input should be less than or equal to 128"),
    (json.dumps({"prompt": "x", "moe_top_k": 4}).encode(), "moe_top_k=4 is more than the model's 3 experts"),
    (json.dumps({"prompt": [1, 2, 99999]}).encode(), "outside the vocabulary"),
]
BAD_CHATS = [
    (json.dumps({"messages": []}).encode(), "messages"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "tools": []}).encode(), "'tools' is not supported"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}}).encode(),
     "'response_format' is not supported"),
]


@pytest.mark.parametrize("body, message", BAD_REQUESTS + [(b, m) for b, m in BAD_CHATS])
def test_bad_requests_are_400_and_the_server_goes_on(server, body, message):
    path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
    r = httpx.post(f"{server.url}{path}", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert message in error["message"] and error["type"] == "BadRequestError" and error["code"] == 400
    ok = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x", "max_tokens": 2})
    assert ok.status_code == 200


def test_unknown_model_is_404(server):
    r = httpx.post(f"{server.url}/v1/completions", json={"model": "gpt-4", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"


def _free_blocks(server) -> float:
    return _metrics(server)["moeserve:num_free_kv_blocks"].samples[0].value


def _running(server) -> float:
    return _metrics(server)["moeserve:num_requests_running"].samples[0].value


def _admitted(server) -> float:
    family = _metrics(server).get("moeserve:admission_admitted")
    return sum(s.value for s in family.samples if s.name.endswith("_total")) if family else 0.0


def _waiting(server) -> float:
    return _metrics(server)["moeserve:num_requests_waiting"].samples[0].value


def _generated(server) -> float:
    family = _metrics(server).get("moeserve:generation_tokens")
    return sum(s.value for s in family.samples if s.name.endswith("_total")) if family else 0.0


def _wait_for(predicate, timeout: float) -> float:
    """Seconds until predicate() held (polled every 20 ms), or inf."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.02)
    return float("inf")


def _decode_rate(server, seconds: float = 0.5) -> float:
    """Tokens/s the server generates now (requests must be running)."""
    n0, t0 = _generated(server), time.monotonic()
    time.sleep(seconds)
    return (_generated(server) - n0) / (time.monotonic() - t0)


# Aborts are checked against requests that would run for far longer than the time allowed for
# their blocks to come back: the default model, 1000 tokens, EOS ignored.
LONG = 1000
RETURN_BOUND = 1.0


@pytest.fixture(scope="module")
def long_server(tmp_path_factory):
    from moeserve.cli import _default_model

    log = tmp_path_factory.mktemp("log") / "server.log"
    s = start_server(_default_model()[0], "--max-model-len", "1024", log_path=str(log))
    yield s
    assert s.stop() == 0, log.read_text()


def test_200_client_disconnects_free_every_block(long_server):
    server = long_server
    start = _free_blocks(server)
    body = {"prompt": PROMPT, "max_tokens": LONG, "ignore_eos": True, "stream": True}

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            for _ in range(200):
                async with client.stream("POST", "/v1/completions", json=body) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            break  # the request runs (a token came): hang up mid-stream

    asyncio.run(run())
    assert _wait_for(lambda: _free_blocks(server) == start, RETURN_BOUND) < RETURN_BOUND
    assert _running(server) == 0  # had the aborts been lost, 200 x 1000 tokens would run for minutes


def test_clients_gone_before_the_first_chunk_free_every_block(long_server):
    """A client that sends a stream request and hangs up at once, before the response starts:
    however far the server got (queued, admitted, headers sent), its request is withdrawn."""
    server = long_server
    start, admitted = _free_blocks(server), _admitted(server)
    payload = json.dumps({"prompt": PROMPT, "max_tokens": LONG, "ignore_eos": True, "stream": True}).encode()
    host, port = server.url.removeprefix("http://").split(":")
    head = (f"POST /v1/completions HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(payload)}\r\n\r\n").encode()
    for _ in range(50):
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(head + payload)
            sock.shutdown(socket.SHUT_RDWR)
    assert _wait_for(lambda: _admitted(server) - admitted == 50, 10.0) < 10.0  # every one reached the engine
    idle = lambda: _free_blocks(server) == start and _running(server) == 0 == _waiting(server)  # noqa: E731
    assert _wait_for(idle, 5.0) < 5.0  # a request left behind would run 1000 tokens: minutes
    time.sleep(0.5)
    assert idle()


def test_grpc_cancel_and_deadline_abort(long_server):
    from moeserve.grpc_gen import moeserve_pb2 as pb
    from moeserve.grpc_gen import moeserve_pb2_grpc as pb_grpc

    server = long_server
    start = _free_blocks(server)
    request = pb.GenerateRequest(text=PROMPT, sampling=pb.SamplingOptions(max_tokens=LONG, ignore_eos=True))
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = pb_grpc.GenerationStub(channel)
        call = stub.GenerateStream(request, timeout=120)
        next(call)
        assert _running(server) == 1
        natural = LONG / _decode_rate(server)
        assert natural > 4 * RETURN_BOUND, f"a {LONG}-token request runs only {natural:.1f}s"
        call.cancel()
        assert _wait_for(lambda: _free_blocks(server) == start, RETURN_BOUND) < RETURN_BOUND

        future = stub.Generate.future(request, timeout=3.0)
        assert _wait_for(lambda: _running(server) == 1, 3.0) < 3.0  # running before its deadline
        with pytest.raises(grpc.RpcError) as err:
            future.result()
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert _wait_for(lambda: _free_blocks(server) == start, RETURN_BOUND) < RETURN_BOUND
        assert _running(server) == 0


def test_64_concurrent_streams_complete(server):
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 1.0, "logprobs": 0, "stream": True,
            "stream_options": {"include_usage": True}}

    async def one(client, i):
        tokens, usage, done = 0, None, False
        async with client.stream("POST", "/v1/completions", json={**body, "seed": i}) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    chunk = json.loads(line[6:])
                    for choice in chunk["choices"]:
                        tokens += len(choice["logprobs"]["tokens"]) if choice["logprobs"] else 0
                    usage = chunk.get("usage", usage)
        return done, tokens, usage

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=120,
                                     limits=httpx.Limits(max_connections=64)) as client:
            return await asyncio.gather(*(one(client, i) for i in range(64)))

    results = asyncio.run(run())
    assert len(results) == 64
    for done, tokens, usage in results:
        assert done and usage is not None and tokens == usage["completion_tokens"] > 0


def test_grpc_reflection_lists_the_services(server):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"moeserve.v1.Generation", "grpc.health.v1.Health"} <= services
