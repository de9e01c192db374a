"""The Ray Serve ingress's /metrics: every replica's series, labelled by replica, plus totals.

Each replica keeps its own ServerMetrics (its AsyncEngine's); the ingress fetches their
exposition text (ReplicaSetEngine.poll, once a second) and re-exports it: every sample with a
`replica` label, and for counters and histograms one more series with `replica="all"`: the sum
over the replicas serving now plus the last values of those gone (scaled down, replaced), so
that it never decreases. Select either `replica="all"` or the others (`sum` over every series
would count twice). Gauges are per replica only: a sum of KV-cache usage fractions means
nothing. The ingress's own refusals (Ray Serve's queue full, draining, bad keys) have series of
their own.
"""

from __future__ import annotations

from collections import defaultdict

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

_SUMMED = ("counter", "histogram")
ALL = "all"

_Key = tuple[str, str, str, tuple[tuple[str, str], ...]]  # (family, type, sample name, labels)


def _parse(text: bytes) -> tuple[dict[str, tuple[str, str]], dict[_Key, float], list[tuple[str, str, dict, float]]]:
    """(family -> (type, doc), summable sample values, every sample as (family, name, labels, value))."""
    families, summable, samples = {}, {}, []
    for family in text_string_to_metric_families(text.decode()):
        families[family.name] = (family.type, family.documentation)
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            samples.append((family.name, sample.name, sample.labels, sample.value))
            if family.type in _SUMMED:
                summable[(family.name, family.type, sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return families, summable, samples


class _ReplicaCollector:
    def __init__(self) -> None:
        self.live: dict[str, tuple] = {}  # replica id -> its parsed latest text
        self.departed: dict[_Key, float] = defaultdict(float)  # summed last values of replicas gone
        self.families: dict[str, tuple[str, str]] = {}

    def update(self, texts: dict[str, bytes]) -> None:
        parsed = {replica: _parse(text) for replica, text in texts.items()}
        for replica, (_, summable, _) in self.live.items():
            if replica not in parsed:
                for key, value in summable.items():
                    self.departed[key] += value
        self.live = parsed
        for families, _, _ in parsed.values():
            self.families.update(families)

    def collect(self):
        out = {name: Metric(name, doc, typ) for name, (typ, doc) in self.families.items()}
        totals: dict[_Key, float] = defaultdict(float, self.departed)
        for replica, (_, summable, samples) in sorted(self.live.items()):
            for family, name, labels, value in samples:
                out[family].add_sample(name, {**labels, "replica": replica}, value)
            for key, value in summable.items():
                totals[key] += value
        for (family, _, name, labels), value in totals.items():
            out[family].add_sample(name, {**dict(labels), "replica": ALL}, value)
        yield from (m for m in out.values() if m.samples)


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
        self._replicas.update(texts)

    def reject(self, reason: str, tenant: str = "") -> None:
        self.rejections.labels(self.model_name, reason, tenant).inc()
