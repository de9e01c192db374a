"""Admission control (front): decide in microseconds, before the engine sees a request, whether
it can be served in time; refuse it with 429 or 503 and a Retry-After otherwise.

Checks, in order, for each engine request (its n sequences together):

    1. tenant quota       requests/s and tokens/min token buckets per tenant  -> 429
    2. queue bound        queued requests and queued prompt tokens            -> 503
    3. TTFT SLO           predicted time to first token > --slo-ttft          -> 503
    4. TPOT SLO           predicted time per output token > --slo-tpot        -> 503

Queued = admitted and without a first token yet. When the queue bound would be crossed, queued
requests of a lower class (a larger priority number; vLLM's order) that the front knows have
not started prefill are dropped, newest first, to make room; they get 503 like a rejection.
A quota is charged prompt + max_tokens at admission (the most the request can use), and what
it did not use is given back when it ends.

The TTFT predictor, from the engine's last EngineStats and the front's own bookkeeping:

    X      = queued prompt tokens of the same or a better class + this request's
    slots  = max_num_seqs - running; if the queue ahead does not fit, the wait for the k-th
             running request to finish (its tokens left, from its max_tokens) in steps
    steps  = ceil(X / (max_num_batched_tokens - running decodes))   (prefill shares the budget)
    TTFT   ~ (slot wait + steps) x step_time(tokens per step) from the engine's fitted line

The TPOT predictor is the same line at (sequences admitted and not finished, this one included,
+ the prefill tokens of a recent step): every admitted request decodes in each step until it
ends, so admitting one more slows them all. Both are estimates (a request that stops early at
EOS frees its slot sooner; a prefill already under way is counted whole); bench/overload.py
measures the TTFT predictor's error.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moeserve.config import AdmissionConfig
from moeserve.engine.messages import EngineInfo, EngineStats

DEFAULT_TENANT = "default"


class AdmissionRejected(Exception):
    """status 429 (quota) or 503 (overload); `retry_after` whole seconds; `reason` names the
    check (rate, tokens, queue_requests, queue_tokens, slo, dropped; recovering and
    worker_failure while lost expert-parallel workers are rebuilt)."""

    def __init__(self, status: int, reason: str, message: str, retry_after: int):
        super().__init__(message)
        self.status, self.reason, self.message, self.retry_after = status, reason, message, retry_after


@dataclass(frozen=True)
class Quota:
    requests_per_second: float | None = None
    tokens_per_minute: float | None = None


@dataclass(frozen=True)
class AdmissionPolicy:
    """AdmissionConfig resolved (its YAML read). Off unless some field is set. `tenants` maps
    tenant names to their quotas; `api_key_tenants` maps API keys to tenant names (an unmapped
    key is its own tenant, named by a hash)."""

    max_queued_requests: int | None = None
    max_queued_tokens: int | None = None
    slo_ttft: float | None = None  # seconds
    slo_tpot: float | None = None  # seconds
    default_quota: Quota = field(default_factory=Quota)
    tenants: dict[str, Quota] = field(default_factory=dict)
    api_key_tenants: dict[str, str] = field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return (self.max_queued_requests is not None or self.max_queued_tokens is not None
                or self.slo_ttft is not None or self.slo_tpot is not None or self.default_quota != Quota()
                or bool(self.tenants))

    @classmethod
    def from_config(cls, config: AdmissionConfig) -> AdmissionPolicy:
        """The flags, then the YAML file (--tenant-config), which may set per-tenant quotas and
        name the tenants of API keys:

            default: {requests_per_second: 5, tokens_per_minute: 60000}
            tenants:
              team-a: {requests_per_second: 20, tokens_per_minute: 200000, api_key: sk-a}
        """
        tenant_config = config.tenant_config
        default = Quota(config.tenant_requests_per_second, config.tenant_tokens_per_minute)
        tenants: dict[str, Quota] = {}
        keys: dict[str, str] = {}
        if tenant_config:
            import yaml

            raw = yaml.safe_load(Path(tenant_config).read_text()) or {}
            if not isinstance(raw, dict) or set(raw) - {"default", "tenants"}:
                raise ValueError(f"{tenant_config}: expected the keys 'default' and 'tenants'")
            default = _quota(raw.get("default") or {}, default, f"{tenant_config}: default")
            for name, entry in (raw.get("tenants") or {}).items():
                entry = dict(entry or {})
                key = entry.pop("api_key", None)
                tenants[str(name)] = _quota(entry, default, f"{tenant_config}: tenant {name}")
                if key is not None:
                    keys[str(key)] = str(name)
        return cls(config.max_queued_requests, config.max_queued_tokens, config.slo_ttft, config.slo_tpot, default,
                   tenants, keys)


def _quota(entry: dict[str, Any], default: Quota, where: str) -> Quota:
    unknown = set(entry) - {"requests_per_second", "tokens_per_minute"}
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}")
    values = {**default.__dict__, **entry}
    for name, value in values.items():
        if value is not None and (not isinstance(value, (int, float)) or value <= 0):
            raise ValueError(f"{where}: {name} must be a positive number")
    return Quota(**values)


class TokenBucket:
    """`rate` units per second, holding at most `capacity` (one second of requests, one minute of
    tokens). Starts full."""

    def __init__(self, rate: float, capacity: float, now: float):
        self.rate, self.capacity = rate, capacity
        self.level, self._at = capacity, now

    def _refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self._at) * self.rate)
        self._at = now

    def wait_for(self, amount: float, now: float) -> float:
        """Seconds until `amount` can be taken (0 if now; inf if it never fits)."""
        self._refill(now)
        if amount > self.capacity:
            return math.inf
        return max(0.0, (amount - self.level) / self.rate)

    def take(self, amount: float, now: float) -> None:
        self._refill(now)
        self.level -= amount

    def give_back(self, amount: float) -> None:
        self.level = min(self.capacity, self.level + amount)


@dataclass
class _Admitted:
    request_id: str
    tenant: str
    priority: int
    prompt_tokens: int
    max_tokens: int  # per sequence
    sequences: int
    charged_tokens: int
    order: int
    started: bool = False  # the front saw its first token (or knows its prefill began)
    generated: int = 0


class AdmissionController:
    """Keeps the queue and the tenants' buckets; `admit` decides. Not thread-safe: the front's
    event loop calls it."""

    def __init__(self, policy: AdmissionPolicy, info: EngineInfo, stats: Callable[[], EngineStats | None],
                 clock: Callable[[], float] = time.monotonic):
        self.config, self.info, self.stats, self.clock = policy, info, stats, clock
        self._admitted: dict[str, _Admitted] = {}
        self._queued_tokens_by_priority: dict[int, int] = {}
        self._queued_requests = 0
        self._buckets: dict[str, tuple[TokenBucket | None, TokenBucket | None]] = {}
        self._order = itertools.count()

    # ---- what the front tells it ----

    def tenant_for(self, api_key: str | None, header: str | None) -> str:
        """The tenant of a request: its API key's tenant; without keys, the x-tenant header."""
        if api_key:
            return self.config.api_key_tenants.get(api_key) or "key-" + hashlib.sha256(api_key.encode()).hexdigest()[:8]
        return header or DEFAULT_TENANT

    def progress(self, request_id: str, generated: int) -> None:
        """The request has produced `generated` tokens (all its sequences): it is out of the queue."""
        entry = self._admitted.get(request_id)
        if entry is not None:
            entry.generated = generated
            if not entry.started:
                entry.started = True
                self._dequeue(entry)

    def track(self, request_id: str, tenant: str, priority: int, prompt_tokens: int, sequences: int,
              max_tokens: int) -> None:
        """Keep account of a request admitted without checks (admission control off), so that
        the predictor still sees the queue."""
        self._record(_Admitted(request_id, tenant, priority, prompt_tokens, max_tokens, sequences, 0,
                               next(self._order)))

    def finished(self, request_id: str) -> None:
        """The request ended (done, failed, aborted, dropped): free its place, refund its tenant."""
        entry = self._admitted.pop(request_id, None)
        if entry is None:
            return
        if not entry.started:
            self._dequeue(entry)
        used = entry.prompt_tokens * entry.sequences + entry.generated
        _, tokens = self._buckets.get(entry.tenant, (None, None))
        if tokens is not None and entry.charged_tokens > used:
            tokens.give_back(entry.charged_tokens - used)

    def tenant_of(self, request_id: str) -> str:
        entry = self._admitted.get(request_id)
        return entry.tenant if entry is not None else ""

    @property
    def queued_requests(self) -> int:
        return self._queued_requests

    @property
    def queued_tokens(self) -> int:
        return sum(self._queued_tokens_by_priority.values())

    # ---- the decision ----

    def admit(self, request_id: str, tenant: str, priority: int, prompt_tokens: int, sequences: int,
              max_tokens: int) -> tuple[float | None, list[str]]:
        """Admit a request of `sequences` sequences of `prompt_tokens` each, or raise
        AdmissionRejected. Returns its predicted TTFT (None when the engine has not measured a
        step yet) and the queued requests to drop to make room: the caller aborts them and
        reports them `finished`."""
        now = self.clock()
        charged = sequences * (prompt_tokens + max_tokens)
        rate, tokens = self._tenant_buckets(tenant, now)
        if rate is not None and (wait := rate.wait_for(1, now)) > 0:
            raise AdmissionRejected(429, "rate", f"tenant '{tenant}' is over its request rate "
                                    f"({rate.rate:g}/s)", _seconds(wait))
        if tokens is not None and (wait := tokens.wait_for(charged, now)) > 0:
            if math.isinf(wait):
                raise AdmissionRejected(429, "tokens", f"the request may use {charged} tokens, more than tenant "
                                        f"'{tenant}' may use in a minute ({tokens.capacity:g})", 60)
            raise AdmissionRejected(429, "tokens", f"tenant '{tenant}' is over its token quota "
                                    f"({tokens.capacity:g} tokens/min)", _seconds(wait))
        dropped = self._make_room(priority, sequences, sequences * prompt_tokens)
        predicted = self.predict_ttft(priority, sequences * prompt_tokens, sequences)
        slo = self.config.slo_ttft
        if slo is not None and predicted is not None and predicted > slo:
            raise AdmissionRejected(503, "slo", f"the predicted time to first token ({predicted:.2f}s) exceeds the "
                                    f"SLO ({slo:g}s)", self.retry_after())
        slo = self.config.slo_tpot
        tpot = self.predict_tpot(sequences) if slo is not None else None
        if tpot is not None and tpot > slo:
            raise AdmissionRejected(503, "slo_tpot", f"one more request would make the predicted time per output "
                                    f"token ({1000 * tpot:.0f} ms) exceed the SLO ({1000 * slo:g} ms)",
                                    self.retry_after())
        if rate is not None:
            rate.take(1, now)
        if tokens is not None:
            tokens.take(charged, now)
        self._record(_Admitted(request_id, tenant, priority, prompt_tokens, max_tokens, sequences, charged,
                               next(self._order)))
        return predicted, dropped

    def _make_room(self, priority: int, sequences: int, prompt_tokens: int) -> list[str]:
        """The queued, not started requests of lower classes to drop so that this one fits the
        bounds (newest of the lowest class first); AdmissionRejected if even that is not enough.
        Nothing is changed here: the caller drops them once the request is admitted."""
        max_requests, max_tokens = self.config.max_queued_requests, self.config.max_queued_tokens
        over_requests = (self._queued_requests + 1 - max_requests) if max_requests is not None else 0
        over_tokens = (self.queued_tokens + prompt_tokens - max_tokens) if max_tokens is not None else 0
        if over_requests <= 0 and over_tokens <= 0:
            return []
        candidates = sorted((e for e in self._admitted.values() if not e.started and e.priority > priority),
                            key=lambda e: (-e.priority, -e.order))
        dropped = []
        for e in candidates:
            if over_requests <= 0 and over_tokens <= 0:
                break
            dropped.append(e.request_id)
            over_requests -= 1
            over_tokens -= e.sequences * e.prompt_tokens
        if over_requests > 0:
            raise AdmissionRejected(503, "queue_requests", f"the queue is full ({max_requests} requests waiting)",
                                    self.retry_after())
        if over_tokens > 0:
            raise AdmissionRejected(503, "queue_tokens", f"the queue is full ({max_tokens} prompt tokens waiting)",
                                    self.retry_after())
        return dropped

    def predict_ttft(self, priority: int, prompt_tokens: int, sequences: int = 1) -> float | None:
        """Seconds until the first token of a new request of this class (see the module doc);
        None before the engine has reported a step."""
        stats = self.stats()
        if stats is None or stats.step_time_per_token_s <= 0:
            return None
        info = self.info
        ahead = sum(t for p, t in self._queued_tokens_by_priority.items() if p <= priority) + prompt_tokens
        queued = sum(e.sequences for e in self._admitted.values() if not e.started and e.priority <= priority)
        running = [e for e in self._admitted.values() if e.started]
        decodes = sum(e.sequences for e in running)
        need = queued + sequences - (info.max_num_seqs - decodes)  # sequences that wait for a free slot
        slot_wait = 0
        if need > 0:
            left = sorted(max(1, e.max_tokens - e.generated // e.sequences) for e in running for _ in range(e.sequences))
            if need <= len(left):
                slot_wait = left[need - 1]
            else:  # more waiting than one batch: each further batch lasts about one full request
                longest = max((e.max_tokens for e in self._admitted.values()), default=1)
                slot_wait = (left[-1] if left else 0) + math.ceil((need - len(left)) / info.max_num_seqs) * longest
        per_step = max(1, info.max_num_batched_tokens - decodes)
        steps = math.ceil(ahead / per_step)
        step_time = (stats.step_time_base_s
                     + stats.step_time_per_token_s * min(info.max_num_batched_tokens, decodes + ahead))
        return (slot_wait + steps) * step_time

    def predict_tpot(self, sequences: int = 1) -> float | None:
        """Seconds per step once this request and every one admitted before it decode together:
        the engine's step-time line at (sequences decoding + the recent prefill tokens per step)."""
        stats = self.stats()
        if stats is None or stats.step_time_per_token_s <= 0:
            return None
        decoding = sum(e.sequences for e in self._admitted.values()) + sequences
        tokens = min(self.info.max_num_batched_tokens, decoding + stats.prefill_tokens_per_step)
        return stats.step_time_base_s + stats.step_time_per_token_s * tokens

    def retry_after(self) -> int:
        """Whole seconds until the queue has likely drained (at least 1)."""
        predicted = self.predict_ttft(max(self._queued_tokens_by_priority, default=0), 0, 0)
        return _seconds(predicted if predicted is not None else 1.0)

    # ---- internals ----

    def _tenant_buckets(self, tenant: str, now: float) -> tuple[TokenBucket | None, TokenBucket | None]:
        if tenant not in self._buckets:
            quota = self.config.tenants.get(tenant, self.config.default_quota)
            rate = quota.requests_per_second
            per_minute = quota.tokens_per_minute
            self._buckets[tenant] = (TokenBucket(rate, max(1.0, rate), now) if rate else None,
                                     TokenBucket(per_minute / 60, per_minute, now) if per_minute else None)
        return self._buckets[tenant]

    def _record(self, entry: _Admitted) -> None:
        self._admitted[entry.request_id] = entry
        self._queued_requests += 1
        by = self._queued_tokens_by_priority
        by[entry.priority] = by.get(entry.priority, 0) + entry.sequences * entry.prompt_tokens

    def _dequeue(self, entry: _Admitted) -> None:
        self._queued_requests -= 1
        by = self._queued_tokens_by_priority
        by[entry.priority] -= entry.sequences * entry.prompt_tokens
        if not by[entry.priority]:
            del by[entry.priority]


def _seconds(value: float) -> int:
    return max(1, math.ceil(value))
