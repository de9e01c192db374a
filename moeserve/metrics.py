"""Prometheus metrics, named `moeserve:*`, in a registry owned by one server (no globals).

Request-level series (TTFT, inter-token latency, ...) are observed by the front as outputs
arrive. Engine and MoE series are read at scrape time (a custom collector) from what the front
already holds: the engine's last EngineStats and the front's LoadMonitor, fed by the stats the
engine sends with each step. Nothing here reads an engine object, and per-(layer, expert) series
cost nothing until scraped. `expert_metrics` bounds the MoE series: "off" (none), "layer" (per
MoE layer: routed tokens, balancedness, gate entropy, K in force), "expert" (also per (layer,
expert) routed-token counters: L_moe x E series).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from moeserve.config import EXPERT_METRICS
from moeserve.engine.load_monitor import LoadMonitor
from moeserve.engine.messages import EngineInfo, EngineStats

logger = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                    40.0, 80.0)


class _EngineCollector(Collector):
    def __init__(self, info: EngineInfo, stats: Callable[[], EngineStats | None], monitor: LoadMonitor,
                 model_name: str, expert_metrics: str, gpu: _GpuTelemetry | None, admission: Any):
        self.info, self.stats, self.monitor, self.admission = info, stats, monitor, admission
        self.model_name = model_name
        self.expert_metrics = expert_metrics
        self.gpu = gpu

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        g = GaugeMetricFamily(name, doc, labels=["model_name"])
        g.add_metric([self.model_name], value)
        return g

    def _counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        c = CounterMetricFamily(name, doc, labels=["model_name"])
        c.add_metric([self.model_name], value)
        return c

    def collect(self) -> Iterator[Metric]:
        if self.admission is not None:
            yield self._gauge("moeserve:admission_queued_requests", "Requests admitted and waiting for a first "
                              "token.", self.admission.queued_requests)
            yield self._gauge("moeserve:admission_queued_tokens", "Prompt tokens of those requests.",
                              self.admission.queued_tokens)
        stats = self.stats()
        if stats is not None:
            yield self._gauge("moeserve:num_requests_running", "Requests in the running batch.", stats.num_running)
            yield self._gauge("moeserve:num_requests_waiting", "Requests waiting to be scheduled.", stats.num_waiting)
            yield self._gauge("moeserve:num_waiting_tokens", "Prompt tokens of waiting requests not yet computed.",
                              stats.num_waiting_tokens)
            yield self._gauge("moeserve:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).",
                              stats.kv_usage)
            yield self._gauge("moeserve:num_free_kv_blocks", "KV-cache blocks free (cached or empty).",
                              stats.num_free_blocks)
            yield self._gauge("moeserve:step_time_seconds", "Duration of the engine's last step.", stats.step_time_s)
            yield self._gauge("moeserve:prefill_tokens_per_second", "Recent prefill rate of the engine.",
                              stats.prefill_tokens_per_s)
            yield self._gauge("moeserve:decode_tokens_per_second", "Recent decode rate of the engine.",
                              stats.decode_tokens_per_s)
            yield self._counter("moeserve:engine_steps", "Steps the engine has run.", stats.step)
            yield self._counter("moeserve:engine_requests_received", "Sequences the engine has been given.",
                                stats.num_requests_received)
            yield self._counter("moeserve:num_preemptions", "Requests preempted to free KV blocks.",
                                stats.num_preemptions)
            yield self._counter("moeserve:micro_batch_split_steps", "Steps run as two micro-batches whose expert "
                                "all-to-alls overlap each other's compute.", stats.num_split_steps)
            yield self._counter("moeserve:degraded_tokens", "Tokens run with fewer experts than their request "
                                "asked for (the degradation controller).", stats.num_degraded_tokens)
            by_class = GaugeMetricFamily("moeserve:moe_top_k_by_class", "Experts per token in force for each "
                                         "priority class present (the model's K when not degraded).",
                                         labels=["model_name", "priority"])
            for priority, k in stats.top_k_by_class.items():
                by_class.add_metric([self.model_name, str(priority)], k)
            yield by_class
            yield self._counter("moeserve:prefix_cache_hits", "KV blocks reused from the prefix cache.",
                                stats.prefix_cache_hits)
            if len(stats.running_by_rank) > 1:
                by_rank = GaugeMetricFamily("moeserve:worker_requests_running", "Running requests on each "
                                            "expert-parallel worker (each runs attention for its own).",
                                            labels=["model_name", "rank"])
                for rank, n in enumerate(stats.running_by_rank):
                    by_rank.add_metric([self.model_name, str(rank)], n)
                yield by_rank
                yield self._counter("moeserve:worker_failures", "Expert-parallel worker failures (died, hung or "
                                    "a failed step on the group).", stats.worker_failures)
                yield self._counter("moeserve:worker_recoveries", "Rebuilds of the expert-parallel group.",
                                    stats.worker_recoveries)
                yield self._counter("moeserve:worker_recovery_seconds", "Time spent rebuilding (divide by "
                                    "worker_recoveries for the mean).", stats.recovery_seconds_total)
                yield self._gauge("moeserve:worker_last_recovery_seconds", "How long the last rebuild took.",
                                  stats.last_recovery_s)
                yield self._gauge("moeserve:engine_unavailable", "1 while lost workers are being rebuilt.",
                                  float(stats.unavailable is not None))
            if self.expert_metrics != "off":
                yield from self._moe(stats)
            if stats.replication is not None:
                yield from self._replication(stats)
        if self.gpu is not None:
            yield from self.gpu.collect(self.model_name)

    def _moe(self, stats: EngineStats) -> Iterator[Metric]:
        monitor = self.monitor
        layers = [str(i) for i in self.info.moe_layer_ids]  # decoder-layer index of each MoE layer
        per_layer = {
            "routed": monitor.layer_tokens.tolist(),
            "balance": monitor.balancedness(),
            "entropy": monitor.mean_gate_entropy(),
            "cv2": monitor.cv2(),
            "k": stats.top_k,
        }
        routed = CounterMetricFamily("moeserve:moe_layer_tokens", "Tokens that entered each MoE layer.",
                                     labels=["model_name", "layer"])
        balance = GaugeMetricFamily("moeserve:moe_balancedness",
                                    "Mean / max of recent per-expert load (1 = even), per MoE layer.",
                                    labels=["model_name", "layer"])
        entropy = GaugeMetricFamily("moeserve:moe_gate_entropy", "Mean entropy (nats) of the gate per token.",
                                    labels=["model_name", "layer"])
        top_k = GaugeMetricFamily("moeserve:moe_top_k", "Experts per token in force.", labels=["model_name", "layer"])
        cv2 = GaugeMetricFamily("moeserve:moe_load_cv2", "Variance / mean^2 of recent per-expert load (0 = even).",
                                labels=["model_name", "layer"])
        overflow = CounterMetricFamily("moeserve:moe_overflow_token_slots", "Token-slots over an expert's capacity "
                                       "(--moe-capacity-factor), by what happened to them.",
                                       labels=["model_name", "layer", "outcome"])
        for i, layer in enumerate(layers):
            routed.add_metric([self.model_name, layer], per_layer["routed"][i])
            balance.add_metric([self.model_name, layer], per_layer["balance"][i])
            entropy.add_metric([self.model_name, layer], per_layer["entropy"][i])
            top_k.add_metric([self.model_name, layer], per_layer["k"][i])
            cv2.add_metric([self.model_name, layer], per_layer["cv2"][i])
            overflow.add_metric([self.model_name, layer, "rerouted"], int(monitor.overflow[i, 0]))
            overflow.add_metric([self.model_name, layer, "dropped"], int(monitor.overflow[i, 1]))
        yield from (routed, balance, entropy, top_k, cv2, overflow)
        if self.expert_metrics == "expert":
            experts = CounterMetricFamily("moeserve:expert_routed_tokens",
                                          "Tokens routed to each expert (each token counts once per chosen expert).",
                                          labels=["model_name", "layer", "expert"])
            for layer, row in zip(layers, monitor.routed_tokens.tolist()):
                for expert, value in enumerate(row):
                    experts.add_metric([self.model_name, layer, str(expert)], value)
            yield experts


    def _replication(self, stats: EngineStats) -> Iterator[Metric]:
        rep = stats.replication
        layers = [str(i) for i in self.info.moe_layer_ids]
        balance = GaugeMetricFamily("moeserve:replication_balancedness", "Mean / max slot-group load over the "
                                    "planner's window, with the current placement and with the start placement.",
                                    labels=["model_name", "layer", "placement"])
        slots = GaugeMetricFamily("moeserve:moe_slots_in_use", "Expert slots holding a copy (experts + replicas).",
                                  labels=["model_name", "layer"])
        for i, layer in enumerate(layers):
            balance.add_metric([self.model_name, layer, "current"], rep.balancedness[i])
            balance.add_metric([self.model_name, layer, "start"], rep.balancedness_home[i])
            slots.add_metric([self.model_name, layer], sum(rep.replicas[i]))
        yield from (balance, slots)
        if self.expert_metrics == "expert":
            replicas = GaugeMetricFamily("moeserve:expert_replicas", "Copies of each expert.",
                                         labels=["model_name", "layer", "expert"])
            for layer, row in zip(layers, rep.replicas):
                for expert, value in enumerate(row):
                    replicas.add_metric([self.model_name, layer, str(expert)], value)
            yield replicas
        yield self._counter("moeserve:replications", "Expert copies made into spare slots.", rep.num_replications)
        yield self._counter("moeserve:replica_retirements", "Expert copies retired.", rep.num_retirements)
        yield self._counter("moeserve:replication_stall_seconds", "Step time spent copying expert weights "
                            "(divide by moeserve:replications for the mean per copy).", rep.stall_seconds_total)
        yield self._gauge("moeserve:replication_stall_seconds_max", "The longest step stall one copy caused.",
                          rep.stall_seconds_max)


class _GpuTelemetry:
    """NVML readings; built only when NVML answers (on a CPU machine its error is caught once)."""

    def __init__(self, pynvml, handles):
        self.nvml, self.handles = pynvml, handles

    @classmethod
    def probe(cls) -> _GpuTelemetry | None:
        try:
            import pynvml

            pynvml.nvmlInit()
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            return cls(pynvml, handles) if handles else None
        except Exception as e:  # no pynvml, no driver, no GPU
            logger.info("GPU telemetry off: %s", e)
            return None

    def collect(self, model_name: str) -> Iterator[Metric]:
        util = GaugeMetricFamily("moeserve:gpu_utilization_perc", "GPU utilisation (0-1).",
                                 labels=["model_name", "gpu"])
        mem = GaugeMetricFamily("moeserve:gpu_memory_used_bytes", "GPU memory in use.", labels=["model_name", "gpu"])
        for i, h in enumerate(self.handles):
            util.add_metric([model_name, str(i)], self.nvml.nvmlDeviceGetUtilizationRates(h).gpu / 100)
            mem.add_metric([model_name, str(i)], self.nvml.nvmlDeviceGetMemoryInfo(h).used)
        yield from (util, mem)


@dataclass(frozen=True)
class _ModelSeries:
    """The per-token series with their model label bound once (labels() costs a lookup and a
    lock; these are touched for every output of every request)."""

    ttft: Any
    itl: Any
    generation_tokens: Any
    request_failure: Any


class ServerMetrics:
    """All series of one server. Request-level ones are observed through the methods below."""

    def __init__(self, info: EngineInfo, stats: Callable[[], EngineStats | None], monitor: LoadMonitor,
                 model_name: str, expert_metrics: str = "layer", admission: Any = None):
        if expert_metrics not in EXPERT_METRICS:
            raise ValueError(f"expert_metrics must be one of {EXPERT_METRICS}, got {expert_metrics!r}")
        self.model_name = model_name
        self.registry = CollectorRegistry()
        labels = ["model_name"]

        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, labels, buckets=_LATENCY_BUCKETS, registry=self.registry)

        self.prompt_tokens = Counter("moeserve:prompt_tokens", "Prompt tokens of finished requests.", labels,
                                     registry=self.registry)
        self.generation_tokens = Counter("moeserve:generation_tokens", "Generated tokens.", labels,
                                         registry=self.registry)
        self.ttft = histogram("moeserve:time_to_first_token_seconds", "Time to first token.")
        self.tpot = histogram("moeserve:time_per_output_token_seconds",
                              "(e2e - ttft) / (output tokens - 1), per request.")
        self.itl = histogram("moeserve:inter_token_latency_seconds",
                             "Time between a request's consecutive token outputs from the engine.")
        self.e2e = histogram("moeserve:e2e_request_latency_seconds", "Arrival to last token.")
        self.queue_time = histogram("moeserve:request_queue_time_seconds", "Arrival to first scheduled.")
        self.request_success = Counter("moeserve:request_success", "Finished requests by finish reason.",
                                       labels + ["finished_reason"], registry=self.registry)
        self.request_failure = Counter("moeserve:request_failure", "Requests the engine failed (HTTP 500).",
                                       labels, registry=self.registry)
        self.rejections = Counter("moeserve:admission_rejections", "Requests refused before reaching the engine "
                                  "(or dropped from its queue), by reason and tenant.",
                                  labels + ["reason", "tenant"], registry=self.registry)
        self.admissions = Counter("moeserve:admission_admitted", "Requests admitted, by tenant.", labels + ["tenant"],
                                  registry=self.registry)
        self.predicted_ttft = histogram("moeserve:admission_predicted_ttft_seconds",
                                        "Time to first token predicted at admission.")
        self.refusal_seconds = Histogram("moeserve:admission_refusal_seconds",
                                         "From the request reaching the app to its 429/503 answer.", labels,
                                         buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0),
                                         registry=self.registry).labels(model_name)
        self.registry.register(_EngineCollector(info, stats, monitor, model_name, expert_metrics,
                                                _GpuTelemetry.probe(), admission))
        self.model_series = _ModelSeries(self.ttft.labels(model_name), self.itl.labels(model_name),
                                         self.generation_tokens.labels(model_name),
                                         self.request_failure.labels(model_name))

    def reject(self, reason: str, tenant: str = "") -> None:
        self.rejections.labels(self.model_name, reason, tenant).inc()

    def admitted(self, tenant: str, predicted_ttft: float | None) -> None:
        self.admissions.labels(self.model_name, tenant).inc()
        if predicted_ttft is not None:
            self.predicted_ttft.labels(self.model_name).observe(predicted_ttft)
