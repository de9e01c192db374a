"""Admission control in the front: quotas, the bounded queue, priority shedding and the TTFT
predictor, on a fake clock and scripted engine stats (the decisions are pure functions of them)."""

from __future__ import annotations

import math

import pytest

from moeserve.config import AdmissionConfig
from moeserve.engine.messages import EngineInfo, EngineStats
from moeserve.entrypoints.admission import AdmissionController, AdmissionPolicy, AdmissionRejected, TokenBucket
from moeserve.generation_config import GenerationDefaults

INFO = EngineInfo(model="m", max_model_len=4096, vocab_size=1000, eos_token_ids=(0,),
                  generation_defaults=GenerationDefaults(), num_kv_blocks=1000, block_size=16, max_num_seqs=8,
                  max_num_batched_tokens=1000, moe_layer_ids=(0,), num_experts=8, top_k=2, device="cpu", pid=1)


def _stats(base: float = 0.01, per_token: float = 1e-4, prefill: float = 0.0) -> EngineStats:
    return EngineStats(step=10, timestamp=0.0, num_running=0, num_waiting=0, num_waiting_tokens=0,
                       waiting_tokens_by_priority={}, num_blocks=1000, num_free_blocks=1000, step_time_s=0.02,
                       num_prefill_tokens=0, num_decode_tokens=0, prefill_tokens_per_s=0.0, decode_tokens_per_s=0.0,
                       step_time_base_s=base, step_time_per_token_s=per_token, prefill_tokens_per_step=prefill,
                       num_requests_received=0,
                       num_preemptions=0, prefix_cache_hits=0, top_k=[2], expert_load=None)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _controller(stats: EngineStats | None = None, **settings) -> tuple[AdmissionController, Clock]:
    clock = Clock()
    policy = AdmissionPolicy.from_config(AdmissionConfig(**settings))
    return AdmissionController(policy, INFO, lambda: stats, clock), clock


def _rejected(fn) -> AdmissionRejected:
    with pytest.raises(AdmissionRejected) as err:
        fn()
    return err.value


def test_token_bucket_refills_at_its_rate_and_caps_at_its_capacity():
    bucket = TokenBucket(rate=2.0, capacity=4.0, now=0.0)
    assert bucket.wait_for(4, 0.0) == 0
    bucket.take(4, 0.0)
    assert bucket.wait_for(1, 0.0) == pytest.approx(0.5)
    assert bucket.wait_for(1, 0.5) == 0 and bucket.wait_for(2, 0.5) == pytest.approx(0.5)
    assert bucket.wait_for(4, 100.0) == 0 and bucket.level == 4  # capped
    assert math.isinf(bucket.wait_for(5, 100.0))


def test_tenants_have_their_own_quotas_and_unused_tokens_come_back(tmp_path):
    quotas = tmp_path / "quotas.yaml"
    quotas.write_text("default: {requests_per_second: 2}\n"
                      "tenants:\n  big: {requests_per_second: 100, tokens_per_minute: 600, api_key: sk-big}\n")
    ctl, clock = _controller(tenant_config=str(quotas))
    assert ctl.tenant_for("sk-big", None) == "big" and ctl.tenant_for(None, "team-x") == "team-x"
    assert ctl.tenant_for("sk-other", None).startswith("key-") and ctl.tenant_for(None, None) == "default"
    ctl.admit("a1", "small", 0, 10, 1, 10)
    ctl.admit("a2", "small", 0, 10, 1, 10)
    over = _rejected(lambda: ctl.admit("a3", "small", 0, 10, 1, 10))
    assert (over.status, over.reason, over.retry_after) == (429, "rate", 1) and "small" in over.message
    ctl.admit("b1", "big", 0, 100, 2, 100)  # another tenant is served meanwhile; charged 2 x 200
    over = _rejected(lambda: ctl.admit("b2", "big", 0, 100, 1, 150))  # 250 more > 200 left
    assert (over.status, over.reason) == (429, "tokens") and over.retry_after == 5  # 50 tokens at 10/s
    ctl.progress("b1", 20)
    ctl.finished("b1")  # used 2 x 100 + 20 of the 400 charged: 180 come back
    ctl.admit("b2", "big", 0, 100, 1, 150)
    too_big = _rejected(lambda: ctl.admit("b3", "big", 0, 500, 1, 500))
    assert too_big.reason == "tokens" and "more than tenant 'big' may use in a minute" in too_big.message
    clock.now += 1.0
    ctl.admit("a3", "small", 0, 10, 1, 10)  # a second later the small tenant's bucket has refilled


def test_bad_quota_files_are_refused_by_name(tmp_path):
    bad = tmp_path / "q.yaml"
    bad.write_text("tenants:\n  t: {requests_per_minute: 3}\n")
    with pytest.raises(ValueError, match="unknown field"):
        AdmissionPolicy.from_config(AdmissionConfig(tenant_config=str(bad)))
    bad.write_text("tenants:\n  t: {requests_per_second: -1}\n")
    with pytest.raises(ValueError, match="positive"):
        AdmissionPolicy.from_config(AdmissionConfig(tenant_config=str(bad)))
    with pytest.raises(ValueError, match="max_queued_requests must be > 0"):
        AdmissionConfig(max_queued_requests=0)


def test_the_queue_bound_sheds_lower_classes_first_and_only_unstarted_requests():
    ctl, _ = _controller(_stats(), max_queued_requests=3)
    ctl.admit("low-1", "t", 5, 10, 1, 10)
    ctl.admit("low-2", "t", 5, 10, 1, 10)
    ctl.admit("mid", "t", 1, 10, 1, 10)
    assert ctl.queued_requests == 3
    full = _rejected(lambda: ctl.admit("low-3", "t", 5, 10, 1, 10))  # nothing below class 5 to drop
    assert (full.status, full.reason) == (503, "queue_requests") and full.retry_after >= 1
    _, dropped = ctl.admit("high", "t", 0, 10, 1, 10)
    assert dropped == ["low-2"]  # the newest of the lowest class
    ctl.finished("low-2")  # the caller aborts it and says so
    ctl.progress("low-1", 1)  # it started: no longer queued, never dropped
    _, dropped = ctl.admit("high-2", "t", 0, 10, 1, 10)
    assert dropped == []
    _, dropped = ctl.admit("high-3", "t", 0, 10, 1, 10)
    assert dropped == ["mid"]
    ctl.finished("mid")
    assert ctl.queued_requests == 3


def test_the_token_bound_counts_every_sequence():
    ctl, _ = _controller(_stats(), max_queued_tokens=100)
    ctl.admit("a", "t", 0, 30, 2, 10)  # n = 2: 60 tokens queued
    over = _rejected(lambda: ctl.admit("b", "t", 0, 50, 1, 10))
    assert over.reason == "queue_tokens"
    ctl.admit("c", "t", 0, 40, 1, 10)
    assert ctl.queued_tokens == 100


def test_the_predictor_follows_the_engines_step_time_line():
    ctl, _ = _controller(_stats(base=0.01, per_token=1e-4))
    # 500 prompt tokens, empty engine: one step of 500 tokens.
    assert ctl.predict_ttft(0, 500) == pytest.approx(0.01 + 500e-4)
    ctl.admit("q1", "t", 0, 900, 1, 20)
    # 900 queued ahead + 500: two steps of the full 1000-token budget.
    assert ctl.predict_ttft(0, 500) == pytest.approx(2 * (0.01 + 1000e-4))
    # A lower class waits behind it; a better class does not.
    assert ctl.predict_ttft(-1, 500) == pytest.approx(0.01 + 500e-4)
    ctl.progress("q1", 1)  # now decoding: one token of each step's budget is its
    assert ctl.predict_ttft(0, 999) == pytest.approx(0.01 + 1000e-4)
    assert ctl.predict_ttft(0, 1000) == pytest.approx(2 * (0.01 + 1000e-4))
    # All 8 slots busy: a new request waits for the first to finish (its max_tokens left).
    for i in range(7):
        ctl.admit(f"r{i}", "t", 0, 10, 1, 5 + i)
        ctl.progress(f"r{i}", 1)
    assert ctl.predict_ttft(0, 10) == pytest.approx((4 + 1) * (0.01 + 18e-4))  # r0 has 4 tokens left
    assert _controller(None)[0].predict_ttft(0, 10) is None  # no step measured yet


def test_no_request_is_admitted_whose_predicted_ttft_exceeds_the_slo():
    """Requests of random sizes and classes arrive while others start and finish: every
    admitted one had a prediction within the SLO, every SLO refusal had one above it."""
    import random

    rng = random.Random(0)
    ctl, clock = _controller(_stats(base=0.02, per_token=2e-4), slo_ttft=0.5)
    running, admitted, refused = [], 0, 0
    for i in range(400):
        clock.now += 0.01
        priority, tokens = rng.choice([0, 1, 2]), rng.randint(10, 600)
        predicted = ctl.predict_ttft(priority, tokens)
        try:
            got, _ = ctl.admit(f"r{i}", "t", priority, tokens, 1, rng.randint(1, 30))
            assert got == predicted and got <= 0.5
            admitted += 1
            running.append(f"r{i}")
        except AdmissionRejected as e:
            assert e.reason == "slo" and predicted > 0.5 and e.status == 503 and e.retry_after >= 1
            refused += 1
        if running and rng.random() < 0.3:
            ctl.progress(running[0], 1)
        if len(running) > 5 and rng.random() < 0.4:
            ctl.finished(running.pop(0))
    assert admitted > 50 and refused > 50


def test_the_tpot_slo_bounds_how_many_decode_together():
    """Each admitted request adds a token to every step until it ends: with steps costing
    10 ms + 1 ms per token and 4 prefill tokens per step, a 30.5 ms TPOT SLO admits 16 sequences."""
    ctl, _ = _controller(_stats(base=0.01, per_token=1e-3, prefill=4), slo_tpot=0.0305)
    for i in range(16):
        ctl.admit(f"r{i}", "t", 0, 10, 1, 50)
    assert ctl.predict_tpot() == pytest.approx(0.01 + 1e-3 * (17 + 4))
    over = _rejected(lambda: ctl.admit("r16", "t", 0, 10, 1, 50))
    assert (over.status, over.reason) == (503, "slo_tpot") and "30.5 ms" in over.message
    ctl.finished("r0")
    ctl.admit("r16", "t", 0, 10, 1, 50)  # one ended: room for one
