"""Admission control under 2x overload: goodput with it off and on.

1. Serve the embedded default model (or --model) and find its saturation rate with the load
   harness's sweep (Poisson arrivals at rising rates, stopping when throughput stops growing):
   the highest completed-request rate seen.
2. Send Poisson arrivals at --overload x that rate for --duration seconds, to a server without
   admission control and then to one with `--slo-ttft` and `--slo-tpot` (the server's targets
   are --server-slo-share of the client's, leaving the rest for HTTP, tokenising and the
   predictors' error), same seed.
3. Write one JSON: both runs' summaries, goodput_ratio = goodput(on) / goodput(off), refusal
   latency p50/p99, p99 TTFT of admitted requests, the TTFT predictor's error (measured -
   predicted, from the x-moeserve-predicted-ttft-ms header), and a PNG of goodput and TTFT over
   time for both runs. Refusal latency is given as the client measured it (its own event loop,
   on the same two cores, included) and as the server measured it (request reaching the app to
   the 429/503). Targets: goodput_ratio >= 2, refusals p99 < 50 ms, admitted p99 TTFT within the
   SLO. --smoke: a tiny random checkpoint, a few seconds per run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from serve_overhead import start_server  # noqa: E402
from throughput import machine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def harness(url: str, model: str, args: argparse.Namespace, out: Path, *shape: str) -> dict:
    cmd = [sys.executable, "-m", "moeserve.cli", "bench", "serve", "--base-url", url, "--tokenizer", model,
           "--input-len", str(args.input_len), "--output-len", str(args.output_len), "--range-ratio", "0.5",
           "--num-requests", "100000", "--slo", f"ttft:{args.slo_ttft}s,tpot:{args.slo_tpot}s", "--no-plots",
           "--no-progress", "--save-detail", "--seed", "7", "--out", str(out), *shape]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"the harness failed: {run.stderr[-2000:]}")
    record = json.loads(out.read_text())
    record["command"] = "moeserve bench serve " + " ".join(cmd[5:])
    return record


def refusal_histogram(url: str) -> dict:
    """The server's own refusal times (moeserve:admission_refusal_seconds, from the request reaching
    the app to its 429/503): the bucket counts, and the smallest bucket bound holding p50 and p99."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            if sample.name == "moeserve:admission_refusal_seconds_bucket":
                buckets[float(sample.labels["le"])] = sample.value
    total = buckets.get(float("inf"), 0.0)

    def bound(q: float) -> float | None:
        for le in sorted(buckets):
            if total and buckets[le] >= q * total:
                return le * 1000
        return None

    return {"count": total, "p50_at_most_ms": bound(0.5), "p99_at_most_ms": bound(0.99),
            "cumulative_by_ms": {f"{le * 1000:g}": n for le, n in sorted(buckets.items()) if le != float("inf")}}


def over_time(requests: list[dict], slo: dict[str, float], bin_s: float) -> dict[str, list[float]]:
    """Per bin of send time: requests sent, met the SLO (goodput), refused; TTFT p50/p99 (ms)."""
    end = max((r["sent_at"] for r in requests), default=0.0)
    bins = int(end // bin_s) + 1
    sent, good, refused = [0] * bins, [0] * bins, [0] * bins
    ttfts: list[list[float]] = [[] for _ in range(bins)]
    for r in requests:
        b = int(r["sent_at"] // bin_s)
        sent[b] += 1
        refused[b] += r["status"] in (429, 503)
        if r["ok"]:
            ttfts[b].append(r["ttft"] * 1000)
            tpot = r["tpot"]
            if r["ttft"] <= slo["ttft"] and (tpot is None or tpot <= slo["tpot"]):
                good[b] += 1

    def pct(values: list[float], q: float) -> float | None:
        values = sorted(values)
        return values[min(len(values) - 1, round(q * (len(values) - 1)))] if values else None

    return {"t": [i * bin_s for i in range(bins)], "sent_per_s": [x / bin_s for x in sent],
            "goodput_per_s": [x / bin_s for x in good], "refused_per_s": [x / bin_s for x in refused],
            "ttft_p50_ms": [pct(x, 0.5) for x in ttfts], "ttft_p99_ms": [pct(x, 0.99) for x in ttfts]}


def plot(series: dict[str, dict], slo_ttft_ms: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for name, s in series.items():
        top.plot(s["t"], s["goodput_per_s"], label=f"goodput, admission {name}")
        bottom.plot(s["t"], [v if v is not None else float("nan") for v in s["ttft_p99_ms"]],
                    label=f"p99 TTFT, admission {name}")
    top.plot(series["off"]["t"], series["off"]["sent_per_s"], ":", color="gray", label="offered load")
    top.set_ylabel("requests/s (by send time)")
    top.legend()
    bottom.axhline(slo_ttft_ms, color="red", linestyle="--", label="TTFT SLO")
    bottom.set_yscale("log")
    bottom.set_ylabel("TTFT of served requests (ms)")
    bottom.set_xlabel("seconds since the run started")
    bottom.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint to serve (default: the embedded default model)")
    p.add_argument("--sweep-rates", default="4,8,16,24,32,48", help="request rates of the saturation sweep")
    p.add_argument("--sweep-duration", type=float, default=20.0)
    p.add_argument("--overload", type=float, default=2.0, help="the runs' rate, as a multiple of saturation")
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--slo-ttft", type=float, default=1.0, help="seconds (client side)")
    p.add_argument("--slo-tpot", type=float, default=0.1, help="seconds (client side)")
    p.add_argument("--server-slo-share", type=float, default=0.75,
                   help="--slo-ttft of the admission-on server, as a share of the client's TTFT target")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", type=Path, help="JSON (default: bench/results/overload-cpu.json; the PNG beside it)")
    args = p.parse_args(argv)
    out = args.out or Path(__file__).parent / "results" / "overload-cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.smoke:
            from moeserve.testing.checkpoints import make_tiny_checkpoint

            args.model = str(make_tiny_checkpoint("mixtral", tmp / "tiny"))
            args.sweep_rates, args.sweep_duration, args.duration = "20,80", 2.0, 3.0
            args.input_len, args.output_len = 16, 16
        model = args.model or str(REPO / "models" / "moeserve-tiny-moe")
        flags = ["--max-model-len", str(2 * (args.input_len + args.output_len))]
        with start_server(model, flags) as url:
            sweep = harness(url, model, args, tmp / "sweep.json", "--sweep-rates", args.sweep_rates, "--duration",
                            str(args.sweep_duration))
            saturation = max(run["summary"]["request_throughput"] for run in sweep["runs"])
            rate = args.overload * saturation
            off = harness(url, model, args, tmp / "off.json", "--request-rate", f"{rate:.3f}", "--duration",
                          str(args.duration))
        server_slo = {"ttft": args.server_slo_share * args.slo_ttft, "tpot": args.server_slo_share * args.slo_tpot}
        with start_server(model, flags + ["--slo-ttft", f"{server_slo['ttft']:g}", "--slo-tpot",
                                          f"{server_slo['tpot']:g}"]) as url:
            on = harness(url, model, args, tmp / "on.json", "--request-rate", f"{rate:.3f}", "--duration",
                         str(args.duration))
            server_refusals = refusal_histogram(url)
    slo = {"ttft": args.slo_ttft, "tpot": args.slo_tpot}
    runs = {"off": off["runs"][0], "on": on["runs"][0]}
    series = {name: over_time(run["requests"], slo, 1.0 if args.smoke else 2.0) for name, run in runs.items()}
    png = out.with_suffix(".png")
    plot(series, args.slo_ttft * 1000, png)
    s_off, s_on = runs["off"]["summary"], runs["on"]["summary"]
    result = {
        "benchmark": "overload",
        "machine": machine(),
        "model": model if not args.smoke else "tiny random mixtral (smoke)",
        "command": "python bench/overload.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "slo_client_s": slo,
        "server_slo_s": server_slo,
        "saturation_request_rate": saturation,
        "offered_request_rate": rate,
        "sweep": [{"rate": r["load"]["request_rate"], "request_throughput": r["summary"]["request_throughput"],
                   "ttft_p50_ms": r["summary"]["ttft_ms"].get("p50")} for r in sweep["runs"]],
        "goodput_off": s_off["goodput"],
        "goodput_on": s_on["goodput"],
        "goodput_ratio": s_on["goodput"] / s_off["goodput"] if s_off["goodput"] else float("inf"),
        "refusal_ms": s_on["refusal_ms"],  # client side: includes the client's own event loop and connect
        "server_refusal_ms": server_refusals,
        "admitted_ttft_p99_ms": {"off": s_off["ttft_ms"].get("p99"), "on": s_on["ttft_ms"].get("p99")},
        "ttft_prediction_error_ms": {"off": s_off.get("ttft_prediction_error_ms"),
                                     "on": s_on.get("ttft_prediction_error_ms")},
        "targets": {"goodput_ratio": 2.0, "refusal_p99_ms": 50.0, "admitted_ttft_p99_ms": args.slo_ttft * 1000},
        "summaries": {"off": s_off, "on": s_on},
        "commands": {"sweep": sweep["command"], "off": off["command"], "on": on["command"]},
        "over_time": series,
        "plot": str(png.relative_to(REPO)) if png.is_relative_to(REPO) else str(png),
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saturation {saturation:.2f} req/s, offered {rate:.2f} req/s; goodput off {s_off['goodput']:.2f}, "
          f"on {s_on['goodput']:.2f} req/s (ratio {result['goodput_ratio']:.2f}); refusals p99 "
          f"{s_on['refusal_ms'].get('p99', float('nan')):.1f} ms (server: <= {server_refusals['p99_at_most_ms']} ms); "
          f"admitted p99 TTFT off "
          f"{s_off['ttft_ms'].get('p99', float('nan')):.0f} ms, on {s_on['ttft_ms'].get('p99', float('nan')):.0f} ms"
          f" -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
