"""Offline throughput: moeserve against transformers' batched `generate`, same checkpoint, same requests.

Workload (seeded): N requests, prompt lengths uniform in [min_prompt, max_prompt] tokens of
random ids, output lengths uniform in [min_output, max_output], EOS ignored, each request its
own length, greedy. moeserve runs them through continuous batching, each with its own
max_tokens. transformers runs them as left-padded batches of --hf-batch-size with one
max_new_tokens per batch (the longest request's): that padding and the shared length are its
real cost, so only each request's own output tokens count as useful on both sides.

Checkpoint: Mixtral shape scaled down (hidden 512, 8 layers, 8 experts, top-2, intermediate
1024, 8 heads / 2 KV heads), random weights, made with transformers' class. --smoke uses a
tiny model and 4 short requests, to keep the script working in `make test`.

Efficiency (CPU): the useful FLOPs of the moeserve run (every linear layer and attention
product of the tokens each request needs, nothing for padding), divided by its time, as a
fraction of this machine's GEMM rate at the step's dominant shapes (a full decode batch: the
attention projections at M = batch, each expert's two GEMMs at M = batch * K / E), measured in
the same run for aten's fp32 linear and for oneDNN with packed weights (what moeserve uses):
`gemm_efficiency`. `expert_paths` times the CPU expert-compute choices at several batch sizes
(the per-expert loop on aten or packed weights, torch's grouped_mm, one bmm over padded groups);
`prefill_attention` times one layer's attention for a step of the workload's prompts, padded into
one batch against sequence by sequence with SDPA (the fp32 prefill path); `decode_attention` times
it for a full decode batch, the torch path against the cpu backend's compiled kernel.

With --reps N each side runs N times, alternating; the JSON's two sides are each side's fastest
run (the committed figure is `--reps 5`, `make bench`) and `reps` lists every pair's ratio.

Writes JSON (machine description, workload, both runs, ratio, efficiency) to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

SCALED_MIXTRAL = dict(hidden_size=512, num_hidden_layers=8, intermediate_size=1024, num_local_experts=8,
                      num_experts_per_tok=2, num_attention_heads=8, num_key_value_heads=2,
                      max_position_embeddings=1024)
SMOKE_MIXTRAL = dict(num_hidden_layers=2, max_position_embeddings=128)


def machine() -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def workload(args: argparse.Namespace, vocab_size: int) -> list[tuple[list[int], int]]:
    rng = random.Random(args.seed)
    return [
        ([rng.randrange(3, vocab_size) for _ in range(rng.randint(args.min_prompt, args.max_prompt))],
         rng.randint(args.min_output, args.max_output))
        for _ in range(args.num_requests)
    ]


def checkpoint_and_workload(args: argparse.Namespace, tmp: str) -> tuple[Path, dict | None, list]:
    """The checkpoint (--model, or a scaled-down/smoke Mixtral made in `tmp`), its shape when
    made here, and the seeded requests."""
    from moeserve import ModelConfig

    path, shape = args.model, None
    if path is None:
        from moeserve.testing.checkpoints import make_tiny_checkpoint

        shape = SMOKE_MIXTRAL if args.smoke else SCALED_MIXTRAL
        path = make_tiny_checkpoint("mixtral", Path(tmp) / "mixtral-scaled", **shape)
    return path, shape, workload(args, ModelConfig.from_pretrained(path).vocab_size)


def model_description(args: argparse.Namespace, shape: dict | None) -> dict:
    return {"checkpoint": str(args.model) if args.model else "scaled-down Mixtral, random weights",
            "shape": shape, "dtype": args.dtype}


def run_moeserve(path: Path, requests, args) -> dict:
    from moeserve import LLM, SamplingParams

    llm = LLM(str(path), dtype=args.dtype, device=args.device, max_num_seqs=max(len(requests), 1),
              max_model_len=args.max_prompt + args.max_output + 1)
    warm = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    llm.generate([{"prompt_token_ids": requests[0][0]}], warm)
    prompts = [{"prompt_token_ids": p} for p, _ in requests]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _, n in requests]
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    assert produced == sum(n for _, n in requests), "moeserve must produce exactly the requested tokens"
    return {"elapsed_s": elapsed, "output_tokens": produced, "output_tokens_per_s": produced / elapsed,
            "requests_per_s": len(requests) / elapsed,
            "num_preemptions": llm.engine.core.scheduler.num_preemptions,
            "attention_backend": llm.engine.core.executor.worker.model.attention_backend}


def run_transformers(path: Path, requests, args) -> dict:
    from transformers import AutoModelForCausalLM

    dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(args.device).eval()

    def generate(batch):
        width = max(len(p) for p, _ in batch)
        ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in batch], device=args.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch], device=args.device)
        new = max(n for _, n in batch)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False, pad_token_id=0)
        return out.shape[1] - width

    generate(requests[:1])  # warm-up
    start = time.perf_counter()
    generated = 0
    for i in range(0, len(requests), args.hf_batch_size):
        batch = requests[i : i + args.hf_batch_size]
        generated += generate(batch) * len(batch)
    elapsed = time.perf_counter() - start
    useful = sum(n for _, n in requests)
    return {"elapsed_s": elapsed, "output_tokens": useful, "output_tokens_per_s": useful / elapsed,
            "requests_per_s": len(requests) / elapsed, "generated_tokens_including_padding": generated,
            "batch_size": args.hf_batch_size}


def useful_flops(path: Path, requests) -> float:
    """FLOPs the requests need: per forwarded token (the prompt, then every output but the last)
    each layer's projections, router, K experts (or dense MLP) and shared expert, plus the QK and
    PV products over its causal context; per output token the LM head."""
    from moeserve import ModelConfig

    c = ModelConfig.from_pretrained(path)
    D, H, Hkv, Dh = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
    attn = D * H * Dh * 2 + D * Hkv * Dh * 2
    moe = D * c.num_experts + c.top_k * 3 * D * c.moe_intermediate_size + 3 * D * (c.shared_expert_intermediate_size or 0)
    dense = 3 * D * c.intermediate_size
    per_token = sum(attn + (moe if i in c.moe_layer_ids else dense) for i in range(c.num_layers))
    total = 0.0
    for prompt, n in requests:
        tokens = len(prompt) + n - 1
        context = tokens * (tokens + 1) / 2  # sum over positions of the keys each one sees
        total += 2 * per_token * tokens + 4 * H * Dh * context * c.num_layers + 2 * D * c.vocab_size * n
    return total


def _time(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


def gemm_rates(path: Path, batch: int) -> dict:
    """GFLOP/s of aten's fp32 linear and of oneDNN-packed weights at a full decode batch's shapes,
    each the FLOP-weighted rate over the step's GEMMs (q/k/v/o at M = batch, the experts' w13 and
    w2 at M = batch * K / E)."""
    import torch.nn.functional as F

    from moeserve import ModelConfig
    from moeserve.model import cpu_gemm

    c = ModelConfig.from_pretrained(path)
    D, H, Hkv, Dh, I = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.moe_intermediate_size
    per_expert = max(1, batch * c.top_k // c.num_experts)
    shapes = [(batch, D, H * Dh, 1), (batch, D, Hkv * Dh, 2), (batch, H * Dh, D, 1),
              (per_expert, D, 2 * I, c.num_experts), (per_expert, I, D, c.num_experts)]  # (M, K, N, count)
    out = {"decode_batch": batch, "rows_per_expert": per_expert}
    paths = {"aten": None}
    if cpu_gemm.onednn_usable():
        paths["onednn_packed"] = cpu_gemm.pack
    for name, pack in paths.items():
        flops = seconds = 0.0
        for m, k, n, count in shapes:
            weights = [torch.randn(n, k) for _ in range(8)]  # 8 different weights: not all in cache
            x = torch.randn(m, k)
            if pack is None:
                t = _time(lambda: [F.linear(x, w) for w in weights]) / 8
            else:
                packed = [pack(w) for w in weights]
                t = _time(lambda: [cpu_gemm.packed_linear(x, w) for w in packed]) / 8
            flops += 2 * m * k * n * count
            seconds += t * count
        out[f"{name}_gflops"] = flops / seconds / 1e9
    return out


def expert_paths(path: Path, batches: tuple[int, ...]) -> list[dict]:
    """Milliseconds of one MoE layer's experts on the CPU per path, at each batch size."""
    import torch.nn.functional as F

    from moeserve import ModelConfig
    from moeserve.model import cpu_gemm
    from moeserve.model.moe.experts import GroupedMMExpertBackend, TorchExpertBackend

    c = ModelConfig.from_pretrained(path)
    E, D, I, K = c.num_experts, c.hidden_size, c.moe_intermediate_size, c.top_k
    w13, w2 = torch.randn(E, 2 * I, D) * 0.02, torch.randn(E, D, I) * 0.02
    packed = [(cpu_gemm.pack(w13[e]), cpu_gemm.pack(w2[e])) for e in range(E)] if cpu_gemm.onednn_usable() else None
    loop = TorchExpertBackend()

    def padded_bmm(x, slots, weights):
        flat = slots.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=E + 1)[:E]
        starts = torch.cumsum(counts, 0) - counts
        row_slot = flat[order]
        pos = torch.arange(flat.numel()) - starts[row_slot]
        xs = x.new_zeros(E, int(counts.max()), D)
        xs[row_slot, pos] = x[order // K]
        gate, up = torch.bmm(xs, w13.transpose(1, 2)).chunk(2, dim=-1)
        y = torch.bmm(F.silu(gate) * up, w2.transpose(1, 2))[row_slot, pos] * weights.reshape(-1)[order, None]
        return torch.zeros_like(x).index_add_(0, order // K, y)

    rows = []
    for T in batches:
        x = torch.randn(T, D)
        weights, slots = torch.topk(torch.softmax(torch.randn(T, E), dim=-1), K)
        row = {"tokens": T, "loop_aten_ms": 1e3 * _time(lambda: loop(x, slots, weights, w13, w2)),
               "padded_bmm_ms": 1e3 * _time(lambda: padded_bmm(x, slots, weights))}
        try:
            grouped = GroupedMMExpertBackend()
            row["grouped_mm_ms"] = 1e3 * _time(lambda: grouped(x, slots, weights, w13, w2))
        except ValueError:
            pass
        if packed is not None:
            row["loop_packed_ms"] = 1e3 * _time(lambda: loop(x, slots, weights, w13, w2, packed=packed))
        row["fastest"] = min((k for k in row if k.endswith("_ms")), key=row.get)[: -len("_ms")]
        rows.append(row)
    return rows


def add_workload_args(p: argparse.ArgumentParser) -> None:
    """The checkpoint and workload options both benchmarks share."""
    p.add_argument("--model", type=Path, help="checkpoint directory (default: make the scaled-down Mixtral)")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--min-prompt", type=int, default=16)
    p.add_argument("--max-prompt", type=int, default=256)
    p.add_argument("--min-output", type=int, default=16)
    p.add_argument("--max-output", type=int, default=256)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny model, 4 short requests")


def _attention_case(path: Path, query_lens: list[int], seq_lens: list[int], split_decodes: bool = False):
    """One layer's attention inputs for sequences of these lengths, over shuffled blocks of 16:
    q [T, H, Dh], random key and value caches, the step's metadata, and the scale."""
    from moeserve import ModelConfig
    from moeserve.model.attention import AttentionMetadata, Workspace

    c = ModelConfig.from_pretrained(path)
    H, Hkv, Dh, B = c.num_heads, c.num_kv_heads, c.head_dim, 16
    free = list(range(sum(-(-n // B) for n in seq_lens)))
    random.Random(0).shuffle(free)
    tables = [[free.pop() for _ in range(-(-n // B))] for n in seq_lens]
    keys = torch.randn(sum(map(len, tables)), B, Hkv, Dh)
    meta = AttentionMetadata.build(query_lens, seq_lens, tables, B, workspace=Workspace(), split_decodes=split_decodes)
    return torch.randn(sum(query_lens), H, Dh), keys, torch.randn_like(keys), meta, Dh**-0.5


def prefill_attention(path: Path, requests, budget: int = 2048) -> dict:
    """Milliseconds of one layer's torch attention for one step of prompts (the workload's first
    prompts that fit a `budget`-token step, as the scheduler would batch them): one padded batch
    against sequence by sequence with SDPA (what fp32 prefill groups take)."""
    from moeserve.model import attention

    lens = []
    for prompt, _ in requests:
        if sum(lens) + len(prompt) > budget:
            break
        lens.append(len(prompt))
    lens = lens or [len(requests[0][0])]
    q, keys, values, meta, scale = _attention_case(path, lens, lens)
    threshold, ms = attention.PER_SEQUENCE_MIN_QUERY, {}
    try:
        for name, min_query in (("padded_ms", 1 << 30), ("per_sequence_sdpa_ms", 1)):  # each path, whatever the lengths
            attention.PER_SEQUENCE_MIN_QUERY = min_query
            ms[name] = 1e3 * _time(lambda: attention.paged_attention(q, keys, values, meta, scale, None), reps=5)
    finally:
        attention.PER_SEQUENCE_MIN_QUERY = threshold
    return {"sequences": len(lens), "tokens": sum(lens), **ms, "speedup": ms["padded_ms"] / ms["per_sequence_sdpa_ms"]}


def decode_attention(path: Path, requests) -> dict:
    """Milliseconds of one layer's attention for a full decode batch of the workload (every
    request one token from its end): the torch path against the cpu backend's kernel
    (kernels/cpu_attention.cpp), when it builds here."""
    from moeserve.kernels import cpu_attention
    from moeserve.model.attention import paged_attention

    lens = [len(prompt) + n - 1 for prompt, n in requests]
    q, keys, values, meta, scale = _attention_case(path, [1] * len(lens), lens, split_decodes=True)
    row = {"sequences": len(lens), "context_tokens": sum(lens),
           "torch_ms": 1e3 * _time(lambda: paged_attention(q, keys, values, meta, scale, None))}
    if cpu_attention.usable():
        row["cpu_kernel_ms"] = 1e3 * _time(lambda: cpu_attention.paged_attention_cpu(q, keys, values, meta, scale, None))
        row["speedup"] = row["torch_ms"] / row["cpu_kernel_ms"]
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(p)
    p.add_argument("--hf-batch-size", type=int, default=64)
    p.add_argument("--reps", type=int, default=1, help="runs of each side, alternating; the JSON's sides are "
                   "each side's fastest (on a shared machine contention only ever slows a run down), and every "
                   "rep's ratio is listed with their median")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, help="JSON file to write (default: bench/results/throughput-<device>.json)")
    args = p.parse_args(argv)
    if args.smoke:
        args.num_requests, args.min_prompt, args.max_prompt, args.min_output, args.max_output = 4, 4, 12, 4, 12
    if args.reps < 1:
        p.error("--reps must be >= 1")
    if min(args.num_requests, args.min_prompt, args.min_output) < 1 or args.max_prompt < args.min_prompt \
            or args.max_output < args.min_output:
        p.error("lengths and --num-requests must be >= 1, and each max >= its min")

    with tempfile.TemporaryDirectory() as tmp:
        path, shape, requests = checkpoint_and_workload(args, tmp)
        runs = []
        for _ in range(args.reps):  # alternating, so that a slow spell of the machine hits both sides
            runs.append((run_moeserve(path, requests, args), run_transformers(path, requests, args)))
        ours = min((o for o, _ in runs), key=lambda r: r["elapsed_s"])
        theirs = min((t for _, t in runs), key=lambda r: r["elapsed_s"])
        efficiency = None
        if args.device == "cpu":
            flops = useful_flops(path, requests)
            rates = gemm_rates(path, batch=len(requests))
            useful = flops / ours["elapsed_s"] / 1e9
            efficiency = {"useful_tflop": flops / 1e12, "useful_gflops": useful, "gemm_rates": rates,
                          "gemm_efficiency": useful / rates.get("onednn_packed_gflops", rates["aten_gflops"]),
                          "gemm_efficiency_vs_aten": useful / rates["aten_gflops"],
                          "expert_paths": expert_paths(path, (4, 16, 64, 256) if args.smoke else (16, 64, 256, 512)),
                          "prefill_attention": prefill_attention(path, requests),
                          "decode_attention": decode_attention(path, requests)}

    result = {
        "benchmark": "offline_throughput",
        "machine": machine(),
        "device": args.device,
        "model": model_description(args, shape),
        "workload": {k: getattr(args, k) for k in ("num_requests", "min_prompt", "max_prompt", "min_output",
                                                   "max_output", "seed", "smoke")},
        "moeserve": ours,
        "transformers": theirs,
        "ratio_output_tokens_per_s": ours["output_tokens_per_s"] / theirs["output_tokens_per_s"],
        "reps": [{"moeserve_output_tokens_per_s": o["output_tokens_per_s"],
                  "transformers_output_tokens_per_s": t["output_tokens_per_s"],
                  "ratio": o["output_tokens_per_s"] / t["output_tokens_per_s"]} for o, t in runs],
    }
    result["median_rep_ratio"] = statistics.median(r["ratio"] for r in result["reps"])
    if efficiency is not None:
        result["efficiency"] = efficiency
        result["gemm_efficiency"] = efficiency["gemm_efficiency"]
    out = args.out or Path(__file__).parent / "results" / f"throughput-{args.device.split(':')[0]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"moeserve {ours['output_tokens_per_s']:.1f} tok/s, transformers {theirs['output_tokens_per_s']:.1f} "
          f"tok/s, ratio {result['ratio_output_tokens_per_s']:.2f}x -> {out}")
    if efficiency is not None:
        print(f"useful {efficiency['useful_gflops']:.1f} GFLOP/s = {efficiency['gemm_efficiency']:.2f} of the packed "
              f"GEMM rate at the step's shapes ({efficiency['gemm_rates'].get('onednn_packed_gflops', 0):.0f} GFLOP/s; "
              f"aten {efficiency['gemm_rates']['aten_gflops']:.0f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
