"""The load-test harness against a stand-in server whose timing is known, and against moeserve."""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from moeserve.bench.arrivals import gamma_arrivals
from moeserve.bench.serve import _saturated
from server_utils import free_port, start_server

pytestmark = pytest.mark.slow
X, Y = 0.300, 0.050  # stand-in: first token after X seconds, then one every Y
X_SLOW = 0.700


def stand_in_app() -> FastAPI:
    """Streams `max_tokens` tokens on a fixed schedule: token k at X + k*Y after the request
    arrives (X_SLOW for prompts containing "slow"). Prompts containing "busy", "quota" or "fail"
    get 503, 429 or 500; "break" gets an error event in the middle of its stream."""
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "stand-in", "object": "model"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        t0 = time.perf_counter()
        body = await request.json()
        prompt, n = str(body["prompt"]), body["max_tokens"]
        for word, status in (("busy", 503), ("quota", 429), ("fail", 500)):
            if word in prompt:
                return JSONResponse({"error": {"message": f"stand-in {word}", "type": "x", "param": None,
                                               "code": status}}, status_code=status)
        first = X_SLOW if "slow" in prompt else X

        async def stream():
            for k in range(n):
                delay = t0 + first + k * Y - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                if "break" in prompt and k == 2:
                    yield 'data: {"error": {"message": "stand-in broke mid-stream"}}\n\n'
                    return
                chunk = {"choices": [{"index": 0, "text": f"t{k} ", "finish_reason": "length" if k == n - 1 else None}]}
                yield f"data: {json.dumps(chunk)}\n\n"
            usage = {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": n + 3}
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def stand_in():
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(stand_in_app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def _prompts(tmp_path: Path, prompts: list[str], n: int) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "output_len": n}) + "\n" for p in prompts))
    return path


def _bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moeserve.cli", "bench", *args], capture_output=True, text=True,
                          timeout=600)


def _close(measured: float, expected: float) -> bool:
    return abs(measured - expected) <= max(0.05 * expected, 3.0)


def test_timings_match_the_stand_in_schedule(stand_in, tmp_path):
    n = 6
    data = _prompts(tmp_path, [f"p{i}" for i in range(12)], n)
    out = tmp_path / "run.json"
    r = _bench("serve", "--base-url", stand_in, "--dataset", "jsonl", "--dataset-path", str(data), "--concurrency",
               "4", "--out", str(out), "--no-progress", "--no-plots")
    assert r.returncode == 0, r.stderr
    s = json.loads(out.read_text())["runs"][0]["summary"]
    assert s["completed"] == 12 and s["total_output_tokens"] == 12 * n
    assert _close(s["ttft_ms"]["median"], X * 1000), s["ttft_ms"]
    assert _close(s["tpot_ms"]["median"], Y * 1000), s["tpot_ms"]
    assert _close(s["itl_ms"]["median"], Y * 1000), s["itl_ms"]
    assert _close(s["e2e_ms"]["median"], (X + (n - 1) * Y) * 1000), s["e2e_ms"]
    assert "TTFT (ms)" in r.stdout and "p99" in r.stdout


def test_goodput_and_errors_are_counted(stand_in, tmp_path):
    prompts = ["fast"] * 8 + ["slow"] * 4 + ["busy", "quota", "fail", "break"]
    data = _prompts(tmp_path, prompts, 4)
    out = tmp_path / "run.json"
    r = _bench("serve", "--base-url", stand_in, "--dataset", "jsonl", "--dataset-path", str(data), "--concurrency",
               "16", "--slo", "ttft:500ms,tpot:80ms", "--out", str(out), "--no-progress", "--no-plots")
    assert r.returncode == 0, r.stderr
    s = json.loads(out.read_text())["runs"][0]["summary"]
    # By hand: the 8 fast requests meet both SLOs; slow ones miss TTFT; the 4 others failed.
    assert s["requests_meeting_slo"] == 8
    assert s["goodput"] == pytest.approx(8 / s["duration_s"])
    assert s["completed"] == 12 and s["failed"] == 4
    assert s["rejected_503"] == 1 and s["rejected_429"] == 1
    assert s["errors_by_status"] == {"200": 1, "429": 1, "500": 1, "503": 1}
    assert any("broke mid-stream" in e for e in s["error_samples"])
    # The two refusals are timed (and are not goodput, above); the 500 is not a refusal.
    assert s["refusal_ms"]["count"] == 2 and s["refusal_ms"]["max"] < 5000
    assert s["slo_attainment"] == pytest.approx(8 / 16)


def test_poisson_and_bursty_arrivals():
    rate, n = 20.0, 4000
    gaps = np.diff(gamma_arrivals(n, rate, 1.0, seed=1))
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.08)  # exponential gaps: CV 1
    times = np.array(gamma_arrivals(n, rate, 1.0, seed=2))
    counts = np.bincount(times.astype(int))[:-1]  # arrivals per whole second
    dispersion = counts.var() / counts.mean()
    assert 0.75 < dispersion < 1.3, dispersion  # Poisson counts: variance = mean
    bursty = np.diff(gamma_arrivals(n, rate, 0.25, seed=3))
    assert (bursty.std() / bursty.mean()) ** 2 == pytest.approx(4.0, rel=0.25)  # gamma shape k: CV^2 = 1/k


def test_sweep_writes_the_curve_and_detects_saturation(stand_in, tmp_path):
    data = _prompts(tmp_path, [f"p{i}" for i in range(8)], 3)
    out = tmp_path / "sweep.json"
    r = _bench("serve", "--base-url", stand_in, "--dataset", "jsonl", "--dataset-path", str(data),
               "--sweep-concurrency", "1,4", "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    record = json.loads(out.read_text())
    assert [run["label"] for run in record["runs"]] == ["concurrency=1", "concurrency=4"]
    assert (tmp_path / "sweep-sweep.png").read_bytes()[:4] == b"\x89PNG"
    flat = {"summary": {"output_throughput": 100.0, "ttft_ms": {"median": 50.0}}}
    assert _saturated(flat, {"summary": {"output_throughput": 103.0, "ttft_ms": {"median": 120.0}}})
    assert not _saturated(flat, {"summary": {"output_throughput": 180.0, "ttft_ms": {"median": 120.0}}})
    assert not _saturated(flat, {"summary": {"output_throughput": 101.0, "ttft_ms": {"median": 55.0}}})


def test_compare_prints_ratios(stand_in, tmp_path):
    data = _prompts(tmp_path, ["a", "b", "c", "d"], 3)
    for name, c in (("one", "1"), ("four", "4")):
        r = _bench("serve", "--base-url", stand_in, "--dataset", "jsonl", "--dataset-path", str(data),
                   "--concurrency", c, "--out", str(tmp_path / f"{name}.json"), "--no-progress", "--no-plots")
        assert r.returncode == 0, r.stderr
    r = _bench("compare", str(tmp_path / "one.json"), str(tmp_path / "four.json"))
    assert r.returncode == 0, r.stderr
    assert "B/A" in r.stdout and "output tok/s" in r.stdout and "TTFT (ms) median" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--slo", "ttfx:3ms"], "unknown SLO metric 'ttfx'"),
    (["--request-rate", "0"], "--request-rate must be > 0"),
    (["--request-rate", "-2"], "--request-rate must be > 0"),
    (["--base-url", "http://127.0.0.1:9"], "cannot reach http://127.0.0.1:9"),
    (["--concurrency", "2", "--request-rate", "3"], "pick one load shape"),
])
def test_bad_arguments_are_one_line(args, message, tmp_path):
    r = _bench("serve", "--dataset", "jsonl", "--dataset-path", str(_prompts(tmp_path, ["x"], 2)), *args)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and message in r.stderr and "Traceback" not in r.stderr


def test_thirty_second_run_against_moeserve(checkpoints, tmp_path):
    model = str(checkpoints("mixtral"))
    server = start_server(model, "--max-model-len", "256", "--expert-metrics", "expert")
    try:
        out = tmp_path / "moeserve.json"
        r = _bench("serve", "--base-url", server.url, "--tokenizer", model, "--input-len", "48", "--output-len", "32",
                   "--range-ratio", "0.5", "--num-requests", "100000", "--concurrency", "4", "--duration", "30",
                   "--slo", "ttft:1s,tpot:200ms", "--out", str(out), "--no-progress")
    finally:
        assert server.stop() == 0
    assert r.returncode == 0, r.stderr
    assert "==== run concurrency=4 ====" in r.stdout and "TTFT (ms)" in r.stdout
    record = json.loads(out.read_text())
    run = record["runs"][0]
    assert run["summary"]["completed"] > 10 and run["summary"]["failed"] == 0
    assert 30 <= run["summary"]["duration_s"] < 60
    after, before = run["server_metrics_after"], run["server_metrics_before"]
    assert any(k.startswith("moeserve:expert_routed_tokens_total") for k in after)
    assert after["moeserve:generation_tokens_total"] - before.get("moeserve:generation_tokens_total", 0) == \
        run["summary"]["total_output_tokens"]
    pngs = [Path(p) for p in record["plots"]]
    assert len(pngs) >= 2 and all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs)


def test_trace_replay_sends_at_the_trace_times(stand_in, checkpoints, tmp_path):
    trace = tmp_path / "trace.jsonl"
    times = [100.0, 100.2, 100.5, 101.0]
    trace.write_text("".join(json.dumps({"timestamp": t, "input_len": 8, "output_len": 2}) + "\n" for t in times))
    out = tmp_path / "trace.json"
    r = _bench("serve", "--base-url", stand_in, "--dataset", "trace", "--dataset-path", str(trace), "--tokenizer",
               str(checkpoints("mixtral")), "--out", str(out), "--save-detail", "--no-progress", "--no-plots")
    assert r.returncode == 0, r.stderr
    sent = [req["sent_at"] for req in json.loads(out.read_text())["runs"][0]["requests"]]
    assert all(abs(s - (t - times[0])) < 0.02 for s, t in zip(sent, times)), sent


def test_slo_search_keeps_the_highest_passing_rate(stand_in, tmp_path):
    data = _prompts(tmp_path, ["a", "b", "c", "d"], 2)
    out = tmp_path / "search.json"
    r = _bench("serve", "--base-url", stand_in, "--dataset", "jsonl", "--dataset-path", str(data), "--slo",
               "ttft:450ms", "--slo-search", "2:32", "--search-steps", "2", "--out", str(out), "--no-progress",
               "--no-plots")
    assert r.returncode == 0, r.stderr
    runs = json.loads(out.read_text())["runs"]
    rates = [run["load"]["request_rate"] for run in runs]
    assert rates[0] == pytest.approx(8.0) and rates[1] > rates[0]  # geometric bisection upward after a pass
    assert runs[-1].get("best") and "highest rate meeting the SLO" in r.stdout
