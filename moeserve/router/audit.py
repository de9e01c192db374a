"""The audit trail: one JSON line per routed request (refused, rejected, escalated or not), and
the router's Prometheus series in the server's registry."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge


class AuditLog:
    """Appends one line per record to `path` (None: no audit file)."""

    def __init__(self, path: str | None):
        self.path = Path(path) if path else None
        self._lock = threading.Lock()

    def write(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        line = json.dumps(record, sort_keys=True)
        with self._lock, self.path.open("a") as f:
            f.write(line + "\n")


def read_audit(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.requests = Counter("moeserve:router_requests", "Routed requests by the profile that served them "
                                "last.", ["profile"], registry=registry)
        self.escalations = Counter("moeserve:router_escalations", "Escalations to a stronger profile, by the "
                                   "profile escalated from.", ["profile"], registry=registry)
        self.refusals = Counter("moeserve:router_refusals", "Requests refused by the safety gate, by rule.",
                                ["rule"], registry=registry)
        self.budget_rejections = Counter("moeserve:router_budget_rejections", "Requests over their tenant's "
                                         "token budget, by what happened: cheapest (rerouted) or rejected (429).",
                                         ["action"], registry=registry)
        self.verifier_failures = Counter("moeserve:router_verifier_failures", "Generations failing the "
                                         "verifier, by profile.", ["profile"], registry=registry)
        self.regret = Gauge("moeserve:router_regret_estimate", "Sum over routed requests of the bandit's "
                            "estimated best reward minus the estimate for its choice.", registry=registry)
