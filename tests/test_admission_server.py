"""Admission control through a real server on 127.0.0.1: quotas per tenant, the bounded queue,
priority shedding, fast refusals, and nothing refused ever reaching the engine; HTTP and gRPC."""

from __future__ import annotations

import asyncio
import time

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server_utils import start_server

pytestmark = pytest.mark.slow
# The engine runs 2 sequences at a time, so requests queue; each runs ~100 decode steps.
LONG = {"prompt": "def f(x):", "max_tokens": 100, "ignore_eos": True}


@pytest.fixture(scope="module")
def server(checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("admission")
    quotas = root / "quotas.yaml"
    quotas.write_text("tenants:\n  limited: {requests_per_second: 2}\n")
    s = start_server(str(checkpoints("mixtral")), "--max-model-len", "256", "--max-num-seqs", "2",
                     "--max-queued-requests", "4", "--tenant-config", str(quotas), log_path=str(root / "log"))
    yield s
    assert s.stop() == 0


def _metrics(server) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text):
        for sample in family.samples:
            key = sample.name + "".join(f"|{k}={v}" for k, v in sorted(sample.labels.items()) if k != "model_name")
            out[key] = sample.value
    return out


def _total(metrics: dict[str, float], prefix: str) -> float:
    return sum(v for k, v in metrics.items() if k.split("|")[0] == prefix)


async def _post(client: httpx.AsyncClient, body: dict, headers: dict | None = None) -> tuple[httpx.Response, float]:
    start = time.perf_counter()
    r = await client.post("/v1/completions", json=body, headers=headers or {})
    return r, time.perf_counter() - start


def _idle(server) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        m = _metrics(server)
        if _total(m, "moeserve:num_requests_running") == 0 and _total(m, "moeserve:admission_queued_requests") == 0:
            return
        time.sleep(0.05)
    raise AssertionError("the server did not go idle")


def test_a_tenant_over_quota_gets_429_while_another_is_served(server):
    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            burst = [_post(client, {"prompt": "x", "max_tokens": 2}, {"x-tenant": "limited"}) for _ in range(5)]
            other = _post(client, {"prompt": "x", "max_tokens": 2}, {"x-tenant": "free"})
            return await asyncio.gather(*burst, other)

    *burst, (other, _) = asyncio.run(run())
    codes = sorted(r.status_code for r, _ in burst)
    assert codes == [200, 200, 429, 429, 429] and other.status_code == 200
    for r, seconds in burst:
        if r.status_code == 429:
            assert r.json()["error"]["type"] == "RateLimitError" and "limited" in r.json()["error"]["message"]
            assert int(r.headers["retry-after"]) >= 1 and seconds < 0.5
    m = _metrics(server)
    assert m["moeserve:admission_rejections_total|reason=rate|tenant=limited"] >= 3


def test_a_full_queue_answers_503_fast_and_nothing_refused_reaches_the_engine(server):
    _idle(server)
    before = _metrics(server)

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            return await asyncio.gather(*(_post(client, LONG) for _ in range(12)))

    results = asyncio.run(run())
    ok = [r for r, _ in results if r.status_code == 200]
    refused = [(r, s) for r, s in results if r.status_code == 503]
    # At most 4 wait for a first token at once: the burst gets 4 in (a few more if first tokens
    # come while it arrives); every admitted one completes.
    assert len(ok) + len(refused) == 12 and 4 <= len(ok) <= 6, [r.status_code for r, _ in results]
    assert all(r.json()["usage"]["completion_tokens"] == 100 for r in ok)
    for r, seconds in refused:
        assert r.json()["error"]["type"] == "ServiceUnavailableError" and "queue is full" in r.json()["error"]["message"]
        assert int(r.headers["retry-after"]) >= 1 and seconds < 0.5
    after = _metrics(server)
    received = _total(after, "moeserve:engine_requests_received_total") - _total(before,
                                                                                 "moeserve:engine_requests_received_total")
    admitted = _total(after, "moeserve:admission_admitted_total") - _total(before, "moeserve:admission_admitted_total")
    assert received == admitted == len(ok)
    assert float(next(iter(r.headers["x-moeserve-predicted-ttft-ms"] for r in ok))) > 0


def test_under_pressure_the_lowest_class_is_shed_to_admit_a_higher_one(server):
    _idle(server)

    async def until(metric: str, value: float) -> None:
        deadline = time.monotonic() + 30
        while _total(_metrics(server), metric) < value:
            assert time.monotonic() < deadline, f"{metric} never reached {value}"
            await asyncio.sleep(0.02)

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            running = [asyncio.ensure_future(_post(client, {**LONG, "priority": 5})) for _ in range(2)]
            await until("moeserve:num_requests_running", 2)  # both slots busy for ~100 steps
            queued = [asyncio.ensure_future(_post(client, {**LONG, "priority": 5})) for _ in range(4)]
            await until("moeserve:admission_queued_requests", 4)  # the queue is full
            high = await _post(client, {**LONG, "priority": 0, "max_tokens": 5})
            return high, await asyncio.gather(*running, *queued)

    (high, _), low = asyncio.run(run())
    assert high.status_code == 200 and high.json()["usage"]["completion_tokens"] == 5
    codes = [r.status_code for r, _ in low]
    dropped = [r for r, _ in low if r.status_code == 503 and "dropped" in r.json()["error"]["message"]]
    assert codes.count(200) == 5 and len(dropped) == 1
    assert int(dropped[0].headers["retry-after"]) >= 1
    assert _metrics(server)["moeserve:admission_rejections_total|reason=dropped|tenant=default"] >= 1


def test_grpc_gets_the_same_decisions(server):
    from moeserve.grpc_gen import moeserve_pb2 as pb
    from moeserve.grpc_gen import moeserve_pb2_grpc as pb_grpc

    _idle(server)
    short = pb.GenerateRequest(text="x", sampling=pb.SamplingOptions(max_tokens=2))
    long = pb.GenerateRequest(text="def f(x):", sampling=pb.SamplingOptions(max_tokens=100, ignore_eos=True))

    async def run():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            stub = pb_grpc.GenerationStub(channel)

            async def call(request, metadata=()):
                try:
                    return (await stub.Generate(request, metadata=metadata, timeout=60)).finish_reason, None
                except grpc.aio.AioRpcError as e:
                    trailers = dict(e.trailing_metadata() or ())
                    return e.code(), trailers.get("retry-after")

            quota = await asyncio.gather(*(call(short, (("x-tenant", "limited"),)) for _ in range(4)))
            queue = await asyncio.gather(*(call(long) for _ in range(10)))
            return quota, queue

    quota, queue = asyncio.run(run())
    assert sorted(str(c) for c, _ in quota).count(str(grpc.StatusCode.RESOURCE_EXHAUSTED)) >= 2
    assert all(int(retry) >= 1 for c, retry in quota if c == grpc.StatusCode.RESOURCE_EXHAUSTED)
    refused = [c for c, _ in queue if c == grpc.StatusCode.UNAVAILABLE]
    assert len(refused) >= 2 and [c for c, _ in queue].count("length") + len(refused) == 10
