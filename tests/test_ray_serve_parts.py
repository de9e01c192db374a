"""The Ray Serve application's parts that need no cluster: the ingress's metrics merge, the
token budgets the outstanding-tokens router and the replicas count, the app's arguments."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from moeserve.entrypoints.ray_serve import ReplicaRequest, ServeArgs, request_budget
from moeserve.entrypoints.ray_serve_metrics import IngressMetrics
from moeserve.sampling_params import SamplingParams


def _replica_text(requests: int, latencies: list[float], kv: float) -> bytes:
    registry = CollectorRegistry()
    Counter("moeserve:request_success", "done", ["model_name"], registry=registry).labels("m").inc(requests)
    h = Histogram("moeserve:e2e_request_latency_seconds", "e2e", ["model_name"], buckets=(0.1, 1.0),
                  registry=registry).labels("m")
    for x in latencies:
        h.observe(x)
    Gauge("moeserve:kv_cache_usage_perc", "kv", ["model_name"], registry=registry).labels("m").set(kv)
    return generate_latest(registry)


def _scrape(metrics: IngressMetrics) -> dict[tuple[str, str], float]:
    """(sample name, replica) -> value, for the replicas' series."""
    out = {}
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        for s in family.samples:
            if "replica" in s.labels:
                out[(s.name + (f"|le={s.labels['le']}" if "le" in s.labels else ""), s.labels["replica"])] = s.value
    return out


def test_metrics_merge_labels_each_replica_and_keeps_totals_monotonic():
    metrics = IngressMetrics("m")
    metrics.update({"a": _replica_text(3, [0.05, 2.0], 0.5), "b": _replica_text(4, [0.5], 0.25)})
    got = _scrape(metrics)
    assert got[("moeserve:request_success_total", "a")] == 3 and got[("moeserve:request_success_total", "b")] == 4
    assert got[("moeserve:request_success_total", "all")] == 7
    assert got[("moeserve:e2e_request_latency_seconds_bucket|le=1.0", "all")] == 2  # 0.05 and 0.5
    assert got[("moeserve:e2e_request_latency_seconds_count", "all")] == 3
    assert ("moeserve:kv_cache_usage_perc", "all") not in got and got[("moeserve:kv_cache_usage_perc", "b")] == 0.25
    assert not any(name.endswith("_created") for name, _ in got)
    # Replica b is replaced by c: its counts stay in the total, which never goes down.
    metrics.update({"a": _replica_text(5, [0.05, 2.0, 0.2], 0.5), "c": _replica_text(1, [], 0.0)})
    got = _scrape(metrics)
    assert ("moeserve:request_success_total", "b") not in got
    assert got[("moeserve:request_success_total", "all")] == 5 + 1 + 4
    assert got[("moeserve:e2e_request_latency_seconds_count", "all")] == 3 + 0 + 1


def test_request_budget_counts_prompt_sequences_and_room():
    prompt = {"prompt_token_ids": list(range(10))}
    assert request_budget(ReplicaRequest("r", prompt, SamplingParams(max_tokens=5, n=2))) == 10 + 2 * 5
    assert request_budget(ReplicaRequest("r", prompt, SamplingParams(max_tokens=None)), max_model_len=64) == 10 + 54
    assert request_budget(ReplicaRequest("r", prompt, SamplingParams(max_tokens=5, n=2)), None, 3) == 2 * 5 - 3


def test_bad_application_args_are_refused_by_name():
    with pytest.raises(ValueError, match="unknown moeserve application arg.*replicas"):
        ServeArgs.from_dict({"model": "m", "replicas": 2})
    with pytest.raises(ValueError, match="not both"):
        ServeArgs.from_dict({"model": "m", "num_replicas": 2, "autoscaling_config": {"max_replicas": 2}})
    with pytest.raises(TypeError, match="unknown engine setting"):
        ServeArgs.from_dict({"model": "m", "engine": {"max_len": 5}})
    with pytest.raises(ValueError, match="request_router"):
        ServeArgs.from_dict({"model": "m", "request_router": "random"})
    with pytest.raises(ValueError, match="api_keys must be a list"):
        ServeArgs.from_dict({"model": "m", "api_keys": "secret"})
    with pytest.raises(ValueError, match="num_replicas must be >= 1"):
        ServeArgs.from_dict({"model": "m", "num_replicas": 0})
    with pytest.raises(TypeError):
        ServeArgs.from_dict({"model": "m", "admission": {"no_such_flag": 1}})
