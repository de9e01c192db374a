"""Serving overhead: throughput through HTTP with concurrent streams vs offline LLM.generate.

Same checkpoint, same seeded workload (random-token prompts and per-request output lengths, EOS
ignored, greedy) on both sides. The server is a real `moeserve serve` process on a free
127.0.0.1 port; --concurrency clients each stream their share of the requests. Reports output
tokens/s of both and the ratio (HTTP / offline; the target is >= 0.9) as JSON with the
machine's description. --smoke: tiny model, 4 requests.
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
    queue: asyncio.Queue = asyncio.Queue()
    for r in requests:
        queue.put_nowait(r)
    counted = 0

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal counted
        while not queue.empty():
            prompt, n = queue.get_nowait()
            body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}
            async with client.stream("POST", "/v1/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        usage = json.loads(line[6:]).get("usage")
                        if usage:
                            counted += usage["completion_tokens"]

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    return counted


def run_http(path: Path, requests, args) -> dict:
    port = _free_port()
    cmd = [sys.executable, "-m", "moeserve.cli", "serve", str(path), "--host", "127.0.0.1", "--port", str(port),
           "--dtype", args.dtype, "--max-num-seqs", str(args.concurrency),
           "--max-model-len", str(args.max_prompt + args.max_output + 1), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        asyncio.run(_stream_all(url, requests[:1], 1))  # warm-up
        start = time.perf_counter()
        tokens = asyncio.run(_stream_all(url, requests, args.concurrency))
        elapsed = time.perf_counter() - start
    finally:
        proc.terminate()
        proc.wait(60)
    return {"elapsed_s": elapsed, "output_tokens": tokens, "output_tokens_per_s": tokens / elapsed,
            "concurrency": args.concurrency}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(p)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--out", type=Path, help="JSON file to write (default: bench/results/serve_overhead-cpu.json)")
    args = p.parse_args(argv)
    if args.smoke:
        args.num_requests, args.concurrency = 4, 4
        args.min_prompt, args.max_prompt, args.min_output, args.max_output = 4, 12, 4, 12
    if min(args.num_requests, args.concurrency, args.min_prompt, args.min_output) < 1:
        p.error("counts and lengths must be >= 1")

    with tempfile.TemporaryDirectory() as tmp:
        path, shape, requests = checkpoint_and_workload(args, tmp)
        offline = run_offline(path, requests, args)
        http = run_http(path, requests, args)
    result = {
        "benchmark": "serve_overhead",
        "machine": machine(),
        "model": model_description(args, shape),
        "workload": {k: getattr(args, k) for k in ("num_requests", "concurrency", "min_prompt", "max_prompt",
                                                   "min_output", "max_output", "seed", "smoke")},
        "offline": offline,
        "http": http,
        "ratio_http_over_offline": http["output_tokens_per_s"] / offline["output_tokens_per_s"],
    }
    out = args.out or Path(__file__).parent / "results" / "serve_overhead-cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"http {http['output_tokens_per_s']:.1f} tok/s, offline {offline['output_tokens_per_s']:.1f} tok/s, "
          f"ratio {result['ratio_http_over_offline']:.2f} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
