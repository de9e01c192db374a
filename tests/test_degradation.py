"""The degradation controller under scripted load (EngineStats as the engine would send them),
and end to end: force-k1 responses equal a K = 1 run and say how many tokens ran degraded."""

from __future__ import annotations

import math
import random

import pytest

from moeserve.engine.degradation import ClassLimits, DegradationController, DegradationSettings
from moeserve.engine.messages import EngineStats


class Core:
    """What the controller calls on the engine core: it records the limits it is given."""

    def __init__(self) -> None:
        self.limits: list[ClassLimits] = []

    def set_class_limits(self, limits: ClassLimits) -> None:
        self.limits.append(limits)


def _stats(t: float, ttft: float, step: float, classes=(0, 5, 9), waiting_tokens: int = 0) -> EngineStats:
    return EngineStats(step=int(t * 10), timestamp=t, num_running=4, num_waiting=0, num_waiting_tokens=waiting_tokens,
                       waiting_tokens_by_priority={}, num_blocks=100, num_free_blocks=50, step_time_s=step,
                       num_prefill_tokens=0, num_decode_tokens=4, prefill_tokens_per_s=0.0, decode_tokens_per_s=0.0,
                       step_time_base_s=0.01, step_time_per_token_s=1e-4, prefill_tokens_per_step=0.0,
                       num_requests_received=0, num_preemptions=0, prefix_cache_hits=0, top_k=[2],
                       expert_load=None, top_k_by_class={c: 2 for c in classes}, recent_ttft_s=ttft)


def _run(controller, core, loads, dt=0.1, **kw):
    """Feed one stats message per dt seconds; loads[i] = (ttft, step time)."""
    for i, (ttft, step) in enumerate(loads):
        controller.between_steps(core, _stats(i * dt, ttft, step, **kw))


def test_pressure_degrades_the_lowest_class_first_then_restores_all():
    settings = DegradationSettings("auto", k=1, slo_ttft=1.0, slo_tpot=0.1, enter=1.0, leave=0.7, dwell=2.0)
    ctl, core = DegradationController(settings, step_time_alpha=1.0), Core()
    _run(ctl, core, [(0.3, 0.05)] * 50)  # well inside the SLO: nothing happens
    assert ctl.level == 0 and core.limits == []
    _run(ctl, core, [(2.5, 0.05)] * 300)  # TTFT at 2.5x its SLO for 30 s
    assert core.limits[0] == ClassLimits(9, 1)  # class 9 (the lowest) first
    assert core.limits[1] == ClassLimits(5, 1)  # then 5 and 9
    assert core.limits[2] == ClassLimits(0, 1)  # then every class
    assert ctl.limits.k_for(9, 2) == 1 and ctl.limits.k_for(0, 2) == 1 and ctl.limits.k_for(0, 1) == 1
    _run(ctl, core, [(0.1, 0.02)] * 300)  # pressure gone: back one class at a time, highest first
    assert core.limits[3:] == [ClassLimits(5, 1), ClassLimits(9, 1), ClassLimits()]
    assert ctl.level == 0 and ctl.limits.k_for(9, 2) == 2


def test_tpot_and_the_queue_count_as_pressure_too():
    settings = DegradationSettings("auto", slo_ttft=1.0, slo_tpot=0.1, dwell=0.0)
    ctl, core = DegradationController(settings, step_time_alpha=1.0), Core()
    ctl.between_steps(core, _stats(0.0, 0.1, 0.15))  # steps of 150 ms against a 100 ms TPOT target
    assert ctl.level == 1
    ctl2, core2 = DegradationController(settings, step_time_alpha=1.0), Core()
    ctl2.between_steps(core2, _stats(0.0, 0.1, 0.05, waiting_tokens=20_000))  # 2 s of prefill waiting
    assert ctl2.level == 1


def test_a_load_hovering_at_the_threshold_does_not_make_it_flap():
    """Pressure alternating around `enter` every step for 60 s: without hysteresis and dwell
    this would change K every other step (~300 times); here it moves a bounded number of times."""
    rng = random.Random(0)
    settings = DegradationSettings("auto", slo_ttft=1.0, enter=1.0, leave=0.7, dwell=5.0)
    ctl, core = DegradationController(settings, step_time_alpha=1.0), Core()
    loads = [(1.0 + rng.uniform(-0.08, 0.08), 0.05) for _ in range(600)]
    _run(ctl, core, loads)
    assert ctl.transitions <= 60 / 5  # at most one change per dwell
    assert ctl.transitions == ctl.level  # it only ever went one way: never below leave, no flapping back
    naive = sum(1 for a, b in zip(loads, loads[1:]) if (a[0] > 1.0) != (b[0] > 1.0))
    assert naive > 100


def test_off_and_force_k1():
    off = DegradationController(DegradationSettings("off"))
    core = Core()
    off.between_steps(core, _stats(0.0, 100.0, 10.0))
    assert core.limits == [] and off.limits == ClassLimits()
    forced = DegradationController(DegradationSettings("force-k1"))
    forced.between_steps(core, _stats(0.0, 0.0, 0.0))
    assert forced.limits == ClassLimits(-math.inf, 1) and forced.limits.k_for(-100, 8) == 1 and core.limits == []
    with pytest.raises(ValueError, match="leave < enter"):
        DegradationSettings("auto", enter=0.5, leave=0.7)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["force-k1", "off"])
def test_a_server_reports_degraded_tokens_and_force_k1_equals_a_k1_run(mode, checkpoints, tmp_path):
    import json

    import grpc
    import httpx

    from moeserve import LLM, SamplingParams
    from moeserve.grpc_gen import moeserve_pb2 as pb
    from moeserve.grpc_gen import moeserve_pb2_grpc as pb_grpc
    from server_utils import start_server

    path = str(checkpoints("mixtral"))
    server = start_server(path, "--max-model-len", "128", "--degradation", mode, log_path=str(tmp_path / "log"))
    try:
        body = {"prompt": "def f(x):", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
        data = r.json()
        prompt, completion = data["usage"]["prompt_tokens"], data["usage"]["completion_tokens"]
        expected = prompt + completion - 1 if mode == "force-k1" else 0  # every token the model ran
        assert int(r.headers["x-moeserve-degraded-tokens"]) == data["moeserve"]["degraded_tokens"] == expected
        k = 1 if mode == "force-k1" else None
        offline = LLM(path, max_model_len=128).generate(
            "def f(x):", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, moe_top_k=k))[0]
        assert data["choices"][0]["text"] == offline.outputs[0].text
        chunks = []
        with httpx.stream("POST", f"{server.url}/v1/completions", timeout=60,
                          json={**body, "stream": True, "stream_options": {"include_usage": True}}) as s:
            chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
        finish = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]][0]
        assert finish["choices"][0]["moeserve"]["degraded_tokens"] == expected
        assert chunks[-1]["moeserve"]["degraded_tokens"] == expected and chunks[-1]["choices"] == []
        with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            reply = pb_grpc.GenerationStub(channel).Generate(
                pb.GenerateRequest(text="def f(x):", sampling=pb.SamplingOptions(max_tokens=8, temperature=0,
                                                                                ignore_eos=True)), timeout=60)
        assert reply.degraded_tokens == expected and reply.text == offline.outputs[0].text
        metrics = httpx.get(f"{server.url}/metrics").text
        assert f'moeserve:degraded_tokens_total{{model_name="{path}"}} {float(3 * expected)}' in metrics
    finally:
        server.stop()
