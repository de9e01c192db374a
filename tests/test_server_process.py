"""The process boundary: the front never loads the model's code, answers /health at once while
the engine is busy, and fails requests fast when the engine process dies."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from server_utils import engine_pid, maps_libtorch, start_server

pytestmark = pytest.mark.slow

# Modules that hold the model, the scheduler or the workers: the engine process's alone.
ENGINE_SIDE = ("torch", "moeserve.model", "moeserve.checkpoint", "moeserve.kernels", "moeserve.worker",
               "moeserve.executor", "moeserve.engine.scheduler", "moeserve.engine.block_manager",
               "moeserve.engine.core", "moeserve.model_config")


def test_the_front_imports_nothing_of_the_engine():
    front = ("moeserve.cli", "moeserve.entrypoints.server", "moeserve.entrypoints.grpc_server",
             "moeserve.entrypoints.openai.api_server", "moeserve.entrypoints.async_engine", "moeserve.metrics")
    code = (f"import importlib, sys\nfor m in {front!r}: importlib.import_module(m)\n"
            f"print('\\n'.join(m for m in sys.modules if m.startswith({ENGINE_SIDE!r})))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    # moeserve.engine.core_proc is the engine process's entry point: the front names it (as the
    # target of the spawn) but its imports of the engine happen only in the engine process.
    assert [m for m in loaded if m != "moeserve.engine.core_proc"] == []


def test_a_running_server_keeps_torch_in_the_engine_process(checkpoints, tmp_path):
    server = start_server(str(checkpoints("mixtral")), "--max-model-len", "64", log_path=str(tmp_path / "log"))
    try:
        assert httpx.post(f"{server.url}/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200
        core = engine_pid(server.proc.pid)
        assert maps_libtorch(core) and not maps_libtorch(server.proc.pid)
    finally:
        assert server.stop() == 0


_FLOOD = """
import asyncio, json, sys
import httpx

url, n = sys.argv[1], int(sys.argv[2])
body = {"prompt": "def f(x):", "max_tokens": 200, "ignore_eos": True, "stream": True}

async def one(client):
    async with client.stream("POST", "/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                return r.status_code
    return -1

async def main():
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=httpx.Limits(max_connections=n)) as client:
        print(json.dumps(await asyncio.gather(*(one(client) for _ in range(n)))))

asyncio.run(main())
"""


def test_health_answers_fast_while_64_streams_run(checkpoints, tmp_path):
    """The flood comes from another process, so the latencies measured here are the server's."""
    server = start_server(str(checkpoints("mixtral")), "--max-model-len", "256", log_path=str(tmp_path / "log"))
    latencies = []
    try:
        flood = subprocess.Popen([sys.executable, "-c", _FLOOD, server.url, "64"], stdout=subprocess.PIPE, text=True)
        with httpx.Client(timeout=5) as client:
            while flood.poll() is None:
                t0 = time.perf_counter()
                assert client.get(f"{server.url}/health").status_code == 200
                latencies.append(time.perf_counter() - t0)
                time.sleep(0.1)
        assert json.loads(flood.stdout.read()) == [200] * 64
        assert len(latencies) >= 10, "the flood ended before /health was polled"
        assert max(latencies) < 0.25, f"/health took up to {max(latencies) * 1000:.0f} ms under the flood"
    finally:
        server.stop()


def test_killing_the_engine_process_fails_requests_within_two_seconds(checkpoints, tmp_path):
    server = start_server(str(checkpoints("mixtral")), "--max-model-len", "256", log_path=str(tmp_path / "log"))
    body = {"prompt": "def f(x):", "max_tokens": 250, "ignore_eos": True}
    results: list[tuple[int, float, str]] = []

    def one():
        r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
        results.append((r.status_code, time.monotonic(), r.json()["error"]["message"] if r.status_code != 200 else ""))

    try:
        threads = [threading.Thread(target=one) for _ in range(4)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        while not _running_line(server).endswith(" 4.0") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _running_line(server).endswith(" 4.0"), "the requests never ran"
        os.kill(engine_pid(server.proc.pid), signal.SIGKILL)
        killed = time.monotonic()
        for t in threads:
            t.join(10)
        assert [code for code, _, _ in results] == [503] * 4
        assert max(at for _, at, _ in results) - killed < 2.0
        assert all("engine process exited (killed by signal 9)" in message for _, _, message in results), results
        health = httpx.get(f"{server.url}/health")
        assert health.status_code == 503 and "killed by signal 9" in health.json()["error"]["message"]
        assert httpx.get(f"{server.url}/ready").status_code == 503
        assert httpx.post(f"{server.url}/v1/completions", json=body, timeout=5).status_code == 503
    finally:
        assert server.stop() == 0


def _running_line(server) -> str:
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith("moeserve:num_requests_running"):
            return line
    return ""
