"""`moeserve bench serve`: load-test any OpenAI-compatible server (moeserve, vLLM, SGLang) or
moeserve's gRPC endpoint, and report p50/p90/p95/p99 latency, throughput and goodput.

Load shapes: --concurrency N (closed loop: N clients, each sends its next request when the last
one ends); --request-rate R (open loop, gamma inter-arrivals with shape --burstiness, 1 =
Poisson); --ramp A:B (rate rising linearly from A to B req/s); a trace's own timestamps. A sweep
(--sweep-rates / --sweep-concurrency) runs each level in turn and stops at saturation: a level
whose output throughput grew less than 5% over the previous level while its median TTFT grew
more than 50%. --slo-search LOW:HIGH bisects (geometrically) for the highest request rate at
which at least --slo-target of the requests meet every --slo.

Metrics (vLLM's definitions): TTFT = first token - send; TPOT = (E2E - TTFT) / (output tokens - 1);
ITL = time between streamed chunks; E2E = last byte - send; goodput = requests meeting every SLO
per second (DistServe). A request the server refused (429, 503: admission control, overload) or
failed never meets the SLO: it counts against goodput and against the SLO attainment of a
--slo-search, as a slow success would. Statistics are over successful requests; failures are
counted by HTTP status (429 and 503 apart), with the latency of each refusal. When the server
says how long it expects the first token to take (x-moeserve-predicted-ttft-ms), each request
records the prediction beside the measured TTFT. Against moeserve, the server's Prometheus series are read before and
after the run (per-expert load, K in force, queue time).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

from moeserve.bench.arrivals import gamma_arrivals, ramp_arrivals
from moeserve.bench.clients import GrpcTarget, HttpTarget, RequestResult
from moeserve.bench.report import compare, plot_run, plot_sweep, summary_table, write_json
from moeserve.bench.results import parse_slo, summarize
from moeserve.bench.workload import RequestSpec, jsonl_workload, random_workload, trace_workload


class UsageError(Exception):
    """A bad argument or an unreachable target: one line for the user, exit code 2."""


class _Progress:
    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.failed, self.enabled = total, 0, 0, enabled

    def update(self, result: RequestResult) -> None:
        self.done += 1
        self.failed += not result.ok
        if self.enabled:
            width = 30
            filled = int(width * self.done / max(self.total, 1))
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                             f"({self.failed} failed)")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


async def run_load(send, specs: list[RequestSpec], *, concurrency: int | None, arrivals: list[float] | None,
                   duration: float | None, progress: _Progress) -> tuple[list[RequestResult], float]:
    """Send `specs` closed-loop (concurrency) or at `arrivals` (seconds from start); stop sending
    new requests after `duration` seconds. Returns the results and the run's wall time."""
    start = time.perf_counter()
    results: list[RequestResult] = []

    def past_deadline() -> bool:
        return duration is not None and time.perf_counter() - start >= duration

    async def one(i: int) -> None:
        r = await send(i, specs[i], time.perf_counter() - start)
        results.append(r)
        progress.update(r)

    if concurrency is not None:
        next_index = iter(range(len(specs)))

        async def worker() -> None:
            for i in next_index:
                if past_deadline():
                    return
                await one(i)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    else:
        tasks = []
        for i, at in enumerate(arrivals):
            delay = at - (time.perf_counter() - start)
            if delay > 0:
                await asyncio.sleep(delay)
            if past_deadline():
                break
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
    return sorted(results, key=lambda r: r.index), time.perf_counter() - start


def _moeserve_metrics(base_url: str, api_key: str | None) -> dict[str, float] | None:
    """moeserve:* samples of the target's /metrics, or None when it is not moeserve."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = httpx.get(f"{base_url}/metrics", timeout=5).text
    except httpx.HTTPError:
        return None
    if "moeserve:" not in text:
        return None
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("moeserve:") and not s.name.endswith("_created") and "_bucket" not in s.name:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name")
                samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples


def _queue_time_ms(before: dict | None, after: dict | None) -> float | None:
    if not before or not after:
        return None
    count = after.get("moeserve:request_queue_time_seconds_count", 0) - before.get(
        "moeserve:request_queue_time_seconds_count", 0)
    total = after.get("moeserve:request_queue_time_seconds_sum", 0) - before.get(
        "moeserve:request_queue_time_seconds_sum", 0)
    return 1000 * total / count if count > 0 else None


def _machine() -> dict:
    import os
    import platform

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version()}


class Bench:
    """One invocation: a target, a workload, and one or more runs."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.slo = parse_slo(args.slo)
        self.base_url = args.base_url.rstrip("/")
        if args.transport == "grpc":
            self.target = GrpcTarget(args.grpc_target, args.temperature, not args.no_ignore_eos)
        else:
            self.target = HttpTarget(self.base_url, args.endpoint, self._model_name(), args.api_key, args.temperature,
                                     not args.no_ignore_eos)
        self.specs = self._workload()

    def _model_name(self) -> str:
        headers = {"Authorization": f"Bearer {self.args.api_key}"} if self.args.api_key else {}
        try:
            r = httpx.get(f"{self.base_url}/v1/models", headers=headers, timeout=10)
        except httpx.HTTPError as e:
            raise UsageError(f"cannot reach {self.base_url}: {type(e).__name__}: {e}") from e
        if r.status_code != 200:
            raise UsageError(f"{self.base_url}/v1/models answered HTTP {r.status_code}: {r.text[:200]}")
        if self.args.model:
            return self.args.model
        data = r.json().get("data") or []
        if not data:
            raise UsageError(f"{self.base_url}/v1/models lists no model; pass --model")
        return data[0]["id"]

    def _tokenizer(self):
        if not self.args.tokenizer:
            raise UsageError("random and trace workloads need --tokenizer PATH (the model directory)")
        from moeserve.tokenizer import Tokenizer

        try:
            return Tokenizer(self.args.tokenizer)
        except Exception as e:
            raise UsageError(f"cannot load the tokenizer at {self.args.tokenizer}: {e}") from e

    def _workload(self) -> list[RequestSpec]:
        a = self.args
        as_text = a.endpoint == "chat"
        try:
            if a.dataset == "jsonl":
                return jsonl_workload(Path(a.dataset_path), a.num_requests, a.output_len, a.seed)
            if a.dataset == "trace":
                return trace_workload(Path(a.dataset_path), self._tokenizer(), a.seed, as_text)
            return random_workload(a.num_requests, a.input_len, a.output_len, a.range_ratio, a.seed,
                                   self._tokenizer(), as_text)
        except (OSError, ValueError) as e:
            raise UsageError(str(e)) from e

    async def _run_async(self, concurrency, arrivals, specs) -> tuple[list[RequestResult], float]:
        progress = _Progress(len(specs), not self.args.no_progress)
        try:
            if isinstance(self.target, GrpcTarget):
                import grpc

                async with grpc.aio.insecure_channel(self.target.address) as channel:
                    async def send(i, spec, at):
                        return await self.target.send(channel, i, spec, at)

                    return await run_load(send, specs, concurrency=concurrency, arrivals=arrivals,
                                          duration=self.args.duration, progress=progress)
            # Closed loop: one connection per client. Open loop: no limit, so that a request is
            # sent at its arrival time (a pool queue would hold it on the client, timed as server
            # latency, and httpcore's pool costs O(queued) per release).
            limits = httpx.Limits(max_connections=concurrency if concurrency is not None else None,
                                  max_keepalive_connections=concurrency or 1024)
            async with httpx.AsyncClient(base_url=self.base_url, timeout=self.args.timeout, limits=limits) as client:
                async def send(i, spec, at):
                    return await self.target.send(client, i, spec, at)

                return await run_load(send, specs, concurrency=concurrency, arrivals=arrivals,
                                      duration=self.args.duration, progress=progress)
        finally:
            progress.close()

    def run_once(self, *, concurrency: int | None = None, rate: float | None = None, label: str) -> dict:
        a = self.args
        specs = self.specs
        arrivals = None
        if concurrency is None:
            if a.dataset == "trace" and rate is None and not a.ramp:
                arrivals = [s.at for s in specs]
            elif a.ramp and rate is None:
                lo, hi = a.ramp
                arrivals = ramp_arrivals(len(specs), lo, hi, a.burstiness, a.seed)
            else:
                arrivals = gamma_arrivals(len(specs), rate if rate is not None else a.request_rate, a.burstiness,
                                          a.seed)
        before = _moeserve_metrics(self.base_url, a.api_key)
        results, duration = asyncio.run(self._run_async(concurrency, arrivals, specs))
        after = _moeserve_metrics(self.base_url, a.api_key)
        summary = summarize(results, duration, self.slo)
        queue = _queue_time_ms(before, after)
        if queue is not None:
            summary["server_queue_time_ms"] = queue
        record = {"label": label, "load": {"concurrency": concurrency, "request_rate": rate if concurrency is None
                                           else None, "burstiness": a.burstiness, "ramp": a.ramp},
                  "summary": summary, "server_metrics_before": before, "server_metrics_after": after}
        if a.save_detail:
            record["requests"] = [r.__dict__ | {"tpot": r.tpot} for r in results]
        record["_results"] = results
        return record


def _saturated(prev: dict, cur: dict) -> bool:
    """Throughput grew < 5% while median TTFT grew > 50%."""
    p, c = prev["summary"], cur["summary"]
    tp_flat = c["output_throughput"] < 1.05 * p["output_throughput"]
    ttft_up = c["ttft_ms"].get("median", math.inf) > 1.5 * p["ttft_ms"].get("median", math.inf)
    return tp_flat and ttft_up


def _levels(text: str, kind, name: str) -> list:
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise UsageError(f"--{name} takes a comma-separated list of numbers, got {text!r}") from e
    if not values or any(v <= 0 for v in values):
        raise UsageError(f"--{name} values must be > 0")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moeserve bench serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    t = p.add_argument_group("target")
    t.add_argument("--base-url", default="http://127.0.0.1:8000", help="OpenAI-compatible server root")
    t.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    t.add_argument("--transport", choices=["http", "grpc"], default="http", help="grpc: moeserve's GenerateStream")
    t.add_argument("--grpc-target", default="127.0.0.1:50051", help="host:port of moeserve's gRPC endpoint")
    t.add_argument("--api-key", help="sent as Authorization: Bearer")
    t.add_argument("--model", help="model name to send (default: the first of /v1/models)")
    t.add_argument("--timeout", type=float, default=600.0, help="per-request timeout, seconds")
    w = p.add_argument_group("workload")
    w.add_argument("--dataset", choices=["random", "jsonl", "trace"], default="random")
    w.add_argument("--dataset-path", help="the JSONL prompts file or trace")
    w.add_argument("--tokenizer", help="model directory whose tokenizer makes random prompts")
    w.add_argument("--num-requests", type=int, default=100)
    w.add_argument("--input-len", type=int, default=128, help="mean prompt length (tokens), random workload")
    w.add_argument("--output-len", type=int, default=128, help="mean output length (tokens)")
    w.add_argument("--range-ratio", type=float, default=0.0, help="lengths uniform in mean * [1 - r, 1 + r]")
    w.add_argument("--temperature", type=float, default=0.0)
    w.add_argument("--no-ignore-eos", action="store_true", help="let requests stop at EOS (default: ignore_eos)")
    w.add_argument("--seed", type=int, default=0, help="fixes prompts, lengths and arrival times")
    lo = p.add_argument_group("load shape (pick one)")
    lo.add_argument("--concurrency", type=int, help="closed loop with N clients")
    lo.add_argument("--request-rate", type=float, help="open loop, requests/s")
    lo.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of inter-arrivals (1 = Poisson)")
    lo.add_argument("--ramp", help="A:B, request rate rising linearly from A to B requests/s")
    lo.add_argument("--sweep-rates", help="comma-separated request rates, stopping at saturation")
    lo.add_argument("--sweep-concurrency", help="comma-separated concurrencies, stopping at saturation")
    lo.add_argument("--slo-search", help="LOW:HIGH request rates to search for the highest meeting the SLO")
    lo.add_argument("--search-steps", type=int, default=5)
    lo.add_argument("--duration", type=float, help="stop sending new requests after this many seconds")
    s = p.add_argument_group("SLO")
    s.add_argument("--slo", help="e.g. ttft:500ms,tpot:50ms (metrics: ttft, tpot, e2e); enables goodput. A refused "
                   "(429/503) or failed request counts as not meeting it")
    s.add_argument("--slo-target", type=float, default=0.9, help="fraction of requests that must meet the SLO")
    o = p.add_argument_group("output")
    o.add_argument("--out", help="JSON file (default: bench/results/serve-<label>-<time>.json)")
    o.add_argument("--label", default="run", help="names the run in files and tables")
    o.add_argument("--plot-dir", help="PNG folder (default: beside the JSON)")
    o.add_argument("--no-plots", action="store_true")
    o.add_argument("--save-detail", action="store_true", help="per-request results in the JSON")
    o.add_argument("--no-progress", action="store_true")
    return p


def _check(args: argparse.Namespace) -> None:
    shapes = [x for x in ("concurrency", "request_rate", "ramp", "sweep_rates", "sweep_concurrency", "slo_search")
              if getattr(args, x) is not None]
    if len(shapes) > 1:
        raise UsageError(f"pick one load shape, got {', '.join('--' + s.replace('_', '-') for s in shapes)}")
    if not shapes and args.dataset != "trace":
        args.concurrency = 1
    if args.concurrency is not None and args.concurrency < 1:
        raise UsageError("--concurrency must be >= 1")
    if args.request_rate is not None and args.request_rate <= 0:
        raise UsageError("--request-rate must be > 0")
    if args.burstiness <= 0:
        raise UsageError("--burstiness must be > 0")
    for name in ("ramp", "slo_search"):
        value = getattr(args, name)
        if value is not None:
            parts = value.split(":")
            try:
                lo_, hi_ = float(parts[0]), float(parts[1])
            except (ValueError, IndexError) as e:
                raise UsageError(f"--{name.replace('_', '-')} takes LOW:HIGH, got {value!r}") from e
            if lo_ <= 0 or hi_ <= 0:
                raise UsageError(f"--{name.replace('_', '-')} rates must be > 0")
            setattr(args, name, (lo_, hi_))
    if args.slo_search and not args.slo:
        raise UsageError("--slo-search needs --slo")
    if min(args.num_requests, args.input_len, args.output_len) < 1 or not 0 <= args.range_ratio < 1:
        raise UsageError("--num-requests and lengths must be >= 1, --range-ratio in [0, 1)")
    if args.dataset in ("jsonl", "trace") and not args.dataset_path:
        raise UsageError(f"--dataset {args.dataset} needs --dataset-path")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _check(args)
        try:
            parse_slo(args.slo)
        except ValueError as e:
            raise UsageError(str(e)) from e
        bench = Bench(args)
        records = []
        if args.sweep_rates or args.sweep_concurrency:
            by_rate = args.sweep_rates is not None
            levels = _levels(args.sweep_rates or args.sweep_concurrency, float if by_rate else int,
                             "sweep-rates" if by_rate else "sweep-concurrency")
            for level in levels:
                label = f"rate={level}" if by_rate else f"concurrency={level}"
                rec = bench.run_once(rate=level, label=label) if by_rate else bench.run_once(concurrency=level,
                                                                                              label=label)
                records.append(rec)
                print(summary_table(rec["summary"], f"{args.label} {label}"))
                if len(records) > 1 and _saturated(records[-2], rec):
                    print(f"saturated at {label}: throughput flat while TTFT rose; stopping the sweep")
                    rec["saturated"] = True
                    break
        elif args.slo_search:
            lo_, hi_ = args.slo_search
            best = None
            for _ in range(args.search_steps):
                rate = math.sqrt(lo_ * hi_)
                rec = bench.run_once(rate=rate, label=f"rate={rate:.3g}")
                records.append(rec)
                ok = rec["summary"]["slo_attainment"] >= args.slo_target
                print(f"rate {rate:.3g} req/s: {rec['summary']['slo_attainment']:.0%} meet the SLO -> "
                      f"{'pass' if ok else 'fail'}")
                if ok:
                    best, lo_ = rec, rate
                else:
                    hi_ = rate
            if best is None:
                print(f"no rate in the range met the SLO for {args.slo_target:.0%} of requests")
            else:
                best["best"] = True
                print(summary_table(best["summary"], f"{args.label}: highest rate meeting the SLO, {best['label']}"))
        else:
            label = (f"concurrency={args.concurrency}" if args.concurrency else
                     f"ramp={args.ramp[0]:g}:{args.ramp[1]:g}" if args.ramp else
                     f"rate={args.request_rate}" if args.request_rate else "trace")
            rec = bench.run_once(concurrency=args.concurrency, label=label)
            records.append(rec)
            print(summary_table(rec["summary"], f"{args.label} {label}"))
    except UsageError as e:
        print(f"moeserve bench serve: {e}", file=sys.stderr)
        return 2

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(args.out) if args.out else Path("bench/results") / f"serve-{args.label}-{stamp}.json"
    plot_dir = Path(args.plot_dir) if args.plot_dir else out.parent
    plots = []
    if not args.no_plots:
        for rec in records:
            plots += plot_run(rec["_results"], plot_dir, f"{out.stem}-{rec['label'].replace('=', '')}")
        if len(records) > 1 and (args.sweep_rates or args.sweep_concurrency or args.slo_search):
            plots.append(plot_sweep(records, plot_dir, out.stem))
    for rec in records:
        rec.pop("_results")
    record = {"benchmark": "serve", "label": args.label, "created": stamp, "machine": _machine(),
              "target": {"base_url": args.base_url, "transport": args.transport, "endpoint": args.endpoint,
                         "model": getattr(bench.target, "model", None)},
              "command": "moeserve bench serve " + " ".join(argv if argv is not None else sys.argv[1:]),
              "config": {k: v for k, v in vars(args).items() if k not in ("api_key",)},
              "runs": records, "plots": [str(p) for p in plots]}
    write_json(out, record)
    print(f"wrote {out}" + (f" and {len(plots)} plot(s) in {plot_dir}" if plots else ""))
    return 0


def compare_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="moeserve bench compare", description="Side-by-side table of two runs.")
    p.add_argument("a")
    p.add_argument("b")
    args = p.parse_args(argv)
    try:
        a, b = (json.loads(Path(x).read_text()) for x in (args.a, args.b))
        print(compare(a["runs"][-1], b["runs"][-1], Path(args.a).stem, Path(args.b).stem))
    except (OSError, json.JSONDecodeError, KeyError) as e:
        print(f"moeserve bench compare: cannot read a run file: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
