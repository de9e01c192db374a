"""Serving overhead: throughput through HTTP with concurrent streams vs offline LLM.generate.

Same checkpoint, same seeded workload (random-token prompts and per-request output lengths, EOS
ignored, greedy) on both sides. The server is a real `moeserve serve` process on a free
127.0.0.1 port; --concurrency clients each stream their share of the requests. Reports output
tokens/s of both and the ratio (HTTP / offline; the target is >= 0.95) as JSON with the
machine's description. Each side runs --repeats times, interleaved; the medians are compared
(single runs on a shared 2-core machine vary by 10-15%). --smoke: tiny model, 4 requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from throughput import add_workload_args, checkpoint_and_workload, machine, model_description  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_offline(path: Path, requests, args) -> dict:
    from moeserve import LLM, SamplingParams

    llm = LLM(str(path), dtype=args.dtype, max_num_seqs=args.concurrency, max_model_len=args.max_prompt + args.max_output + 1)
    llm.generate([{"prompt_token_ids": requests[0][0]}], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _, n in requests]
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p, _ in requests], params)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"elapsed_s": elapsed, "output_tokens": tokens, "output_tokens_per_s": tokens / elapsed}


async def _stream_all(url: str, requests, concurrency: int) -> int:
    """Stream every request through `concurrency` clients; returns the completion tokens the
    server reported. The client is plain asyncio sockets that collect the bytes and read the
    final usage, not an HTTP library that parses every chunk: on a 2-core machine the client
    shares the cores with the server, and its own CPU time would be charged to the server."""
    host, port = url.removeprefix("http://").split(":")
    queue: asyncio.Queue = asyncio.Queue()
    for r in requests:
        queue.put_nowait(r)
    counted = 0

    async def one(prompt: list[int], n: int) -> int:
        body = json.dumps({"prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True, "stream": True,
                           "stream_options": {"include_usage": True}}).encode()
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                     b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (host.encode(), len(body), body))
        received = await reader.read(-1)  # to EOF: the server closes after the response
        writer.close()
        status = received[9:12]
        if status != b"200" or b"data: [DONE]" not in received:
            raise RuntimeError(f"bad response: {received[:300]!r}")
        at = received.rindex(b'"completion_tokens":') + len(b'"completion_tokens":')
        return int(received[at : at + 12].split(b",")[0].split(b"}")[0])

    async def client_loop() -> None:
        nonlocal counted
        while not queue.empty():
            prompt, n = queue.get_nowait()
            tokens = await one(prompt, n)
            counted += tokens

    await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    return counted


@contextmanager
def server_process(model: str, flags: list[str], timeout: float = 300.0, env: dict[str, str] | None = None):
    """A `moeserve serve` process on a free 127.0.0.1 port; yields (URL, process) once /health
    is 200, and stops it on exit."""
    port = _free_port()
    cmd = [sys.executable, "-m", "moeserve.cli", "serve", model, "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "warning", *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(60)


@contextmanager
def start_server(model: str, flags: list[str], timeout: float = 300.0):
    """As `server_process`, yielding the URL alone."""
    with server_process(model, flags, timeout) as (url, _):
        yield url


def run_http(path: Path, requests, args) -> dict:
    flags = ["--dtype", args.dtype, "--max-num-seqs", str(args.concurrency),
             "--max-model-len", str(args.max_prompt + args.max_output + 1)]
    with start_server(str(path), flags) as url:
        asyncio.run(_stream_all(url, requests[:1], 1))  # warm-up
        start = time.perf_counter()
        tokens = asyncio.run(_stream_all(url, requests, args.concurrency))
        elapsed = time.perf_counter() - start
    return {"elapsed_s": elapsed, "output_tokens": tokens, "output_tokens_per_s": tokens / elapsed,
            "concurrency": args.concurrency}


def _median_run(runs: list[dict]) -> dict:
    return sorted(runs, key=lambda r: r["output_tokens_per_s"])[len(runs) // 2]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(p)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="runs of each side; the medians are compared")
    p.add_argument("--out", type=Path, help="JSON file to write (default: bench/results/serve_overhead-cpu.json)")
    args = p.parse_args(argv)
    if args.smoke:
        args.num_requests, args.concurrency, args.repeats = 4, 4, 1
        args.min_prompt, args.max_prompt, args.min_output, args.max_output = 4, 12, 4, 12
    if min(args.num_requests, args.concurrency, args.min_prompt, args.min_output) < 1:
        p.error("counts and lengths must be >= 1")

    with tempfile.TemporaryDirectory() as tmp:
        path, shape, requests = checkpoint_and_workload(args, tmp)
        offline_runs, http_runs = [], []
        for _ in range(args.repeats):  # interleaved, so a slow spell of the machine hits both sides
            offline_runs.append(run_offline(path, requests, args))
            http_runs.append(run_http(path, requests, args))
    offline, http = _median_run(offline_runs), _median_run(http_runs)
    result = {
        "benchmark": "serve_overhead",
        "command": "python bench/serve_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "model": model_description(args, shape),
        "workload": {k: getattr(args, k) for k in ("num_requests", "concurrency", "min_prompt", "max_prompt",
                                                   "min_output", "max_output", "seed", "smoke", "repeats")},
        "offline": offline,
        "http": http,
        "offline_runs_tok_s": [r["output_tokens_per_s"] for r in offline_runs],
        "http_runs_tok_s": [r["output_tokens_per_s"] for r in http_runs],
        "ratio_http_over_offline": http["output_tokens_per_s"] / offline["output_tokens_per_s"],
        "target": 0.95,
    }
    out = args.out or Path(__file__).parent / "results" / "serve_overhead-cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"http {http['output_tokens_per_s']:.1f} tok/s, offline {offline['output_tokens_per_s']:.1f} tok/s, "
          f"ratio {result['ratio_http_over_offline']:.2f} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
