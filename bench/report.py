"""What the user sees: a console table, a JSON file per run, PNG plots, and comparisons."""

from __future__ import annotations

import json
from pathlib import Path

from moeserve.bench.clients import RequestResult

_METRICS = (("ttft_ms", "TTFT (ms)"), ("tpot_ms", "TPOT (ms)"), ("itl_ms", "ITL (ms)"), ("e2e_ms", "E2E (ms)"))


def summary_table(summary: dict, title: str = "") -> str:
    lines = [f"==== {title or 'moeserve bench serve'} ===="]
    lines.append(f"requests: {summary['completed']} ok, {summary['failed']} failed "
                 f"(429: {summary['rejected_429']}, 503: {summary['rejected_503']}) in {summary['duration_s']:.1f} s")
    if summary["errors_by_status"]:
        lines.append(f"errors by status: {summary['errors_by_status']}  e.g. {summary['error_samples'][:2]}")
    lines.append(f"throughput: {summary['request_throughput']:.2f} req/s, {summary['output_throughput']:.1f} output "
                 f"tok/s, {summary['total_token_throughput']:.1f} total tok/s")
    if "goodput" in summary:
        slo = ", ".join(f"{k} <= {v * 1000:g} ms" for k, v in summary["slo_s"].items())
        lines.append(f"goodput: {summary['goodput']:.2f} req/s meeting [{slo}] "
                     f"({summary['slo_attainment']:.0%} of requests)")
    if "server_queue_time_ms" in summary:
        lines.append(f"server queue time (mean): {summary['server_queue_time_ms']:.1f} ms")
    header = f"{'metric':<10}{'mean':>10}{'median':>10}{'std':>10}{'p90':>10}{'p95':>10}{'p99':>10}"
    lines += [header, "-" * len(header)]
    for key, label in _METRICS:
        s = summary[key]
        if s.get("count"):
            lines.append(f"{label:<10}" + "".join(f"{s[k]:>10.1f}" for k in ("mean", "median", "std", "p90", "p95",
                                                                            "p99")))
    return "\n".join(lines)


def write_json(path: Path, record: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def plot_run(results: list[RequestResult], out_dir: Path, stem: str) -> list[Path]:
    """Latency CDFs, and throughput and TTFT over the run's time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ok = [r for r in results if r.ok]
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    series = {"TTFT": [r.ttft for r in ok], "TPOT": [r.tpot for r in ok if r.tpot is not None],
              "ITL": [x for r in ok for x in r.itl], "E2E": [r.e2e for r in ok]}
    for ax, (name, values) in zip(axes, series.items()):
        if values:
            v = np.sort(np.asarray(values) * 1000)
            ax.plot(v, np.arange(1, v.size + 1) / v.size)
            for q in (50, 99):
                ax.axvline(np.percentile(v, q), ls="--", lw=0.8, color="grey")
        ax.set_title(f"{name} CDF (dashed: p50, p99)")
        ax.set_xlabel("ms")
        ax.set_ylim(0, 1.01)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction of requests")
    fig.tight_layout()
    paths.append(out_dir / f"{stem}-latency-cdf.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 3.6))
    if ok:
        ends = np.array([r.sent_at + r.e2e for r in ok])
        tokens = np.array([r.output_tokens for r in ok])
        span = max(float(ends.max()), 1e-9)
        width = max(span / 30, 0.25)
        edges = np.arange(0, span + width, width)
        per_bin, _ = np.histogram(ends, bins=edges, weights=tokens)
        ax1.step(edges[:-1], per_bin / width, where="post")
        ax2.scatter([r.sent_at for r in ok], [r.ttft * 1000 for r in ok], s=8)
    ax1.set_title("output throughput over time (by completion)")
    ax1.set_xlabel("s since start")
    ax1.set_ylabel("tokens / s")
    ax2.set_title("TTFT by send time")
    ax2.set_xlabel("s since start")
    ax2.set_ylabel("ms")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out_dir / f"{stem}-timeline.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)
    return paths


def plot_sweep(levels: list[dict], out_dir: Path, stem: str) -> Path:
    """Throughput against latency, one point per load level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    x = [lvl["summary"]["output_throughput"] for lvl in levels]
    for key, label in (("median", "median TTFT"), ("p99", "p99 TTFT")):
        ax.plot(x, [lvl["summary"]["ttft_ms"].get(key, float("nan")) for lvl in levels], marker="o", label=label)
    for lvl, xi in zip(levels, x):
        ax.annotate(lvl["label"], (xi, lvl["summary"]["ttft_ms"].get("median", 0)), fontsize=7)
    ax.set_xlabel("output tokens / s")
    ax.set_ylabel("TTFT (ms)")
    ax.set_title("throughput vs latency")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out_dir / f"{stem}-sweep.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def compare(a: dict, b: dict, name_a: str, name_b: str) -> str:
    """Side-by-side table of two runs' summaries with B / A ratios."""
    sa, sb = a["summary"], b["summary"]
    rows = [("request_throughput", "req/s"), ("output_throughput", "output tok/s"),
            ("total_token_throughput", "total tok/s"), ("goodput", "goodput req/s")]
    width = max(len(name_a), len(name_b), 12)
    lines = [f"{'metric':<22}{name_a:>{width}}{name_b:>{width}}{'B/A':>8}"]
    for key, label in rows:
        if key in sa and key in sb:
            lines.append(_row(label, sa[key], sb[key], width))
    for key, label in _METRICS:
        for stat in ("median", "p99"):
            va, vb = sa[key].get(stat), sb[key].get(stat)
            if va is not None and vb is not None:
                lines.append(_row(f"{label} {stat}", va, vb, width))
    return "\n".join(lines)


def _row(label: str, va: float, vb: float, width: int) -> str:
    ratio = f"{vb / va:.2f}" if va else "-"
    return f"{label:<22}{va:>{width}.2f}{vb:>{width}.2f}{ratio:>8}"
