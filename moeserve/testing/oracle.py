"""transformers as the correctness oracle: fp32 (or the dtype asked), eager attention, eager
experts, one prompt at a time, no padding. Dev/test dependency only."""

from __future__ import annotations

from pathlib import Path

import torch

from moeserve.testing.equality import GreedyTrace


def load_hf_model(path: str | Path, dtype: torch.dtype = torch.float32, **config_overrides):
    """config_overrides change the checkpoint's config at load (e.g. num_experts_per_tok=1)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation="eager", experts_implementation="eager", **config_overrides
    )
    return model.eval()


@torch.inference_mode()
def hf_logits(model, token_ids: list[int]) -> torch.Tensor:
    """Prefill logits [n, V] of one prompt."""
    return model(torch.tensor([token_ids])).logits[0]


@torch.inference_mode()
def hf_decode_logits(model, prompt: list[int], continuation: list[int]) -> list[torch.Tensor]:
    """Feed `continuation` one token at a time through the KV cache after prefilling `prompt`;
    returns the logits [V] after each fed token."""
    out = model(torch.tensor([prompt]), use_cache=True)
    past, rows = out.past_key_values, []
    for token in continuation:
        out = model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
        past = out.past_key_values
        rows.append(out.logits[0, -1])
    return rows


@torch.inference_mode()
def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> GreedyTrace:
    out = model(torch.tensor([prompt]), use_cache=True)
    past, row = out.past_key_values, out.logits[0, -1]
    rows = [row]
    for _ in range(max_new_tokens - 1):
        out = model(torch.tensor([[int(torch.argmax(row))]]), past_key_values=past, use_cache=True)
        past, row = out.past_key_values, out.logits[0, -1]
        rows.append(row)
    return GreedyTrace.from_logits(rows)
