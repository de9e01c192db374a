"""Hot-expert replication while serving: balancedness, MoE-layer time and the stall, off vs on.

Models:
- zipf64: a random Mixtral-layout checkpoint with E = 64 experts, K = 2, whose routers are
  calibrated so expert popularity follows Zipf (s = 1.2, a different random order of experts per
  layer): the embedding gets a shared direction u and each router row an offset along u,
  fitted on the model's own hidden states (the achieved exponent is reported).
  4 slot groups, --num-redundant-experts 8 (extra_slot_fraction 0.125).
- embedded: the 8-expert default model (models/moeserve-tiny-moe) on its held-out text, 4 slot
  groups, 4 spares.

For each: one offline engine run of a seeded workload with `--replication auto`, the same
workload with replication off. Balancedness = mean / max slot-group load (EPLB's definition)
over the planner's window at the end of the run, with the start placement (`before`: what the
engine without replication runs) and with the placement the planner reached (`after`), averaged
over MoE layers (worst layer alongside). MoE-layer time: on one CPU the groups run one after
another, so the layer's time does not depend on balance; what balance buys is the time of the
slowest group when groups run in parallel (expert parallelism). Both are measured on a batch of
the model's own hidden states: the whole layer, and each group's slots alone (the parallel
time is the slowest group's), with the start placement and the reached one. The stall is the
longest between-steps copy of one expert's weights (wall time in the engine; a CPU figure here,
the GPU target is 10 ms per layer).

JSON fields: balancedness_before, balancedness_after, extra_slot_fraction, max_stall_ms (the
zipf64 model; the embedded model under "embedded"). Target: balancedness_after >= 0.9 at
extra_slot_fraction <= 0.125. --smoke: a small model and workload.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from throughput import machine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "models" / "moeserve-tiny-moe"
ZIPF64 = dict(num_local_experts=64, num_experts_per_tok=2, hidden_size=256, intermediate_size=256,
              num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
SMOKE = dict(num_local_experts=16, num_experts_per_tok=2, num_hidden_layers=2, max_position_embeddings=256)


def _gate_inputs(model, prompts: list[list[int]]) -> list[torch.Tensor]:
    """The hidden states each MoE layer's router sees on `prompts`, [T, D] per layer."""
    from moeserve.testing.runner import ReferenceRunner

    seen: list[list[torch.Tensor]] = [[] for _ in model.moe_layers]
    hooks = [moe.gate.register_forward_hook(lambda m, args, out, i=i: seen[i].append(args[0].detach().clone()))
             for i, moe in enumerate(model.moe_layers)]
    try:
        ReferenceRunner(model, num_blocks=1024).step({i: p for i, p in enumerate(prompts)})
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(xs) for xs in seen]


@torch.inference_mode()
def make_zipf_checkpoint(path: Path, config: dict, s: float, seed: int, iterations: int = 150) -> dict:
    """A checkpoint whose expert popularity follows Zipf(s); returns the fit."""
    from safetensors.torch import load_file, save_file

    from moeserve import load_model
    from moeserve.checkpoint import _hub_to_moeserve  # the Hub name of each tensor
    from moeserve.model_config import ModelConfig
    from moeserve.testing.checkpoints import make_tiny_checkpoint

    make_tiny_checkpoint("mixtral", path, seed=seed, **config)
    model = load_model(path, dtype="float32")
    E, K, D = model.config.num_experts, model.config.top_k, model.config.hidden_size
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(D, generator=g)
    u /= u.norm()
    embed = model.model.embed_tokens.weight
    embed += 4 * embed.norm(dim=1).mean() * u  # every token's residual stream leans along u
    rng = np.random.default_rng(seed)
    targets = []
    for _ in model.moe_layers:
        share = np.arange(1, E + 1, dtype=np.float64) ** -s
        targets.append((share / share.sum())[rng.permutation(E)])
    prompts = [[int(t) for t in rng.integers(3, model.config.vocab_size, 64)] for _ in range(24)]
    for i, moe in enumerate(model.moe_layers):  # layer by layer: a layer's input depends on those before
        x = _gate_inputs(model, prompts)[i]  # [T, D]
        along = x @ u  # [T] about the same for every token
        logits = x @ moe.gate.weight.T  # [T, E]
        offset = np.zeros(E)
        for _ in range(iterations):
            shifted = logits + torch.tensor(offset, dtype=torch.float32) * (along / along.mean())[:, None]
            ids = torch.topk(shifted, K, dim=-1).indices
            share = np.bincount(ids.reshape(-1).numpy(), minlength=E) / ids.numel()
            offset += 0.1 * np.clip(np.log(targets[i]) - np.log(np.maximum(share, 0.5 / ids.numel())), -1, 1)
            offset -= offset.mean()
        moe.gate.weight += torch.tensor(offset / float(along.mean()), dtype=torch.float32)[:, None] * u
    # the achieved popularity and its Zipf exponent (least squares of log share on log rank)
    xs = _gate_inputs(model, prompts)
    exponents, top_shares = [], []
    for moe, x in zip(model.moe_layers, xs):
        ids = torch.topk(x @ moe.gate.weight.T, K, dim=-1).indices
        share = np.sort(np.bincount(ids.reshape(-1).numpy(), minlength=E) / ids.numel())[::-1]
        ranks = np.arange(1, E + 1)
        keep = share > 0
        exponents.append(float(-np.polyfit(np.log(ranks[keep]), np.log(share[keep]), 1)[0]))
        top_shares.append(float(share[0]))
    # write the changed tensors back in Hub layout
    params = dict(model.named_parameters())
    mc = ModelConfig.from_pretrained(path)
    for f in sorted(path.glob("*.safetensors")):
        tensors = load_file(f)
        for name in tensors:
            ours = _hub_to_moeserve(name, mc)
            if ours == "model.embed_tokens.weight" or ours.endswith(".mlp.gate.weight"):
                tensors[name] = params[ours].detach().to(tensors[name].dtype).contiguous()
        save_file(tensors, f, metadata={"format": "pt"})
    return {"zipf_s_target": s, "zipf_s_fitted_per_layer": exponents, "top_expert_share_per_layer": top_shares}


def workload(vocab: int, num: int, seed: int, heldout: list[int] | None) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(num):
        n = rng.randint(32, 96)
        if heldout:
            start = rng.randrange(0, len(heldout) - n)
            prompt = heldout[start : start + n]
        else:
            prompt = [rng.randrange(3, vocab) for _ in range(n)]
        out.append((prompt, rng.randint(32, 64)))
    return out


def engine_run(path: Path, work, spares: int, groups: int, replication: str, args) -> dict:
    from moeserve import LLM, SamplingParams

    llm = LLM(str(path), dtype="float32", max_model_len=256, max_num_seqs=args.max_num_seqs,
              num_redundant_experts=spares, expert_slot_groups=groups, replication=replication,
              replication_window=args.window, replication_interval=args.interval)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _, n in work]
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p, _ in work], params)
    elapsed = time.perf_counter() - start
    core = llm.engine.core
    result = {"output_tok_s": sum(len(o.outputs[0].token_ids) for o in outs) / elapsed, "steps": core.stats().step}
    if core.replication is not None:
        rep = core.stats().replication
        result.update(balancedness_start_placement=rep.balancedness_home, balancedness_reached=rep.balancedness,
                      replications=rep.num_replications, retirements=rep.num_retirements,
                      max_stall_ms=1e3 * rep.stall_seconds_max,
                      mean_stall_ms=1e3 * rep.stall_seconds_total / max(rep.num_replications, 1),
                      replicas=rep.replicas)
    result["model"] = core.executor.worker.model
    return result


@torch.inference_mode()
def moe_layer_times(start_model, reached_model, prompts, repeats: int) -> dict:
    """Seconds of each MoE layer on the model's own hidden states, start placement vs reached:
    the whole layer, and the slowest group's slots alone (what parallel groups would wait for)."""
    xs = _gate_inputs(start_model, prompts)
    out = {}
    for name, model in (("start", start_model), ("reached", reached_model)):
        layer_s = slowest_s = 0.0
        for i, (moe, x) in enumerate(zip(model.moe_layers, xs)):
            routing = moe.gate(x, model.top_k[i])
            slots = moe.placement.slots_for(routing.expert_ids)  # [T, K]
            P = moe.placement.num_slots
            group = moe.placement.slot_rank[slots.clamp(max=P - 1)]
            layer_s += _best(lambda: moe.backend(x, slots, routing.weights, moe.w13, moe.w2), repeats)
            per_group = []
            for g in range(int(moe.placement.slot_rank.max()) + 1):
                mine = torch.where(group == g, slots, P)
                per_group.append(_best(lambda: moe.backend(x, mine, routing.weights, moe.w13, moe.w2), repeats))
            slowest_s += max(per_group)
        out[name] = {"layer_s": layer_s, "slowest_group_s": slowest_s}
    out["parallel_speedup"] = out["start"]["slowest_group_s"] / out["reached"]["slowest_group_s"]
    out["serial_ratio"] = out["reached"]["layer_s"] / out["start"]["layer_s"]
    out["num_tokens"] = int(xs[0].shape[0])
    return out


def _best(fn, repeats: int) -> float:
    fn()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def study(name: str, path: Path, spares: int, groups: int, work, args) -> dict:
    from moeserve import ModelConfig

    E = ModelConfig.from_pretrained(path).num_experts
    off = engine_run(path, work, spares, groups, "off", args)
    on = engine_run(path, work, spares, groups, "auto", args)
    before, after = on["balancedness_start_placement"], on["balancedness_reached"]
    times = moe_layer_times(off["model"], on["model"], [p for p, _ in work[: args.timing_prompts]], args.repeats)
    return {
        "model": name, "num_experts": E, "slot_groups": groups, "num_redundant_experts": spares,
        "extra_slot_fraction": spares / E,
        "balancedness_before": float(np.mean(before)), "balancedness_after": float(np.mean(after)),
        "balancedness_before_worst_layer": float(np.min(before)),
        "balancedness_after_worst_layer": float(np.min(after)),
        "max_stall_ms": on["max_stall_ms"], "mean_stall_ms": on["mean_stall_ms"],
        "replications": on["replications"], "retirements": on["retirements"],
        "output_tok_s": {"off": off["output_tok_s"], "on": on["output_tok_s"],
                         "ratio_on_off": on["output_tok_s"] / off["output_tok_s"]},
        "moe_layer_time": times, "replicas_per_expert": on["replicas"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--window", type=int, default=64, help="--replication-window")
    p.add_argument("--interval", type=int, default=8, help="--replication-interval")
    p.add_argument("--zipf-s", type=float, default=1.2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--timing-prompts", type=int, default=48, help="prompts whose hidden states time the MoE layers")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", type=Path, help="JSON (default: bench/results/replication-cpu.json)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        from moeserve import Tokenizer

        config = SMOKE if args.smoke else ZIPF64
        if args.smoke:
            args.num_requests, args.repeats, args.window, args.interval, args.timing_prompts = 8, 1, 16, 2, 4
        zipf_path = tmp / "zipf"
        fit = make_zipf_checkpoint(zipf_path, config, args.zipf_s, seed=0, iterations=20 if args.smoke else 150)
        E = config["num_local_experts"]
        from moeserve import ModelConfig

        zipf = study("zipf64" if not args.smoke else "zipf16 (smoke)", zipf_path, E // 8, 4,
                     workload(ModelConfig.from_pretrained(zipf_path).vocab_size, args.num_requests, 0, None), args)
        embedded_path = zipf_path if args.smoke else DEFAULT_MODEL
        heldout = None
        if not args.smoke:
            heldout = Tokenizer(embedded_path).encode((embedded_path / "heldout.txt").read_text(),
                                                      add_special_tokens=False)
        embedded = study("embedded" if not args.smoke else "zipf16 (smoke)", embedded_path,
                         4 if not args.smoke else 2, 4,
                         workload(ModelConfig.from_pretrained(embedded_path).vocab_size, args.num_requests, 1, heldout),
                         args)
    result = {
        "benchmark": "replication",
        "machine": machine(),
        "command": "python bench/replication.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "balancedness_before": zipf["balancedness_before"],
        "balancedness_after": zipf["balancedness_after"],
        "extra_slot_fraction": zipf["extra_slot_fraction"],
        "max_stall_ms": zipf["max_stall_ms"],
        "targets": {"balancedness_after": 0.9, "extra_slot_fraction": 0.125, "max_stall_ms_gpu_per_layer": 10},
        "zipf_fit": fit,
        "settings": {"replication_window": args.window, "replication_interval": args.interval,
                     "replication_threshold": 0.9, "num_requests": args.num_requests,
                     "max_num_seqs": args.max_num_seqs},
        "zipf64": zipf,
        "embedded": embedded,
    }
    out = args.out or Path(__file__).parent / "results" / "replication-cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for name in ("zipf64", "embedded"):
        r = result[name]
        t = r["moe_layer_time"]
        speed = f", slowest-group speedup {t['parallel_speedup']:.2f}" if "parallel_speedup" in t else ""
        print(f"{name}: balancedness {r['balancedness_before']:.3f} -> {r['balancedness_after']:.3f} "
              f"(worst layer {r['balancedness_before_worst_layer']:.3f} -> {r['balancedness_after_worst_layer']:.3f}) "
              f"with {r['extra_slot_fraction']:.3f} extra slots, max stall {r['max_stall_ms']:.2f} ms{speed}")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
