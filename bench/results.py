"""What a run measured: per-metric statistics, throughput, goodput against SLOs, errors.

Definitions (vLLM's): TTFT = first token - send; TPOT = (E2E - TTFT) / (output tokens - 1);
ITL = gap between consecutive streamed chunks (each gap is one sample); E2E = last byte - send.
Goodput (DistServe): requests that meet every SLO, per second of the run. Statistics cover
successful requests only; failures are counted by status code, 429 and 503 apart.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np

from moeserve.bench.clients import RequestResult

SLO_METRICS = ("ttft", "tpot", "e2e")


def parse_slo(spec: str | None) -> dict[str, float]:
    """"ttft:500ms,tpot:50ms" -> {"ttft": 0.5, "tpot": 0.05} (seconds)."""
    if not spec:
        return {}
    slo = {}
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\w+)\s*:\s*([0-9.]+)\s*(ms|s)\s*", part)
        if not m:
            raise ValueError(f"cannot read SLO {part!r}; write metric:value with ms or s, e.g. ttft:500ms")
        name, value, unit = m[1], float(m[2]), m[3]
        if name not in SLO_METRICS:
            raise ValueError(f"unknown SLO metric {name!r}; use {', '.join(SLO_METRICS)}")
        slo[name] = value / 1000 if unit == "ms" else value
    return slo


def stats(values: list[float], scale: float = 1000.0) -> dict[str, float | int]:
    """mean/median/std and percentiles, in ms by default."""
    if not values:
        return {"count": 0}
    a = np.asarray(values, dtype=np.float64) * scale
    p50, p90, p95, p99 = np.percentile(a, [50, 90, 95, 99])
    return {"count": int(a.size), "mean": float(a.mean()), "median": float(np.median(a)), "std": float(a.std()),
            "p50": float(p50), "p90": float(p90), "p95": float(p95), "p99": float(p99), "min": float(a.min()),
            "max": float(a.max())}


def meets_slo(r: RequestResult, slo: dict[str, float]) -> bool:
    if not r.ok:
        return False
    values = {"ttft": r.ttft, "tpot": r.tpot, "e2e": r.e2e}
    return all(values[m] is not None and values[m] <= limit for m, limit in slo.items())


def summarize(results: list[RequestResult], duration: float, slo: dict[str, float]) -> dict:
    ok = [r for r in results if r.ok]
    statuses = Counter(r.status for r in results if not r.ok)
    out_tokens = sum(r.output_tokens for r in ok)
    summary = {
        "num_requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors_by_status": {str(k): v for k, v in sorted(statuses.items(), key=lambda kv: str(kv[0]))},
        "rejected_429": statuses.get(429, 0),
        "rejected_503": statuses.get(503, 0),
        "error_samples": sorted({r.error for r in results if r.error})[:5],
        "duration_s": duration,
        "request_throughput": len(ok) / duration if duration > 0 else 0.0,
        "output_throughput": out_tokens / duration if duration > 0 else 0.0,
        "total_token_throughput": (out_tokens + sum(r.prompt_tokens for r in ok)) / duration if duration > 0 else 0.0,
        "total_output_tokens": out_tokens,
        "ttft_ms": stats([r.ttft for r in ok]),
        "tpot_ms": stats([r.tpot for r in ok if r.tpot is not None]),
        "itl_ms": stats([x for r in ok for x in r.itl]),
        "e2e_ms": stats([r.e2e for r in ok]),
        "refusal_ms": stats([r.refused_after for r in results if r.refused_after is not None]),
    }
    reported = [r.degraded_tokens for r in ok if r.degraded_tokens is not None]
    if reported:
        summary["degraded_requests"] = sum(1 for d in reported if d > 0)
        summary["degraded_tokens"] = sum(reported)
    predicted = [(r.predicted_ttft, r.ttft) for r in ok if r.predicted_ttft is not None and r.ttft is not None]
    if predicted:
        summary["ttft_prediction_error_ms"] = stats([measured - guess for guess, measured in predicted])
    if slo:
        good = sum(meets_slo(r, slo) for r in results)
        summary["slo_s"] = slo
        summary["goodput"] = good / duration if duration > 0 else 0.0
        summary["slo_attainment"] = good / len(results) if results else 0.0
        summary["requests_meeting_slo"] = good
    return summary
