"""The Ray Serve ingress's /metrics: every replica's series, labelled by replica, plus totals.

Each replica keeps its own ServerMetrics (its AsyncEngine's); the ingress fetches their
exposition text (ReplicaSetEngine.poll) and re-exports it: every sample with a `replica` label,
and, for counters and histograms, the sum over replicas without one (the figure a dashboard of
one server shows). Gauges are per replica only: a sum of KV-cache usage fractions means nothing.
The ingress's own refusals (Ray Serve's queue full, draining, bad keys) have series of their own.
"""

from __future__ import annotations

from collections import defaultdict

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

_SUMMED = ("counter", "histogram")


class _ReplicaCollector:
    def __init__(self) -> None:
        self.texts: dict[str, bytes] = {}  # replica id -> its latest exposition text

    def collect(self):
        families: dict[str, Metric] = {}
        totals: dict[str, dict[tuple, float]] = defaultdict(lambda: defaultdict(float))
        for replica, text in sorted(self.texts.items()):
            for family in text_string_to_metric_families(text.decode()):
                out = families.get(family.name)
                if out is None:
                    out = families[family.name] = Metric(family.name, family.documentation, family.type)
                for sample in family.samples:
                    if sample.name.endswith("_created"):
                        continue
                    out.add_sample(sample.name, {**sample.labels, "replica": replica}, sample.value)
                    if family.type in _SUMMED:
                        totals[family.name][(sample.name, tuple(sorted(sample.labels.items())))] += sample.value
        for name, family in families.items():
            for (sample_name, labels), value in totals[name].items():
                family.add_sample(sample_name, dict(labels), value)
            yield family


class IngressMetrics:
    """What the OpenAI front reads off `engine.metrics` (registry, refusal_seconds, reject)."""

    def __init__(self, model_name: str):
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self._replicas = _ReplicaCollector()
        self.registry.register(self._replicas)
        self.rejections = Counter("moeserve:ingress_rejections", "Requests the ingress refused itself (draining, "
                                  "auth, Ray Serve's queue full), by reason.", ["model_name", "reason", "tenant"],
                                  registry=self.registry)
        self.refusal_seconds = Histogram("moeserve:ingress_refusal_seconds",
                                         "From the request reaching the ingress to its 429/503 answer.",
                                         ["model_name"], registry=self.registry,
                                         buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0),
                                         ).labels(model_name)

    def update(self, texts: dict[str, bytes]) -> None:
        """The replicas now serving and their latest exposition text (gone replicas drop out)."""
        self._replicas.texts = dict(texts)

    def reject(self, reason: str, tenant: str = "") -> None:
        self.rejections.labels(self.model_name, reason, tenant).inc()
