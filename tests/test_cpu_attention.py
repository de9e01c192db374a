"""The cpu attention backend (kernels/cpu_attention.cpp) against the torch path it replaces for
fp32 decodes: shapes with a compiled fast path and without, windows, shuffled block tables,
mixed steps, and the groups it must leave to the torch path."""

from __future__ import annotations

import random

import pytest
import torch

from moeserve import SamplingParams
from moeserve.checkpoint import resolve_backends
from moeserve.kernels import cpu_attention
from moeserve.model.attention import AttentionMetadata, Workspace, paged_attention

pytestmark = pytest.mark.skipif(not cpu_attention.usable(), reason="the cpu attention kernel cannot be built here")


def _batch(seqs, H, Hkv, D, B, dtype=torch.float32, seed=0):
    """seqs: (cached tokens, new tokens) per sequence -> q [T, H, D], caches holding every
    token's key and value, and the step's metadata, over shuffled block tables."""
    g = torch.Generator().manual_seed(seed)
    free = list(range(sum(-(-(c + n) // B) for c, n in seqs) + 5))
    random.Random(seed).shuffle(free)
    key = torch.randn(len(free), B, Hkv, D, generator=g).to(dtype)
    value = torch.randn(len(free), B, Hkv, D, generator=g).to(dtype)
    tables = [[free.pop() for _ in range(-(-(c + n) // B))] for c, n in seqs]
    meta = AttentionMetadata.build([n for _, n in seqs], [c + n for c, n in seqs], tables, B, workspace=Workspace(),
                                   split_decodes=True)
    q = torch.randn(sum(n for _, n in seqs), H, D, generator=g).to(dtype)
    return q, key, value, meta


# (H, Hkv, D): compiled fast paths (D 64/128, G 1/2/4/8) and the generic loop (D 16/24, G 3).
SHAPES = [(8, 2, 64), (8, 8, 64), (16, 2, 128), (4, 2, 128), (4, 2, 16), (6, 2, 24), (3, 3, 16)]
DECODES = [(0, 1), (15, 1), (16, 1), (40, 1), (300, 1), (127, 1), (64, 1)]  # lengths 1, block edges, long


@pytest.mark.parametrize("H,Hkv,D", SHAPES)
@pytest.mark.parametrize("window", [None, 5, 100])
@pytest.mark.parametrize("B", [16, 4])
def test_decode_kernel_matches_torch_path(H, Hkv, D, window, B):
    q, key, value, meta = _batch(DECODES, H, Hkv, D, B)
    assert all(cpu_attention.supports(q, key, value, g, None) for g in meta.groups)
    got = cpu_attention.paged_attention_cpu(q, key, value, meta, D**-0.5, window)
    expected = paged_attention(q, key, value, meta, D**-0.5, window)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_mixed_step_runs_decodes_in_the_kernel_and_the_rest_as_torch(monkeypatch):
    """Prefills (fresh and chunked) take the torch path, decodes the kernel; together they give
    the torch backend's output for every token."""
    q, key, value, meta = _batch([(0, 9), (6, 7), (13, 1), (3, 1), (200, 1), (20, 18)], 8, 2, 64, 4)
    calls = []
    kernel = cpu_attention.decode_attention
    monkeypatch.setattr(cpu_attention, "decode_attention", lambda q_g, *a: calls.append(q_g.shape[0]) or kernel(q_g, *a))
    got = cpu_attention.paged_attention_cpu(q, key, value, meta, 0.125, 7)
    expected = paged_attention(q, key, value, meta, 0.125, 7)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert calls and sum(calls) == 3  # the three decodes, and nothing else


def test_groups_the_kernel_does_not_take_are_left_to_the_torch_path():
    q, key, value, meta = _batch([(10, 1), (30, 1)], 4, 2, 16, 4)
    (group,) = meta.groups
    sinks = torch.zeros(4)
    assert cpu_attention.supports(q, key, value, group, None)
    assert not cpu_attention.supports(q, key, value, group, sinks)  # GPT-OSS's sinks
    assert not cpu_attention.supports(q.bfloat16(), key.bfloat16(), value.bfloat16(), group, None)
    assert not cpu_attention.supports(q, key, key[..., :8], group, None)  # MLA: the value is part of the key
    # bf16 must stay bit-identical to the torch path (and so to transformers' eager attention).
    qb, kb, vb = q.bfloat16(), key.bfloat16(), value.bfloat16()
    assert torch.equal(cpu_attention.paged_attention_cpu(qb, kb, vb, meta, 0.25, None),
                       paged_attention(qb, kb, vb, meta, 0.25, None))
    got = cpu_attention.paged_attention_cpu(q, key, value, meta, 0.25, None, sinks)
    assert torch.equal(got, paged_attention(q, key, value, meta, 0.25, None, sinks))


def test_bad_input_is_an_error_not_a_crash():
    q, key, value, meta = _batch([(10, 1)], 4, 2, 16, 4)
    (group,) = meta.groups
    with pytest.raises(RuntimeError, match="exceed its table"):
        cpu_attention.decode_attention(q, key, value, group.block_tables, group.seq_lens + 64, 0.25, None)
    broken = group.block_tables.clone()
    broken[0, 1] = key.shape[0]
    with pytest.raises(RuntimeError, match="block id out of range"):
        cpu_attention.decode_attention(q, key, value, broken, group.seq_lens, 0.25, None)
    with pytest.raises(RuntimeError, match="fp32 only"):
        cpu_attention.decode_attention(q.double(), key.double(), value.double(), group.block_tables, group.seq_lens,
                                       0.25, None)


@pytest.mark.parametrize("arch,backend,split", [("mixtral", "auto", False), ("mixtral", "torch", True),
                                                 ("gpt_oss", "cpu", True)])
def test_decodes_are_cut_into_length_buckets_only_where_the_torch_path_takes_them(checkpoints, arch, backend, split):
    """The kernel reads no padding, so a runner whose decodes it computes keeps them in one group;
    decodes it leaves to the torch path (GPT-OSS's sinks) are cut as on the torch backend."""
    from moeserve.checkpoint import load_model
    from moeserve.model.attention import PagedKVCache
    from moeserve.worker.model_runner import ModelRunner
    from moeserve.worker.sampler import Sampler

    model = load_model(checkpoints(arch), dtype="float32", attention_backend=backend)
    assert model.attention_backend == ("cpu" if backend == "auto" else backend)
    runner = ModelRunner(model, PagedKVCache.for_model(model.config, 4, 16, torch.float32), Sampler(0))
    assert runner.split_decodes == split


def test_auto_picks_the_kernel_for_fp32_on_the_cpu_only():
    assert resolve_backends("auto", "auto", "cpu", torch.float32) == ("torch", "cpu")
    assert resolve_backends("auto", "auto", "cpu", torch.bfloat16) == ("torch", "torch")
    assert resolve_backends("torch", "torch", "cpu", torch.float32) == ("torch", "torch")
    with pytest.raises(ValueError, match="cpu attention backend"):
        resolve_backends("torch", "cpu", "cuda", torch.float32)


@pytest.mark.parametrize("window", [None, 12])
def test_engine_on_the_kernels_fast_path_matches_transformers(tmp_path, prompts, window):
    """Head dim 64 (a compiled fast path, which the tiny checkpoints' head dims do not reach),
    with and without Mistral's sliding window: continuous batching with the kernel computing every
    decode gives transformers' greedy tokens under the equality rule."""
    from moeserve.config import engine_config
    from moeserve.engine.llm_engine import LLMEngine
    from moeserve.testing.checkpoints import make_tiny_checkpoint
    from moeserve.testing.equality import GreedyTrace, greedy_divergence
    from moeserve.testing.oracle import hf_greedy, load_hf_model

    path = make_tiny_checkpoint("mixtral", tmp_path / "wide", hidden_size=256, num_attention_heads=4,
                                num_key_value_heads=2, intermediate_size=128, sliding_window=window)
    engine = LLMEngine(engine_config(path, max_model_len=128, max_num_seqs=4, block_size=4))
    assert engine.core.executor.worker.model.attention_backend == "cpu"
    assert engine.core.executor.worker.model.config.head_dim == 64
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=5)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), {"prompt_token_ids": p}, params)
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    hf = load_hf_model(path)
    for i, p in enumerate(prompts):
        c = done[str(i)].outputs[0]
        assert greedy_divergence(GreedyTrace(c.token_ids, c.logprobs), hf_greedy(hf, p, 12)) is None, f"prompt {i}"
