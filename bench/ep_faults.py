"""A worker lost under steady load: time to detect, time to recover, requests failed vs total.

`moeserve serve --expert-parallel-size 2 --distributed-executor-backend mp --distributed-timeout 3`
on the embedded default model (127.0.0.1 only; the Ray path, with actors killed by ray.kill and
SIGKILL and a hung worker, is covered by tests/test_expert_parallel.py inside network
namespaces). The load harness (`moeserve bench serve`, Poisson arrivals) runs for --duration s;
at a third of it worker 1's process is SIGKILLed (or, with --hang, the server was started with
MOESERVE_INJECT_FAULTS=hang:1@N so that worker 1 stops answering). /health is polled every
20 ms: time to detect = kill -> first 503, time to recover = kill -> 200 again. For a hang the
start is the last moment the engine's step counter (/metrics, polled alongside) moved before
the first 503 other than the failed step's own count: the step that never finished. Requests failed = the harness's failed ones (each a
503 with Retry-After), against all it sent.

JSON: detect_s, recover_s, requests_failed, requests_total, failed_share, harness summary,
command. --smoke: a tiny model, a few seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from serve_overhead import server_process  # noqa: E402
from throughput import machine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out += [int(p) for p in text]
    return out


def worker_pids(server_pid: int) -> list[int]:
    """The expert-parallel worker processes: the engine's spawned children (not its resource tracker)."""
    pids = []
    for engine in _children(server_pid):
        for child in _children(engine):
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            if b"spawn_main" in cmdline:
                pids.append(child)
    return sorted(pids)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint (default: the embedded default model)")
    p.add_argument("--rate", type=float, default=4.0, help="Poisson request rate")
    p.add_argument("--duration", type=float, default=45.0)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--hang", action="store_true", help="a hung worker instead of a killed one")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", type=Path, help="JSON (default: bench/results/ep_faults-cpu.json)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.smoke:
            from moeserve.testing.checkpoints import make_tiny_checkpoint

            args.model = str(make_tiny_checkpoint("mixtral", tmp / "tiny"))
            args.duration, args.input_len, args.output_len = 12.0, 16, 16
        model = args.model or str(REPO / "models" / "moeserve-tiny-moe")
        env = dict(os.environ)
        if args.hang:
            env["MOESERVE_INJECT_FAULTS"] = "hang:1@150"
        flags = ["--max-model-len", str(2 * (args.input_len + args.output_len)), "--expert-parallel-size", "2",
                 "--distributed-executor-backend", "mp", "--distributed-timeout", "3"]
        with server_process(model, flags, env=env) as (url, server):
            out = tmp / "load.json"
            cmd = [sys.executable, "-m", "moeserve.cli", "bench", "serve", "--base-url", url, "--tokenizer", model,
                   "--input-len", str(args.input_len), "--output-len", str(args.output_len), "--range-ratio", "0.5",
                   "--num-requests", "100000", "--request-rate", str(args.rate), "--duration", str(args.duration),
                   "--no-plots", "--no-progress", "--seed", "7", "--out", str(out)]
            load = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            health: list[tuple[float, int]] = []
            steps: list[tuple[float, float]] = []
            stop = threading.Event()

            def poll() -> None:
                while not stop.is_set():
                    try:
                        code = httpx.get(f"{url}/health", timeout=2).status_code
                        if args.hang:
                            line = next(x for x in httpx.get(f"{url}/metrics", timeout=2).text.splitlines()
                                        if x.startswith("moeserve:engine_steps_total"))
                            steps.append((time.monotonic(), float(line.split()[-1])))
                    except (httpx.HTTPError, StopIteration):
                        code = 0
                    health.append((time.monotonic(), code))
                    time.sleep(0.02)

            poller = threading.Thread(target=poll, daemon=True)
            poller.start()
            time.sleep(args.duration / 3)
            lost_at = time.monotonic()
            if not args.hang:
                os.kill(worker_pids(server.pid)[-1], signal.SIGKILL)
            _, stderr = load.communicate(timeout=args.duration * 4 + 120)
            stop.set()
            poller.join()
            if load.returncode != 0:
                raise RuntimeError(f"the harness failed: {stderr[-2000:]}")
            record = json.loads(out.read_text())
    down = next((t for t, c in health if c == 503), None)
    if args.hang and down is not None:  # counted from the last step before the failure
        before = [(t, n) for t, n in steps if t < down]
        moved = [t for (t, n), (_, prev) in zip(before[1:], before) if n > prev]
        lost_at = moved[-2]  # the last one is the failed step itself, counted when it failed
    up = next((t for t, c in health if c == 200 and down is not None and t > down), None)
    summary = record["runs"][0]["summary"]
    result = {
        "benchmark": "ep_faults",
        "machine": machine(),
        "command": "python bench/ep_faults.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "harness_command": "moeserve bench serve " + " ".join(cmd[5:]),
        "failure": "hang" if args.hang else "SIGKILL of worker 1",
        "detect_s": None if down is None else down - lost_at,
        "recover_s": None if up is None else up - lost_at,
        "requests_total": summary["num_requests"],
        "requests_failed": summary["failed"],
        "failed_share": summary["failed"] / max(summary["num_requests"], 1),
        "errors_by_status": summary["errors_by_status"],
        "summary": summary,
    }
    path = args.out or Path(__file__).parent / "results" / f"ep_faults{'-hang' if args.hang else ''}-cpu.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['failure']}: detected in {result['detect_s']:.2f} s, serving again after {result['recover_s']:.2f} s; "
          f"{result['requests_failed']} of {result['requests_total']} requests failed -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
