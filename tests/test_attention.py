"""Paged attention against a plain per-sequence computation with an explicit mask."""

from __future__ import annotations

import math
import random

import pytest
import torch

from moeserve.model import attention
from moeserve.model.attention import AttentionMetadata, Workspace, paged_attention


def _reference(q, k, v, window):
    """One sequence, all keys present: q [Q, H, Dh] (the last Q positions), k/v [N, Hkv, Dh]."""
    Q, H, Dh = q.shape
    N, Hkv = k.shape[0], k.shape[1]
    k = k.repeat_interleave(H // Hkv, dim=1)
    v = v.repeat_interleave(H // Hkv, dim=1)
    out = torch.empty_like(q)
    for i in range(Q):
        pos = N - Q + i
        for h in range(H):
            keys = [j for j in range(N) if j <= pos and (window is None or j > pos - window)]
            scores = torch.stack([q[i, h] @ k[j, h] for j in keys]) / math.sqrt(Dh)
            out[i, h] = torch.softmax(scores, 0) @ v[keys, h]
    return out


@pytest.mark.parametrize("per_sequence", [False, True])
@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("window", [None, 5])
def test_mixed_prefill_and_decode_batch(window, split, per_sequence, monkeypatch):
    """Also with the decodes cut into length buckets (any saving splits here), twice over one
    workspace, as the layers of a step share it, and with the prefills attended in one padded
    batch or sequence by sequence (SDPA: a whole causal sequence, a chunk after its cached prefix,
    each within a window)."""
    monkeypatch.setattr(attention, "SPLIT_MIN_SAVING", 1)
    monkeypatch.setattr(attention, "PER_SEQUENCE_MIN_QUERY", 2 if per_sequence else 10**6)
    torch.manual_seed(0)
    H, Hkv, Dh, B = 4, 2, 8, 4
    rng = random.Random(0)
    # (cached tokens before this step, new tokens): a fresh prefill, a chunked prefill, decodes.
    seqs = [(0, 9), (6, 7), (13, 1), (3, 1), (0, 1)]
    free = list(range(64))
    rng.shuffle(free)
    key_cache = torch.zeros(64, B, Hkv, Dh)
    value_cache = torch.zeros(64, B, Hkv, Dh)
    tables, full_k, full_v, qs = [], [], [], []
    for cached, new in seqs:
        n = cached + new
        blocks = [free.pop() for _ in range(-(-n // B))]
        tables.append(blocks)
        k, v = torch.randn(n, Hkv, Dh), torch.randn(n, Hkv, Dh)
        full_k.append(k)
        full_v.append(v)
        qs.append(torch.randn(new, H, Dh))
        for p in range(cached):  # the prefix a previous step wrote
            key_cache[blocks[p // B], p % B] = k[p]
            value_cache[blocks[p // B], p % B] = v[p]
    meta = AttentionMetadata.build([n for _, n in seqs], [c + n for c, n in seqs], tables, B,
                                   workspace=Workspace(), split_decodes=split)
    decode_groups = [g.seq_lens.tolist() for g in meta.groups if g.max_query_len == 1]
    assert decode_groups == ([[4, 1], [14]] if split else [[14, 4, 1]]), decode_groups  # 4 and 1: one block each
    new_k = torch.cat([k[c:] for k, (c, _) in zip(full_k, seqs)])
    new_v = torch.cat([v[c:] for v, (c, _) in zip(full_v, seqs)])
    key_cache.view(-1, Hkv, Dh).index_copy_(0, meta.slot_mapping, new_k)
    value_cache.view(-1, Hkv, Dh).index_copy_(0, meta.slot_mapping, new_v)

    prefills = next(g for g in meta.groups if g.max_query_len > 1)
    assert attention.attends_per_sequence(torch.cat(qs), key_cache, value_cache, prefills, None) == per_sequence
    calls = []
    attend = attention.attend_per_sequence
    monkeypatch.setattr(attention, "attend_per_sequence", lambda q, *a: calls.append(q.shape[0]) or attend(q, *a))
    out = paged_attention(torch.cat(qs), key_cache, value_cache, meta, Dh**-0.5, window)
    assert calls == ([16] if per_sequence else [])  # the two prefills' 9 + 7 tokens, once
    again = paged_attention(torch.cat(qs), key_cache, value_cache, meta, Dh**-0.5, window)
    assert torch.equal(out, again)
    expected = torch.cat([_reference(q, k, v, window) for q, k, v in zip(qs, full_k, full_v)])
    assert (out - expected).abs().max().item() < 1e-5
    assert meta.positions.tolist()[9:16] == list(range(6, 13))


def test_metadata_rejects_inconsistent_sequences():
    with pytest.raises(ValueError, match="bad sequence"):
        AttentionMetadata.build([5], [4], [[0]], 16)  # more new tokens than the sequence holds
    with pytest.raises(ValueError, match="bad sequence"):
        AttentionMetadata.build([1], [40], [[0, 1]], 16)  # blocks do not cover the sequence
