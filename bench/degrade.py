"""The price and the gain of top-k -> top-1: quality, speed, and goodput under overload.

Quality (fp32, the embedded default model's committed held-out text): perplexity at the model's
K, at K = 1 keeping the renormalised top expert (weight 1.0: the rule the server uses for this
family), and at K = 1 keeping the top expert's raw softmax probability as its weight; top-1
agreement of the next-token prediction at K = 1 with the model's K, over every held-out position.
Agreement also on the scaled-down random Mixtral of bench/throughput.py.

Speed (the served dtype), on both models: MoE-layer time per token at the model's K and at
K = 1 (one MoE layer, decode-sized and prefill-sized batches, best of repeats), and offline
output tok/s of the same seeded workload at K and at K = 1 (moe_top_k), in the same run.

Under load (the embedded model): bench/overload.py's scenario (saturation by the harness's
sweep, Poisson arrivals at 2x for --duration s) against a server without control and one with
`--degradation auto` alone; goodput and p99 TTFT of both.

JSON fields: moe_speedup (MoE-layer time per token, K / K=1, embedded model), e2e_speedup,
perplexity_rise (K=1 with the server's rule vs K, relative), top1_agreement,
goodput_ratio_degradation_only. Target: moe_speedup >= 1.4 at perplexity_rise <= 0.05.
--smoke: tiny random checkpoints, small sizes, a few seconds of load.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from overload import harness  # noqa: E402
from serve_overhead import start_server  # noqa: E402
from throughput import SCALED_MIXTRAL, SMOKE_MIXTRAL, machine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "models" / "moeserve-tiny-moe"


@torch.inference_mode()
def quality(path: Path, token_ids: list[int], window: int = 256) -> dict:
    """Perplexities and top-1 agreement over `token_ids` in independent windows."""
    from moeserve import load_model
    from moeserve.testing.runner import ReferenceRunner

    model = load_model(path, dtype="float32")
    K = model.config.top_k

    def logits_at(k: int, renormalize: bool | None = None) -> list[torch.Tensor]:
        model.set_top_k(k)
        for moe in model.moe_layers:
            moe.gate.renormalize = model.config.renormalize if renormalize is None else renormalize
        out = []
        for start in range(0, len(token_ids) - 1, window):
            ids = token_ids[start : start + window + 1]
            if len(ids) < 2:
                break
            runner = ReferenceRunner(model, num_blocks=-(-window // 16) + 1)
            out.append(runner.step({0: ids[:-1]})[0].float())
        return out

    def ppl(rows: list[torch.Tensor]) -> float:
        total = count = 0
        for start, logits in zip(range(0, len(token_ids) - 1, window), rows):
            target = torch.tensor(token_ids[start + 1 : start + 1 + logits.shape[0]])
            total += torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
            count += logits.shape[0]
        return math.exp(total / count)

    full, top1 = logits_at(K), logits_at(1)
    raw = logits_at(1, renormalize=False)
    agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(full, top1))
    positions = sum(a.shape[0] for a in full)
    model.set_top_k(K)
    return {"model_k": K, "renormalize": model.config.renormalize, "positions": positions,
            "perplexity_k": ppl(full), "perplexity_k1_renormalized": ppl(top1), "perplexity_k1_raw_weight": ppl(raw),
            "top1_agreement": agree / positions}


@torch.inference_mode()
def moe_layer_time(path: Path, dtype: str, sizes: tuple[int, ...], repeats: int) -> dict:
    """Seconds per token of one MoE layer at the model's K and at K = 1, per batch size."""
    from moeserve import load_model

    model = load_model(path, dtype=dtype)
    moe, K = model.moe_layers[0], model.config.top_k
    dt = next(model.parameters()).dtype
    rows = {}
    for T in sizes:
        x = torch.randn(T, model.config.hidden_size, generator=torch.Generator().manual_seed(T)).to(dt)
        per_k = {}
        for k in (K, 1):
            kt = torch.tensor(k)
            moe(x, kt, model.load)  # warm-up
            best = math.inf
            for _ in range(repeats):
                start = time.perf_counter()
                for _ in range(5):
                    moe(x, kt, model.load)
                best = min(best, (time.perf_counter() - start) / 5)
            per_k[k] = best / T
        rows[str(T)] = {"s_per_token_k": per_k[K], "s_per_token_k1": per_k[1], "speedup": per_k[K] / per_k[1]}
    total_k = sum(r["s_per_token_k"] * int(t) for t, r in rows.items())
    total_1 = sum(r["s_per_token_k1"] * int(t) for t, r in rows.items())
    return {"dtype": str(dt), "by_batch_tokens": rows, "speedup": total_k / total_1}


def e2e(path: Path, dtype: str, num: int, seed: int) -> dict:
    """Offline output tok/s of one seeded workload at the model's K and at K = 1."""
    import random

    from moeserve import LLM, ModelConfig, SamplingParams

    vocab = ModelConfig.from_pretrained(path).vocab_size
    rng = random.Random(seed)
    work = [([rng.randrange(3, vocab) for _ in range(rng.randint(16, 128))], rng.randint(16, 128)) for _ in range(num)]
    llm = LLM(str(path), dtype=dtype, max_num_seqs=num, max_model_len=257)
    out = {}
    for name, k in (("k", None), ("k1", 1)):
        llm.generate([{"prompt_token_ids": work[0][0]}], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True,
                                                                         moe_top_k=k))
        params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, moe_top_k=k) for _, n in work]
        start = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p, _ in work], params)
        elapsed = time.perf_counter() - start
        out[f"tok_s_{name}"] = sum(len(o.outputs[0].token_ids) for o in outs) / elapsed
    out["speedup"] = out["tok_s_k1"] / out["tok_s_k"]
    return out


def under_load(model: str, args: argparse.Namespace, tmp: Path) -> dict:
    """Saturation by the sweep, then 2x it without control and with --degradation auto alone."""
    flags = ["--max-model-len", str(2 * (args.input_len + args.output_len))]
    control = ["--degradation", "auto", "--degradation-slo-ttft", f"{args.slo_ttft * 0.75:g}",
               "--degradation-slo-tpot", f"{args.slo_tpot * 0.75:g}", "--degradation-dwell", str(args.dwell)]
    with start_server(model, flags) as url:
        sweep = harness(url, model, args, tmp / "sweep.json", "--sweep-rates", args.sweep_rates, "--duration",
                        str(args.sweep_duration))
        saturation = max(run["summary"]["request_throughput"] for run in sweep["runs"])
        rate = 2 * saturation
        off = harness(url, model, args, tmp / "off.json", "--request-rate", f"{rate:.3f}", "--duration",
                      str(args.duration))["runs"][0]["summary"]
    with start_server(model, flags + control) as url:
        on = harness(url, model, args, tmp / "on.json", "--request-rate", f"{rate:.3f}", "--duration",
                     str(args.duration))["runs"][0]["summary"]
    keep = ("num_requests", "completed", "goodput", "slo_attainment", "request_throughput", "output_throughput",
            "degraded_requests", "degraded_tokens")
    return {"saturation_request_rate": saturation, "offered_request_rate": rate, "server_flags": control,
            "off": {**{k: off.get(k) for k in keep}, "ttft_p99_ms": off["ttft_ms"].get("p99"),
                    "tpot_p99_ms": off["tpot_ms"].get("p99")},
            "degradation": {**{k: on.get(k) for k in keep}, "ttft_p99_ms": on["ttft_ms"].get("p99"),
                            "tpot_p99_ms": on["tpot_ms"].get("p99")},
            "goodput_ratio": on["goodput"] / off["goodput"] if off["goodput"] else float("inf")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heldout-tokens", type=int, help="how much of the held-out text (default: all)")
    p.add_argument("--sizes", default="16,64,512", help="MoE-layer batch sizes (tokens)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--num-requests", type=int, default=48, help="offline workload")
    p.add_argument("--sweep-rates", default="4,8,16,24,32,48")
    p.add_argument("--sweep-duration", type=float, default=20.0)
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--slo-ttft", type=float, default=1.0)
    p.add_argument("--slo-tpot", type=float, default=0.1)
    p.add_argument("--dwell", type=float, default=5.0)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", type=Path, help="JSON (default: bench/results/degrade-cpu.json)")
    args = p.parse_args(argv)
    sizes = tuple(int(s) for s in args.sizes.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        from moeserve import Tokenizer
        from moeserve.testing.checkpoints import make_tiny_checkpoint

        if args.smoke:
            embedded = make_tiny_checkpoint("mixtral", tmp / "tiny")
            mixtral = make_tiny_checkpoint("mixtral", tmp / "mixtral-smoke", **SMOKE_MIXTRAL)
            heldout = [t % 500 + 3 for t in range(300)]
            sizes, args.repeats, args.num_requests = (8, 32), 1, 4
            args.sweep_rates, args.sweep_duration, args.duration, args.dwell = "20,80", 2.0, 3.0, 0.5
            args.input_len, args.output_len = 16, 16
        else:
            embedded = DEFAULT_MODEL
            mixtral = make_tiny_checkpoint("mixtral", tmp / "mixtral-scaled", **SCALED_MIXTRAL)
            heldout = Tokenizer(embedded).encode((embedded / "heldout.txt").read_text(), add_special_tokens=False)
            heldout = heldout[: args.heldout_tokens] if args.heldout_tokens else heldout
        rng_text = torch.randint(3, 500, (len(heldout) // 4,), generator=torch.Generator().manual_seed(0)).tolist()
        quality_embedded = quality(embedded, heldout)
        quality_mixtral = quality(mixtral, rng_text)
        speed = {"embedded": {"moe_layer": moe_layer_time(embedded, "auto", sizes, args.repeats),
                              "e2e": e2e(embedded, "auto", args.num_requests, 0)},
                 "scaled_mixtral": {"moe_layer": moe_layer_time(mixtral, "float32", sizes, args.repeats),
                                    "e2e": e2e(mixtral, "float32", args.num_requests, 0)}}
        load = under_load(str(embedded), args, tmp)
    q = quality_embedded
    result = {
        "benchmark": "degrade",
        "machine": machine(),
        "command": "python bench/degrade.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "models": {"embedded": "models/moeserve-tiny-moe" if not args.smoke else "tiny random mixtral (smoke)",
                   "scaled_mixtral": SCALED_MIXTRAL if not args.smoke else SMOKE_MIXTRAL},
        "moe_speedup": speed["embedded"]["moe_layer"]["speedup"],
        "e2e_speedup": speed["embedded"]["e2e"]["speedup"],
        "perplexity_rise": q["perplexity_k1_renormalized"] / q["perplexity_k"] - 1,
        "perplexity_rise_raw_weight": q["perplexity_k1_raw_weight"] / q["perplexity_k"] - 1,
        "top1_agreement": q["top1_agreement"],
        "top1_agreement_scaled_mixtral": quality_mixtral["top1_agreement"],
        "goodput_ratio_degradation_only": load["goodput_ratio"],
        "targets": {"moe_speedup": 1.4, "perplexity_rise": 0.05},
        "quality": {"embedded": quality_embedded, "scaled_mixtral_random_text": quality_mixtral},
        "speed": speed,
        "under_load": load,
    }
    out = args.out or Path(__file__).parent / "results" / "degrade-cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"moe_speedup {result['moe_speedup']:.2f} (scaled Mixtral "
          f"{speed['scaled_mixtral']['moe_layer']['speedup']:.2f}), e2e_speedup {result['e2e_speedup']:.2f}, "
          f"perplexity_rise {result['perplexity_rise']:.3f} (raw weight {result['perplexity_rise_raw_weight']:.3f}), "
          f"top1_agreement {result['top1_agreement']:.3f}, goodput_ratio_degradation_only "
          f"{result['goodput_ratio_degradation_only']:.2f} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
