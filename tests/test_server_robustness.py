"""A server that survives its clients: keys, graceful SIGTERM, failures confined to one request."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import grpc
import httpx
import pytest
import uvicorn

from moeserve.config import engine_config
from moeserve.entrypoints.async_engine import AsyncEngine
from moeserve.entrypoints.openai.api_server import build_app
from moeserve.entrypoints.state import ServerState
from server_utils import free_port, start_server

pytestmark = pytest.mark.slow


def test_api_keys_guard_v1_only(checkpoints, tmp_path):
    log = tmp_path / "server.log"
    server = start_server(str(checkpoints("mixtral")), "--max-model-len", "64", "--api-key", "k-one",
                          "--api-key", "k-two", log_path=str(log))
    try:
        url = server.url
        assert httpx.get(f"{url}/v1/models").status_code == 401
        wrong = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer k-three"})
        assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "AuthenticationError"
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": "k-one"}).status_code == 401
        for key in ("k-one", "k-two"):
            assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 2},
                       headers={"Authorization": "Bearer k-two"})
        assert r.status_code == 200
        assert httpx.get(f"{url}/health").status_code == 200 and httpx.get(f"{url}/metrics").status_code == 200
    finally:
        assert server.stop() == 0
    assert "API is open" not in log.read_text()


def test_sigterm_drains_then_exits_zero(checkpoints, tmp_path):
    log = tmp_path / "server.log"
    server = start_server(str(checkpoints("mixtral")), "--max-model-len", "512", "--shutdown-timeout", "60",
                          log_path=str(log))
    body = {"prompt": "def f(x):", "max_tokens": 400, "ignore_eos": True, "stream": True}
    started: list[int] = []
    all_started = threading.Event()

    async def consume(client):
        text, finish = "", None
        async with client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            seen = False
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    choice = json.loads(line[6:])["choices"][0]
                    text += choice["text"]
                    finish = choice["finish_reason"] or finish
                    if not seen:
                        seen = True
                        started.append(1)
                        if len(started) == 8:
                            all_started.set()
        return finish

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            return await asyncio.gather(*(consume(client) for _ in range(8)))

    results: list = []
    worker = threading.Thread(target=lambda: results.extend(asyncio.run(run())))
    worker.start()
    assert all_started.wait(timeout=60)  # every stream is running
    server.proc.send_signal(15)
    time.sleep(0.2)
    refused = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x", "max_tokens": 2})
    assert refused.status_code == 503 and refused.headers["retry-after"]
    assert httpx.get(f"{server.url}/ready").status_code == 503
    worker.join(timeout=120)
    assert results == ["length"] * 8  # every request in flight ran to its end
    assert server.proc.wait(timeout=60) == 0
    assert "API is open" in log.read_text()  # started without --api-key, and said so


class _InProcessFront:
    """The real front (the app on uvicorn, AsyncEngine and its engine process) with the front in
    this process, on an event loop in a thread, so a test can reach into the front."""

    def __init__(self, model: str):
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        start = AsyncEngine.start(engine_config(model, max_model_len=64), "tiny")
        self.engine = asyncio.run_coroutine_threadsafe(start, self.loop).result(120)
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(build_app(ServerState(self.engine, "tiny")), host="127.0.0.1",
                                                    port=self.port, log_level="warning"))
        self.serving = asyncio.run_coroutine_threadsafe(self.server.serve(), self.loop)
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def on_loop(self, fn):
        async def call():
            return fn()
        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(30)

    def close(self):
        self.server.should_exit = True
        self.serving.result(10)
        self.on_loop(self.engine.shutdown)
        self.loop.call_soon_threadsafe(self.loop.stop)


def test_a_failure_in_one_request_fails_only_that_request(checkpoints):
    """Detokenising one request raises (in the front): that request gets 500 and its sequence is
    released in the engine; the others complete and every block comes back."""
    server = _InProcessFront(str(checkpoints("mixtral")))
    try:
        engine = server.engine
        poison = 451
        decode = engine.tokenizer.decode

        def faulty_decode(ids, skip_special_tokens=True):  # fault injection: one request's detokenisation fails
            if poison in ids:
                raise RuntimeError("injected detokenizer fault")
            return decode(ids, skip_special_tokens=skip_special_tokens)

        engine.tokenizer.decode = faulty_decode
        start_free = engine.latest_stats.num_free_blocks

        async def run():
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
                good = [client.post("/v1/completions", json={"prompt": [5, 6, 7, i], "max_tokens": 6})
                        for i in range(8, 12)]
                bad = client.post("/v1/completions", json={"prompt": [5, 6, poison], "max_tokens": 6})
                return await asyncio.gather(bad, *good)

        bad, *good = asyncio.run(run())
        assert bad.status_code == 500
        assert "injected detokenizer fault" in bad.json()["error"]["message"]
        assert bad.json()["error"]["type"] == "InternalServerError"
        assert [r.status_code for r in good] == [200] * 4
        assert all(r.json()["usage"]["completion_tokens"] == 6 for r in good)
        assert httpx.get(f"{server.url}/health").status_code == 200
        again = httpx.post(f"{server.url}/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 3})
        assert again.status_code == 200
        deadline = time.monotonic() + 5
        while engine.latest_stats.num_free_blocks != start_free and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.latest_stats.num_free_blocks == start_free

        server.on_loop(engine.shutdown)  # the engine really gone: now, and only now, /health says so
        assert httpx.get(f"{server.url}/health").status_code == 503
        assert httpx.post(f"{server.url}/v1/completions", json={"prompt": "x"}).status_code == 503
    finally:
        server.close()


def test_a_dead_engine_loop_fails_every_request_fast(checkpoints, tmp_path):
    """An exception outside the per-request paths (here: in the scheduler) ends the engine loop.
    The request in flight and every later one get 503 at once; /health says 503."""
    log = tmp_path / "server.log"
    server = start_server(str(checkpoints("mixtral")), "--max-model-len", "512", log_path=str(log),
                          env={"MOESERVE_INJECT_FAULTS": "schedule@40"})
    try:
        body = {"prompt": "def f(x):", "max_tokens": 400, "ignore_eos": True}
        start = time.monotonic()
        r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
        assert r.status_code == 503, r.text
        assert "engine" in r.json()["error"]["message"] and "injected fault" in r.json()["error"]["message"]
        assert time.monotonic() - start < 10
        assert httpx.get(f"{server.url}/health").status_code == 503
        assert httpx.get(f"{server.url}/ready").status_code == 503
        again = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=5)
        assert again.status_code == 503 and again.json()["error"]["type"] == "ServiceUnavailableError"
        stream = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x", "max_tokens": 2, "stream": True},
                            timeout=5)
        assert stream.status_code == 503
        from moeserve.grpc_gen import moeserve_pb2 as pb
        from moeserve.grpc_gen import moeserve_pb2_grpc as pb_grpc

        with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            with pytest.raises(grpc.RpcError) as err:
                pb_grpc.GenerationStub(channel).Generate(pb.GenerateRequest(text="x"), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "injected fault" in err.value.details()
    finally:
        server.stop()


def test_grpc_checks_the_api_key_and_reports_draining(checkpoints, tmp_path):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    from moeserve.grpc_gen import moeserve_pb2 as pb
    from moeserve.grpc_gen import moeserve_pb2_grpc as pb_grpc

    server = start_server(str(checkpoints("mixtral")), "--max-model-len", "512", "--api-key", "k-one",
                          "--shutdown-timeout", "60", log_path=str(tmp_path / "server.log"))
    short = pb.GenerateRequest(text="x", sampling=pb.SamplingOptions(max_tokens=2))
    good = (("authorization", "Bearer k-one"),)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            stub, health = pb_grpc.GenerationStub(channel), health_pb2_grpc.HealthStub(channel)
            for metadata in ((), (("authorization", "Bearer k-two"),), (("authorization", "k-one"),)):
                with pytest.raises(grpc.RpcError) as err:
                    stub.Generate(short, metadata=metadata, timeout=10)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
                with pytest.raises(grpc.RpcError) as err:
                    next(stub.GenerateStream(short, metadata=metadata, timeout=10))
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert len(stub.Generate(short, metadata=good, timeout=30).token_ids) == 2
            # Health and reflection stay open, as /health does.
            assert health.Check(health_pb2.HealthCheckRequest(service="")).status == \
                health_pb2.HealthCheckResponse.SERVING
            assert "moeserve.v1.Generation" in set(ProtoReflectionDescriptorDatabase(channel).get_services())

            long = pb.GenerateRequest(text="def f(x):", sampling=pb.SamplingOptions(max_tokens=300, ignore_eos=True))
            running = stub.GenerateStream(long, metadata=good, timeout=120)
            next(running)
            server.proc.send_signal(15)
            deadline = time.monotonic() + 5
            status = None
            while time.monotonic() < deadline:
                status = health.Check(health_pb2.HealthCheckRequest(service="")).status
                if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
                time.sleep(0.05)
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert health.Check(health_pb2.HealthCheckRequest(service="moeserve.v1.Generation")).status == \
                health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as err:
                stub.Generate(short, metadata=good, timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in err.value.details()
            rest = list(running)  # the request in flight runs to its end
            assert rest[-1].finish_reason == "length" and rest[-1].completion_tokens == 300
        assert server.proc.wait(timeout=60) == 0
    finally:
        server.stop()


def _metric(url: str, name: str) -> float:
    """A series' value; 0 for a labelled counter nothing has touched yet."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    return 0.0


def test_a_non_streaming_client_that_hangs_up_aborts_its_request(tmp_path):
    """Four non-streaming 1000-token requests whose clients close their sockets: the engine stops
    running them within a second, far sooner than they would have finished."""
    from moeserve.cli import _default_model

    server = start_server(_default_model()[0], "--max-model-len", "1024", log_path=str(tmp_path / "server.log"))
    body = json.dumps({"prompt": "def f(x):", "max_tokens": 1000, "ignore_eos": True}).encode()
    request = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (len(body), body))

    async def run():
        writers = []
        for _ in range(4):
            _, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(request)
            await writer.drain()
            writers.append(writer)
        deadline = time.monotonic() + 30
        while _metric(server.url, "moeserve:num_requests_running") < 4:
            assert time.monotonic() < deadline, "the requests never ran"
            await asyncio.sleep(0.05)
        t0, n0 = time.monotonic(), _metric(server.url, "moeserve:generation_tokens_total")
        await asyncio.sleep(0.5)
        rate = (_metric(server.url, "moeserve:generation_tokens_total") - n0) / (time.monotonic() - t0)
        remaining = 4 * 1000 - _metric(server.url, "moeserve:generation_tokens_total")
        for writer in writers:
            writer.close()
        closed = time.monotonic()
        while _metric(server.url, "moeserve:num_requests_running") > 0 and time.monotonic() - closed < 10:
            await asyncio.sleep(0.02)
        return time.monotonic() - closed, remaining / rate

    try:
        stopped_after, natural = asyncio.run(run())
        assert natural > 3, f"the requests would have finished on their own in {natural:.1f}s"
        assert stopped_after < 1.0, f"still running {stopped_after:.2f}s after the clients left"
        assert _metric(server.url, "moeserve:num_requests_waiting") == 0
    finally:
        server.stop()
