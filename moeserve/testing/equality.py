"""The equality rule of shared/DESIGN.md for two paths that must agree.

fp32, token for token. At the first divergence the sequences still agree if each side's token is
in the other side's top-5 and, on both sides, the two tokens' logprobs differ by less than 1e-3
(a numerical tie, as in vLLM's check_logprobs_close); comparison of that sequence stops there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TOP_N = 5
MAX_TIE_GAP = 1e-3


@dataclass(frozen=True)
class GreedyTrace:
    """A greedy continuation and, per step, the top-N tokens with their logprobs."""

    tokens: tuple[int, ...]
    top_logprobs: tuple[dict[int, float], ...]

    @classmethod
    def from_logits(cls, logits: list[torch.Tensor], top_n: int = TOP_N) -> GreedyTrace:
        """logits: one [V] tensor per generated token; the token is its argmax."""
        tokens, tops = [], []
        for row in logits:
            logprobs = torch.log_softmax(row.float(), dim=-1)
            values, ids = torch.topk(logprobs, top_n)
            tokens.append(int(torch.argmax(row)))
            tops.append(dict(zip(ids.tolist(), values.tolist())))
        return cls(tuple(tokens), tuple(tops))


def greedy_divergence(a: GreedyTrace, b: GreedyTrace, max_gap: float = MAX_TIE_GAP) -> str | None:
    """None when a and b agree under the rule, else a sentence saying where and how they differ."""
    if len(a.tokens) != len(b.tokens):
        return f"lengths differ: {len(a.tokens)} vs {len(b.tokens)}"
    for step, (ta, tb) in enumerate(zip(a.tokens, b.tokens)):
        if ta == tb:
            continue
        la, lb = a.top_logprobs[step], b.top_logprobs[step]
        tie = (
            ta in lb
            and tb in la
            and abs(la[ta] - la[tb]) < max_gap
            and abs(lb[ta] - lb[tb]) < max_gap
        )
        if tie:
            return None
        return f"step {step}: token {ta} vs {tb}; top logprobs {la} vs {lb}"
    return None
