"""Triton paged attention (decode with splits, variable-length prefill) against the torch path.

CPU: Triton's interpreter (tests/conftest.py). fp32 must agree to fp32 rounding; half precision
is held to the torch path's own accuracy against an fp64 evaluation (see test_kernels_moe.py).
"""

from __future__ import annotations

import random

import pytest
import torch

from moeserve.model.attention import AttentionMetadata, get_attention_backend, paged_attention

pytest.importorskip("triton")

from moeserve.kernels.paged_attention import paged_attention_triton, paged_decode  # noqa: E402


def _batch(seqs, H, Hkv, Dh, B, dtype, device, seed=0):
    """seqs: (cached tokens, new tokens) per sequence -> q [T, H, Dh], caches, metadata, with
    shuffled block tables and this step's keys/values already written (as Attention does)."""
    g = torch.Generator().manual_seed(seed)
    free = list(range(sum(-(-(c + n) // B) for c, n in seqs) + 3))
    random.Random(seed).shuffle(free)
    num_blocks = len(free)
    key = torch.randn(num_blocks, B, Hkv, Dh, generator=g)
    value = torch.randn(num_blocks, B, Hkv, Dh, generator=g)
    tables = [[free.pop() for _ in range(-(-(c + n) // B))] for c, n in seqs]
    meta = AttentionMetadata.build([n for _, n in seqs], [c + n for c, n in seqs], tables, B, device)
    q = torch.randn(sum(n for _, n in seqs), H, Dh, generator=g)
    return q.to(device, dtype), key.to(device, dtype), value.to(device, dtype), meta


def _check(got, expected, q, key, value, meta, scale, window):
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert torch.isfinite(got).all()
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        return
    exact = paged_attention(q.double().cpu(), key.double().cpu(), value.double().cpu(),
                            _to_cpu(meta), scale, window)
    err_got = (got.cpu().double() - exact).abs().max().item()
    err_ref = (expected.cpu().double() - exact).abs().max().item()
    resolution = torch.finfo(got.dtype).eps * exact.abs().max().item()
    assert err_got <= 2 * err_ref + resolution, (err_got, err_ref, resolution)


def _to_cpu(meta: AttentionMetadata) -> AttentionMetadata:
    from dataclasses import fields, replace

    def move(obj):
        return replace(obj, **{f.name: getattr(obj, f.name).cpu() for f in fields(obj)
                               if isinstance(getattr(obj, f.name), torch.Tensor)})

    return replace(move(meta), groups=tuple(move(g) for g in meta.groups))


MIXED = [(0, 9), (6, 7), (13, 1), (3, 1), (0, 1), (20, 18)]  # fresh and chunked prefills, decodes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("H,Hkv,B", [(4, 2, 4), (2, 2, 16)])
def test_mixed_batch_matches_torch_path(H, Hkv, B, window, dtype, device):
    Dh = 16
    q, key, value, meta = _batch(MIXED, H, Hkv, Dh, B, dtype, device)
    expected = paged_attention(q, key, value, meta, Dh**-0.5, window)
    got = paged_attention_triton(q, key, value, meta, Dh**-0.5, window)
    _check(got, expected, q, key, value, meta, Dh**-0.5, window)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 40])
@pytest.mark.parametrize("splits", [1, 4])
def test_decode_with_long_contexts_and_splits(splits, window, dtype, device):
    """Contexts over several tiles; with 4 splits some splits see no visible key (window)."""
    H, Hkv, Dh, B = 8, 2, 32, 8
    seqs = [(99, 1), (64, 1), (5, 1), (130, 1)]
    q, key, value, meta = _batch(seqs, H, Hkv, Dh, B, dtype, device, seed=splits)
    (g,) = meta.groups
    expected = paged_attention(q, key, value, meta, Dh**-0.5, window)
    got = paged_decode(q, key, value, g.block_tables, g.seq_lens, g.max_seq_len, Dh**-0.5, window,
                       num_splits=splits)
    _check(got, expected, q, key, value, meta, Dh**-0.5, window)


def test_prefill_longer_than_one_query_block_with_prefix(device):
    """Queries over several BLOCK_M blocks after a cached prefix; head dim not a power of two."""
    H, Hkv, Dh, B = 2, 1, 24, 16
    q, key, value, meta = _batch([(37, 45), (0, 3)], H, Hkv, Dh, B, torch.float32, device, seed=3)
    expected = paged_attention(q, key, value, meta, Dh**-0.5, None)
    got = paged_attention_triton(q, key, value, meta, Dh**-0.5, None)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("H,Hkv", [(6, 2), (8, 1)])
def test_prefill_packs_a_kv_heads_query_heads_into_one_program(H, Hkv, device):
    """G = 3 (padded to 4: a masked row per query) and G = 8 (2 query positions per 16-row
    program in the interpreter), with a prefix, a chunk spanning several programs and a decode."""
    Dh, B = 16, 4
    q, key, value, meta = _batch([(7, 11), (0, 5), (12, 1)], H, Hkv, Dh, B, torch.float32, device, seed=H)
    expected = paged_attention(q, key, value, meta, Dh**-0.5, None)
    got = paged_attention_triton(q, key, value, meta, Dh**-0.5, None)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_dim_below_the_dot_minimum(dtype, device):
    """Dh = 8 is padded to a 16-wide tile (tl.dot's smallest); decodes and a prefill together."""
    H, Hkv, Dh, B = 4, 2, 8, 4
    q, key, value, meta = _batch([(5, 6), (9, 1), (0, 1)], H, Hkv, Dh, B, dtype, device, seed=5)
    expected = paged_attention(q, key, value, meta, Dh**-0.5, None)
    got = paged_attention_triton(q, key, value, meta, Dh**-0.5, None)
    _check(got, expected, q, key, value, meta, Dh**-0.5, None)


def test_unknown_attention_backend_is_refused():
    assert get_attention_backend("triton") is paged_attention_triton
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        get_attention_backend("flash")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("H,R,Dr", [(8, 20, 8), (20, 260, 40)])
def test_mla_absorbed_decode_reads_the_latent_cache_in_place(H, R, Dr, splits, dtype, device):
    """MLA's absorbed decode: one KV head of R + Dr key values whose value is the view of its
    first R (Dv != Dk, value strides = key strides), all H query heads on it (G = H). The wide
    case takes the launcher's other shape: 16 heads per program, two programs per KV head."""
    B = 4
    seqs = [(37, 1), (5, 1), (70, 1)]
    q, key, _, meta = _batch(seqs, H, 1, R + Dr, B, dtype, device, seed=11)
    value = key[..., :R]
    (g,) = meta.groups
    scale = 0.3
    expected = paged_attention(q, key, value, meta, scale, None)
    assert expected.shape == (3, H, R)
    got = paged_decode(q, key, value, g.block_tables, g.seq_lens, g.max_seq_len, scale, None, num_splits=splits)
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    else:
        exact = paged_attention(q.double().cpu(), key.double().cpu(), key.double().cpu()[..., :R], _to_cpu(meta),
                                scale, None)
        err_got, err_ref = ((t.cpu().double() - exact).abs().max().item() for t in (got, expected))
        assert err_got <= 2 * err_ref + torch.finfo(dtype).eps * exact.abs().max().item()


@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("window", [None, 6])
def test_sinks_join_every_softmax(window, splits, device):
    """GPT-OSS attention sinks in the decode (with splits) and prefill kernels, fp32; sinks
    large enough to take most of the probability, so a kernel ignoring them fails."""
    H, Hkv, Dh, B = 4, 2, 16, 4
    q, key, value, meta = _batch(MIXED + [(70, 1)], H, Hkv, Dh, B, torch.float32, device, seed=4)
    sinks = torch.tensor([3.0, -1.0, 0.5, 6.0], device=device)
    expected = paged_attention(q, key, value, meta, Dh**-0.5, window, sinks)
    assert (expected - paged_attention(q, key, value, meta, Dh**-0.5, window)).abs().max() > 0.1
    got = paged_attention_triton(q, key, value, meta, Dh**-0.5, window, sinks)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    decodes = next(g for g in meta.groups if g.max_query_len == 1)
    got = paged_decode(q[decodes.tokens], key, value, decodes.block_tables, decodes.seq_lens, decodes.max_seq_len,
                       Dh**-0.5, window, num_splits=splits, sinks=sinks)
    torch.testing.assert_close(got, expected[decodes.tokens], rtol=1e-5, atol=1e-5)
