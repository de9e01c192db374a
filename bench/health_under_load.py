"""/health latency while the server is flooded.

A real `moeserve serve` of the embedded default model (or --model) on a free 127.0.0.1 port;
the load-test harness (`moeserve bench serve`, closed loop, its own process) runs --clients
clients for --duration seconds; meanwhile this process asks /health every --interval seconds
and times each answer. Writes one JSON with the machine, the commands, the /health latency
(p50/p99/max, every sample) and the flood's own summary. The target is p99 < 50 ms.
--smoke: a tiny random checkpoint, 8 clients, 3 s.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from serve_overhead import start_server  # noqa: E402
from throughput import machine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint to serve (default: the embedded default model)")
    p.add_argument("--clients", type=int, default=160)
    p.add_argument("--duration", type=float, default=40.0)
    p.add_argument("--interval", type=float, default=0.5, help="seconds between /health probes")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", type=Path, help="JSON file (default: bench/results/health_under_load-cpu.json)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            from moeserve.testing.checkpoints import make_tiny_checkpoint

            args.model = str(make_tiny_checkpoint("mixtral", Path(tmp) / "tiny"))
            args.clients, args.duration, args.interval, args.input_len, args.output_len = 8, 3.0, 0.2, 16, 16
        model = args.model or str(REPO / "models" / "moeserve-tiny-moe")
        max_len = args.input_len * 2 + args.output_len * 2 + 1
        with start_server(model, ["--max-model-len", str(max_len), "--max-num-seqs", str(args.clients)]) as url:
            flood_out = Path(tmp) / "flood.json"
            flood_cmd = [sys.executable, "-m", "moeserve.cli", "bench", "serve", "--base-url", url, "--tokenizer",
                         model, "--input-len", str(args.input_len), "--output-len", str(args.output_len),
                         "--range-ratio", "0.5", "--num-requests", "1000000", "--concurrency", str(args.clients),
                         "--duration", str(args.duration), "--no-plots", "--no-progress", "--label", "flood",
                         "--out", str(flood_out)]
            flood = subprocess.Popen(flood_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            samples: list[dict] = []
            start = time.perf_counter()
            with httpx.Client(timeout=10) as client:
                while flood.poll() is None:
                    t0 = time.perf_counter()
                    status = client.get(f"{url}/health").status_code
                    samples.append({"t": round(t0 - start, 3), "ms": (time.perf_counter() - t0) * 1000,
                                    "status": status})
                    time.sleep(max(0.0, args.interval - (time.perf_counter() - t0)))
            if flood.returncode != 0:
                raise RuntimeError(f"the flood failed: {flood.stderr.read()[-2000:]}")
            flood_summary = json.loads(flood_out.read_text())["runs"][0]["summary"]
    # Samples taken while the clients were still sending (the last request may finish later).
    during = [s for s in samples if s["t"] <= args.duration] or samples
    ms = [s["ms"] for s in during]
    result = {
        "benchmark": "health_under_load",
        "machine": machine(),
        "model": model if not args.smoke else "tiny random mixtral (smoke)",
        "command": "python bench/health_under_load.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "flood_command": "moeserve bench serve " + " ".join(flood_cmd[5:]),
        "clients": args.clients, "duration_s": args.duration, "interval_s": args.interval,
        "health_ms": {"p50": percentile(ms, 50), "p99": percentile(ms, 99), "max": max(ms), "count": len(ms)},
        "health_non_200": sum(1 for s in during if s["status"] != 200),
        "target_p99_ms": 50.0,
        "flood": {k: flood_summary.get(k) for k in ("completed", "failed", "duration_s", "request_throughput",
                                                    "output_throughput", "ttft_ms", "e2e_ms")},
        "samples": samples,
    }
    out = args.out or Path(__file__).parent / "results" / "health_under_load-cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    h = result["health_ms"]
    print(f"/health under {args.clients} clients: p50 {h['p50']:.1f} ms, p99 {h['p99']:.1f} ms, "
          f"max {h['max']:.1f} ms over {h['count']} probes -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
