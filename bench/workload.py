"""Workloads: what to send. Random prompts of given length distributions (token ids drawn from
the target's tokenizer), prompts from a JSONL file, or a timestamped trace to replay."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RequestSpec:
    """One request to send. `prompt` is text or token ids; `at` is a trace's send time (s)."""

    prompt: str | list[int]
    output_len: int
    input_len: int | None = None
    at: float | None = None


def _uniform(rng: random.Random, mean: int, spread: float) -> int:
    low, high = max(1, round(mean * (1 - spread))), max(1, round(mean * (1 + spread)))
    return rng.randint(low, high)


def random_workload(num: int, input_len: int, output_len: int, spread: float, seed: int, tokenizer,
                    as_text: bool) -> list[RequestSpec]:
    """Prompts of uniform random length in input_len * [1 - spread, 1 + spread] tokens (likewise
    outputs), ids drawn from the tokenizer's vocabulary above its special tokens. Chat targets
    get the ids decoded to text (the length is then approximate, as in vLLM's random dataset)."""
    rng = random.Random(seed)
    vocab = tokenizer.vocab_size
    low = min(10, vocab - 1)
    specs = []
    for _ in range(num):
        n = _uniform(rng, input_len, spread)
        ids = [rng.randrange(low, vocab) for _ in range(n)]
        prompt: str | list[int] = tokenizer.decode(ids) if as_text else ids
        specs.append(RequestSpec(prompt, _uniform(rng, output_len, spread), n))
    return specs


def jsonl_workload(path: Path, num: int | None, default_output_len: int, seed: int) -> list[RequestSpec]:
    """Lines {"prompt": str, "output_len"|"max_tokens": int}; shuffled with the seed, cut to num."""
    specs = []
    for i, line in enumerate(Path(path).read_text().splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            specs.append(RequestSpec(row["prompt"], int(row.get("output_len", row.get("max_tokens",
                                                                                        default_output_len)))))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}:{i + 1}: expected {{\"prompt\": ..., \"output_len\": ...}} ({e})") from e
    random.Random(seed).shuffle(specs)
    return specs[:num] if num else specs


def trace_workload(path: Path, tokenizer, seed: int, as_text: bool) -> list[RequestSpec]:
    """Lines {"timestamp": s, "input_len": n | "prompt": str, "output_len": n}; replayed at their
    timestamps relative to the first one."""
    rng = random.Random(seed)
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path}: empty trace")
    t0 = min(float(r["timestamp"]) for r in rows)
    specs = []
    for r in sorted(rows, key=lambda r: float(r["timestamp"])):
        prompt = r.get("prompt")
        if prompt is None:
            ids = [rng.randrange(10, tokenizer.vocab_size) for _ in range(int(r["input_len"]))]
            prompt = tokenizer.decode(ids) if as_text else ids
        specs.append(RequestSpec(prompt, int(r["output_len"]), r.get("input_len"), float(r["timestamp"]) - t0))
    return specs
