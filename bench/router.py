"""The outer router's proof: cost and verifier pass rate of four policies on one workload mixing
easy and hard requests, served by `moeserve serve --router-config` on the embedded model.

Profiles (two of the same weights): "cheap" = K = 1 with answers capped at 16 tokens, priced
1 per token; "full" = K = 2, answers up to 96 tokens, priced 3 per token (the prices are the
config's: a "mini" and a "full" tier). The verifier requires finish reason != "length".

Workload (seeded, from the embedded model's held-out Python, models/moeserve-tiny-moe/
heldout.txt):
    easy  finish a line from its first half (a short prompt), stop at "\\n", max_tokens 32 (the
          client's: a line); the cheap profile (capped at 16) usually passes
    hard  write the block after a `def`/`if`/`for`/... line: the ~40 tokens before it and that
          line (a long prompt), stop at "\\n\\n", max_tokens 96; 16 tokens rarely finish it, so
          cheap fails
Policies:
    always-cheap  one rule: everything to cheap, no escalation
    always-full   one rule: everything to full
    rules-only    short prompts (< 24 tokens) to cheap, long ones to full; escalation on
    bandit        no rules: LinUCB over both profiles (epsilon 0.1, cost_weight 0.002), escalation on
Cost = sum over every attempt of (prompt + completion tokens) x the profile's price, read from
the audit log; pass = the final answer passed the verifier. Target: at always-full's pass rate,
>= 40% lower cost.

The hard requests cost far more than the easy ones under any policy (long prompts, long
answers, and they need the full profile), so the saving depends on the mix: run it at
`--hard-share 0.1` (the default) and `0.3`.

JSON: policies{name: {cost, cost_per_request, pass_rate, escalations, requests_by_profile,
seconds}}, cost_saving_vs_full per policy. --smoke: 8 requests.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from serve_overhead import server_process  # noqa: E402
from throughput import machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "moeserve-tiny-moe"
PROFILES = [{"name": "cheap", "top_k": 1, "max_tokens": 16, "cost_per_token": 1.0},
            {"name": "full", "max_tokens": 96, "cost_per_token": 3.0}]
BLOCK_STARTS = ("def ", "if ", "for ", "while ", "with ", "class ", "try:", "elif ", "else:")


def workload(n: int, hard_share: float, seed: int) -> list[dict]:
    """[{kind, prompt, stop}] from the held-out text."""
    from moeserve import Tokenizer

    tok = Tokenizer(MODEL)
    lines = (MODEL / "heldout.txt").read_text().splitlines()
    rng = random.Random(seed)
    easy = [i for i in range(2, len(lines)) if len(lines[i].strip()) >= 24 and not lines[i].strip().startswith("#")]
    hard = [i for i in range(8, len(lines) - 1) if lines[i].strip().startswith(BLOCK_STARTS)
            and lines[i].rstrip().endswith(":") and lines[i + 1].strip()]
    out = []
    for _ in range(n):
        if rng.random() < hard_share:
            i = rng.choice(hard)
            context = "\n".join(lines[max(0, i - 12) : i + 1]) + "\n"
            ids = tok.encode(context)[-48:]
            out.append({"kind": "hard", "prompt": tok.decode(ids), "stop": ["\n\n"], "max_tokens": 96})
        else:
            i = rng.choice(easy)
            line = lines[i]
            out.append({"kind": "easy", "prompt": line[: len(line) // 2], "stop": ["\n"], "max_tokens": 32})
    return out


POLICIES = {
    "always-cheap": {"rules": [{"name": "all-cheap", "when": {}, "profile": "cheap"}],
                     "escalation": {"max_escalations": 0}},
    "always-full": {"rules": [{"name": "all-full", "when": {}, "profile": "full"}]},
    "rules-only": {"rules": [{"name": "long-to-full", "priority": 1, "when": {"min_prompt_tokens": 24},
                              "profile": "full"},
                             {"name": "short-to-cheap", "when": {}, "profile": "cheap"}]},
    "bandit": {"bandit": {"alpha": 0.3, "epsilon": 0.1, "seed": 0, "cost_weight": 0.002}},
}


def run_policy(name: str, work: list[dict], tmp: Path) -> dict:
    audit = tmp / f"{name}.jsonl"
    config = {"version": name, "profiles": PROFILES, "verifier": {"finish_not_length": True},
              "escalation": {"max_escalations": 1, "max_total_tokens": 4096}, "audit": {"path": str(audit)},
              **POLICIES[name]}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    start = time.perf_counter()
    with server_process(str(MODEL), ["--router-config", str(path)]) as (url, _):
        with httpx.Client(timeout=120) as client:
            for w in work:
                r = client.post(f"{url}/v1/completions", json={"model": "moeserve-router", "prompt": w["prompt"],
                                                                "temperature": 0, "stop": w["stop"],
                                                                "max_tokens": w["max_tokens"]})
                r.raise_for_status()
    seconds = time.perf_counter() - start
    records = [json.loads(x) for x in audit.read_text().splitlines()]
    price = {p["name"]: p["cost_per_token"] for p in PROFILES}
    cost = [sum((a["prompt_tokens"] + a["completion_tokens"]) * price[a["profile"]] for a in r["attempts"])
            for r in records]
    by_kind: dict[str, list[bool]] = {}
    for w, r in zip(work, records):
        by_kind.setdefault(w["kind"], []).append(bool(r["passed"]))
    return {
        "cost": sum(cost),
        "cost_per_request": sum(cost) / len(records),
        "pass_rate": sum(bool(r["passed"]) for r in records) / len(records),
        "pass_rate_by_kind": {k: sum(v) / len(v) for k, v in by_kind.items()},
        "escalations": sum(1 for r in records for e in r["escalations"] if e["to"] is not None),
        "first_choice": {p: sum(1 for r in records if r["choice"] == p) for p in price},
        "served_by": {p: sum(1 for r in records if r["profile"] == p) for p in price},
        "seconds": seconds,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=240)
    p.add_argument("--hard-share", type=float, default=0.1, help="fraction of hard requests")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", type=Path, help="JSON (default: bench/results/router-cpu.json)")
    args = p.parse_args(argv)
    if args.smoke:
        args.requests = 8
    work = workload(args.requests, args.hard_share, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        policies = {name: run_policy(name, work, Path(tmp)) for name in POLICIES}
    full = policies["always-full"]
    for r in policies.values():
        r["cost_saving_vs_full"] = 1 - r["cost"] / full["cost"] if full["cost"] else None
        r["pass_rate_vs_full"] = r["pass_rate"] - full["pass_rate"]
    result = {
        "benchmark": "router",
        "machine": machine(),
        "command": "python bench/router.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "profiles": PROFILES,
        "workload": {"requests": len(work), "hard": sum(w["kind"] == "hard" for w in work), "seed": args.seed},
        "policies": policies,
        "target": "at always-full's pass rate, >= 40% lower cost",
    }
    out = args.out or Path(__file__).parent / "results" / f"router-cpu-hard{round(100 * args.hard_share)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for name, r in policies.items():
        print(f"{name:13s} cost {r['cost']:9.0f} ({r['cost_per_request']:6.1f}/request, "
              f"{100 * r['cost_saving_vs_full']:5.1f}% below always-full), pass rate {100 * r['pass_rate']:5.1f}% "
              f"(easy {100 * r['pass_rate_by_kind'].get('easy', 0):.0f}%, hard "
              f"{100 * r['pass_rate_by_kind'].get('hard', 0):.0f}%), escalations {r['escalations']}, "
              f"served by {r['served_by']}, {r['seconds']:.0f} s")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
