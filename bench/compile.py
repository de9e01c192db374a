"""torch.compile on the CPU step: what it costs to compile against what it saves, on the
throughput benchmark's checkpoint and workload (bench/throughput.py).

Two candidates, each timed against the eager step it would replace, in the same process and
alternating (this machine's speed swings between minutes):

- `parts`: the small element-wise pieces compiled (every RMSNorm and the rotary embedding,
  dynamic shapes), everything else as served: GEMMs on oneDNN-packed weights.
- `whole_aten`: the model's whole forward compiled (dynamic shapes, inductor's weight freezing),
  on aten GEMMs. The packed oneDNN weights cannot go through inductor (it does not lower their
  opaque layout), so this candidate is timed against eager aten and against the served default.

`compile_s` is the first generate after compiling (a cold inductor cache in a temporary
directory removed at exit, unless TORCHINDUCTOR_CACHE_DIR names one): tracing, code generation
and recompiles for the shapes the warm-up meets. A candidate `pays` when it is faster both ways
it is measured: its median eager/compiled pair ratio and its fastest run against the eager
side's fastest (parts), or its fastest run against the served default's (whole_aten; the served
step cannot be compiled, so there is no pair).

Writes JSON (machine description, workload, each mode's runs, ratios) to --out.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:  # a cold cache of its own, removed at exit
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="moeserve-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.throughput import add_workload_args, checkpoint_and_workload, machine, model_description  # noqa: E402


def _runner_model(llm):
    return llm.engine.core.executor.worker.runner.model


def _generate(llm, requests) -> tuple[float, int]:
    from moeserve import SamplingParams

    prompts = [{"prompt_token_ids": p} for p, _ in requests]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _, n in requests]
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    return time.perf_counter() - start, sum(len(o.outputs[0].token_ids) for o in outs)


def _compare(llm, requests, reps: int, switch) -> dict:
    """Warm the compiled side (timed: compile_s), then alternate eager and compiled runs."""
    switch(True)
    compile_s, _ = _generate(llm, requests[: max(1, len(requests) // 8)])
    runs: dict[bool, list[float]] = {False: [], True: []}
    tokens = 0
    for _ in range(reps):
        for compiled in (False, True):
            switch(compiled)
            elapsed, tokens = _generate(llm, requests)
            runs[compiled].append(elapsed)
    switch(False)

    def side(xs: list[float]) -> dict:
        return {"best_elapsed_s": min(xs), "output_tokens_per_s": tokens / min(xs), "elapsed_s": xs}

    pairs = [e / c for e, c in zip(runs[False], runs[True])]
    return {"compile_s": compile_s, "output_tokens": tokens, "eager": side(runs[False]), "compiled": side(runs[True]),
            "pair_ratios": pairs, "median_pair_ratio": statistics.median(pairs)}


def parts(llm, requests, reps: int) -> dict:
    import moeserve.model.attention as attention
    from moeserve.model.layers import RMSNorm

    norms = [m for m in _runner_model(llm).modules() if isinstance(m, RMSNorm)]
    compiled_norms = [torch.compile(m.forward, dynamic=True) for m in norms]
    eager_rotary = attention.apply_rotary
    compiled_rotary = torch.compile(eager_rotary, dynamic=True)

    def switch(on: bool) -> None:
        for module, fn in zip(norms, compiled_norms):
            if on:
                module.forward = fn
            else:
                module.__dict__.pop("forward", None)
        attention.apply_rotary = compiled_rotary if on else eager_rotary

    return _compare(llm, requests, reps, switch)


def whole(llm, requests, reps: int) -> dict:
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    model = _runner_model(llm)
    eager_forward = model.forward
    compiled_forward = torch.compile(eager_forward, dynamic=True)

    def switch(on: bool) -> None:
        model.forward = compiled_forward if on else eager_forward

    return _compare(llm, requests, reps, switch)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(p)
    p.add_argument("--reps", type=int, default=2, help="alternating eager/compiled runs per candidate")
    p.add_argument("--candidates", default="parts,whole_aten", help="comma-separated: parts, whole_aten")
    p.add_argument("--out", type=Path, help="JSON file to write (default: bench/results/compile-cpu.json)")
    args = p.parse_args(argv)
    if args.smoke:
        args.num_requests, args.min_prompt, args.max_prompt, args.min_output, args.max_output = 4, 4, 12, 4, 12
        args.reps = 1
    if args.reps < 1 or args.num_requests < 1:
        p.error("--reps and --num-requests must be >= 1")
    candidates = args.candidates.split(",")
    if not candidates or set(candidates) - {"parts", "whole_aten"}:
        p.error("--candidates takes parts and/or whole_aten")

    from moeserve import LLM

    with tempfile.TemporaryDirectory() as tmp:
        path, shape, requests = checkpoint_and_workload(args, tmp)
        # no prefix cache: every run of the same prompts computes them again, as the first did
        common = dict(dtype=args.dtype, device="cpu", max_num_seqs=len(requests),
                      max_model_len=args.max_prompt + args.max_output + 1, enable_prefix_caching=False)
        served = LLM(str(path), **common)
        _generate(served, requests[:2])
        result_parts = parts(served, requests, args.reps) if "parts" in candidates else None
        result_whole = None
        if "whole_aten" in candidates:
            served_alone = None if result_parts else _generate(served, requests)[0]
            del served
            aten = LLM(str(path), cpu_gemm="aten", **common)
            _generate(aten, requests[:2])
            result_whole = whole(aten, requests, args.reps)

    default_best = result_parts["eager"]["best_elapsed_s"] if result_parts else served_alone
    result = {
        "benchmark": "torch_compile_cpu",
        "machine": machine(),
        "model": model_description(args, shape),
        "workload": {k: getattr(args, k) for k in ("num_requests", "min_prompt", "max_prompt", "min_output",
                                                   "max_output", "seed", "smoke")},
        "reps": args.reps,
    }
    if result_parts is not None:
        result["parts"] = result_parts | {"speedup": default_best / result_parts["compiled"]["best_elapsed_s"]}
    if result_whole is not None:
        compiled_best = result_whole["compiled"]["best_elapsed_s"]
        result["whole_aten"] = result_whole | {
            "speedup_vs_eager_aten": result_whole["eager"]["best_elapsed_s"] / compiled_best,
            "speedup_vs_served_default": default_best / compiled_best}
    result["pays"] = {"parts": result["parts"]["median_pair_ratio"] > 1 and result["parts"]["speedup"] > 1} \
        if result_parts else {}
    if result_whole is not None:
        result["pays"]["whole_aten"] = result["whole_aten"]["speedup_vs_served_default"] > 1
    out = args.out or Path(__file__).parent / "results" / "compile-cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for name, run in ((n, result.get(n)) for n in ("parts", "whole_aten")):
        if run is not None:
            speedup = run.get("speedup", run.get("speedup_vs_served_default"))
            print(f"{name}: compile {run['compile_s']:.1f} s, {speedup:.3f}x the served step (best runs), pairs "
                  + ", ".join(f"{r:.3f}" for r in run["pair_ratios"]))
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
