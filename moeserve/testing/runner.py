"""A minimal driver of MoEForCausalLM over the paged KV cache, for tests and tools.

It hands out KV blocks in a shuffled order (so block tables are never the identity and paging
bugs show) and never frees them; the engine's block manager and scheduler replace it at serving
time. Several sequences can step together, mixing prefill and decode in one flat batch.
"""

from __future__ import annotations

import math
import random

import torch

from moeserve.model.attention import AttentionMetadata, PagedKVCache
from moeserve.model.decoder import MoEForCausalLM
from moeserve.testing.equality import GreedyTrace


@torch.inference_mode()
def perplexity(model: MoEForCausalLM, token_ids: list[int], seq: int = 256) -> float:
    """exp(mean next-token cross-entropy) over `token_ids`, in independent windows of `seq`
    tokens (the same windows transformers-side evaluation uses)."""
    total, count = 0.0, 0
    for start in range(0, len(token_ids) - 1, seq):
        window = token_ids[start : start + seq + 1]
        if len(window) < 2:
            break
        logits = ReferenceRunner(model, num_blocks=-(-seq // 16) + 1).step({0: window[:-1]})[0].float()
        target = torch.tensor(window[1:], device=logits.device)
        total += torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
        count += len(window) - 1
    return math.exp(total / count)


class ReferenceRunner:
    def __init__(self, model: MoEForCausalLM, num_blocks: int = 256, block_size: int = 16, seed: int = 0):
        self.model = model
        dtype = next(model.parameters()).dtype
        device = next(model.parameters()).device
        self.cache = PagedKVCache.for_model(model.config, num_blocks, block_size, dtype, device)
        self.block_size = block_size
        self.free_blocks = list(range(num_blocks))
        random.Random(seed).shuffle(self.free_blocks)
        self.blocks: dict[int, list[int]] = {}
        self.lengths: dict[int, int] = {}

    def step(self, new_tokens: dict[int, list[int]]) -> dict[int, torch.Tensor]:
        """Append tokens to sequences (new ids start new sequences); returns, per sequence, the
        logits [n_new, V] of its new tokens."""
        seq_ids = list(new_tokens)
        for sid in seq_ids:
            self.blocks.setdefault(sid, [])
            self.lengths.setdefault(sid, 0)
            n = self.lengths[sid] + len(new_tokens[sid])
            while len(self.blocks[sid]) * self.block_size < n:
                if not self.free_blocks:
                    raise RuntimeError("ReferenceRunner ran out of KV blocks")
                self.blocks[sid].append(self.free_blocks.pop())
            self.lengths[sid] = n
        device = self.cache.key[0].device
        meta = AttentionMetadata.build(
            query_lens=[len(new_tokens[s]) for s in seq_ids],
            seq_lens=[self.lengths[s] for s in seq_ids],
            block_tables=[self.blocks[s] for s in seq_ids],
            block_size=self.block_size,
            device=device,
        )
        ids = torch.tensor([t for s in seq_ids for t in new_tokens[s]], dtype=torch.int64, device=device)
        logits = self.model.compute_logits(self.model(ids, meta, self.cache))  # [T, V]
        bounds = meta.query_start_loc.tolist()
        return {s: logits[bounds[i] : bounds[i + 1]] for i, s in enumerate(seq_ids)}

    def greedy(self, prompts: list[list[int]], max_new_tokens: int) -> list[GreedyTrace]:
        """Prefill all prompts in one step (as new sequences), then decode them together, one
        greedy token per sequence per step."""
        first = max(self.lengths, default=-1) + 1
        pending = {first + i: p for i, p in enumerate(prompts)}
        rows: dict[int, list[torch.Tensor]] = {s: [] for s in pending}
        for _ in range(max_new_tokens):
            out = self.step(pending)
            for s, logits in out.items():
                rows[s].append(logits[-1])
            pending = {s: [int(torch.argmax(logits[-1]))] for s, logits in out.items()}
        return [GreedyTrace.from_logits(rows[s]) for s in rows]
