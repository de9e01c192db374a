"""The committed default model (models/moeserve-tiny-moe), as moeserve and transformers load it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moeserve import LLM, SamplingParams, Tokenizer, load_model
from moeserve.testing.equality import GreedyTrace, greedy_divergence
from moeserve.testing.oracle import hf_greedy, load_hf_model
from moeserve.testing.runner import perplexity

MODEL = Path(__file__).resolve().parents[1] / "models" / "moeserve-tiny-moe"
pytestmark = pytest.mark.skipif(not (MODEL / "config.json").is_file(), reason="default model not trained yet")


@pytest.fixture(scope="module")
def stats():
    return json.loads((MODEL / "training.json").read_text())


def _heldout_ids(n: int) -> list[int]:
    return Tokenizer(MODEL).encode((MODEL / "heldout.txt").read_text(), add_special_tokens=False)[:n]


def test_greedy_completion_equals_transformers(stats):
    """moeserve's greedy tokens on the model card's prompt are transformers' greedy tokens
    (equality rule, fp32), and the text reads like Python."""
    prompt = stats["sample"]["prompt"]
    out = LLM(str(MODEL), dtype="float32").generate(
        prompt, SamplingParams(temperature=0, max_tokens=64, ignore_eos=True, logprobs=5))[0]
    ours = out.outputs[0]
    hf = hf_greedy(load_hf_model(MODEL), list(out.prompt_token_ids), 64)
    assert greedy_divergence(GreedyTrace(ours.token_ids, ours.logprobs), hf) is None
    assert "return" in ours.text or "if " in ours.text or "=" in ours.text


def test_heldout_perplexity_matches_transformers_and_beats_uniform(stats):
    ids = _heldout_ids(1024)
    ours = perplexity(load_model(MODEL, dtype="float32"), ids)
    hf = load_hf_model(MODEL)
    total = count = 0
    with torch.inference_mode():
        for start in range(0, len(ids) - 1, 256):
            window = torch.tensor(ids[start : start + 257])
            logits = hf(window[None, :-1]).logits[0].float()
            total += torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum").item()
            count += window.numel() - 1
    theirs = float(torch.tensor(total / count).exp())
    # Two fp32 implementations of the same model: they agree to ~3e-8 relative here; a wrong
    # scale, mask or routing weight moves the perplexity by far more than 1e-5.
    assert abs(ours / theirs - 1) < 1e-5
    # The whole held-out set gives the model card's figure, far below the uniform baseline.
    full = perplexity(load_model(MODEL, dtype="float32"), _heldout_ids(stats["heldout_tokens"]))
    assert full == pytest.approx(stats["heldout_ppl_k2"], rel=0.01)
    assert full < stats["uniform_ppl"] / 100


def test_bf16_weights_load_as_committed():
    model = load_model(MODEL)  # dtype auto: the checkpoint's bf16
    assert next(model.parameters()).dtype == torch.bfloat16 and model.config.tie_word_embeddings
    assert sum(p.numel() for p in model.parameters()) < 10_000_000
