"""The decode step's GPU path, checked on the CPU: the static decode path (the region CUDA graphs
capture, run eagerly here) gives transformers' tokens through the engine; it never syncs with the
host; it reads nothing but weights, the KV cache and its persistent buffers; and its shapes are
fixed per bucket. The sampler's device half has no host sync either."""

from __future__ import annotations

import torch

from moeserve import SamplingParams
from moeserve.checkpoint import load_model
from moeserve.config import engine_config
from moeserve.engine.llm_engine import LLMEngine
from moeserve.model.attention import AttentionMetadata, PagedKVCache
from moeserve.testing.dispatch_checks import GraphRegionRecorder
from moeserve.testing.equality import GreedyTrace, greedy_divergence
from moeserve.testing.host_sync import HostSyncRecorder
from moeserve.testing.oracle import hf_greedy, load_hf_model
from moeserve.worker.cuda_graph import DecodeGraphs, DecodeInputs, DecodeRow
from moeserve.worker.sampler import Sampler, SamplingRow

MAX_NEW = 12
BLOCK = 4


def test_engine_on_the_static_decode_path_matches_transformers(checkpoints, prompts):
    """Continuous batching with requests joining and leaving (rows reused, tables grown from the
    diffs, batches padded to buckets) gives transformers' greedy tokens, and every decode-only
    step ran on the static path."""
    path = checkpoints("qwen3_moe")
    engine = LLMEngine(engine_config(path, max_model_len=96, max_num_seqs=5, block_size=BLOCK, cuda_graphs=True,
                                     expert_backend="grouped_mm", dtype="float32"))
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=5)
    many = prompts + [prompts[7][:20], prompts[2][::-1]]
    inject = {3: [8], 6: [9]}
    later = {i for ids in inject.values() for i in ids}
    for i, p in enumerate(many):
        if i not in later:
            engine.add_request(str(i), {"prompt_token_ids": p}, params)
    done, step = {}, 0
    while engine.has_unfinished_requests() or step <= max(inject):
        for i in inject.get(step, []):
            engine.add_request(str(i), {"prompt_token_ids": many[i]}, params)
        done.update({o.request_id: o for o in engine.step() if o.finished})
        step += 1
    hf = load_hf_model(path)
    for i, p in enumerate(many):
        c = done[str(i)].outputs[0]
        assert greedy_divergence(GreedyTrace(c.token_ids, c.logprobs), hf_greedy(hf, p, MAX_NEW)) is None, f"prompt {i}"
    runner = engine.core.executor.worker.runner
    assert runner.decode_graphs.num_steps >= MAX_NEW - 1
    # 10 requests went through 5 rows; those of the last requests return at the next step.
    assert len(set(runner.rows.values())) + len(runner.free_rows) == 5
    assert engine.core.block_manager.num_free_blocks == engine.core.num_kv_blocks


def _decode_setup(checkpoints, arch="mixtral", bucket_rows=3):
    """A model on the grouped_mm backend, two prompts prefilled by the ordinary path, and a
    DecodeGraphs (eager) over the same cache, with the two requests in rows 0 and 1."""
    model = load_model(checkpoints(arch), dtype="float32", expert_backend="grouped_mm")
    num_blocks = 40
    cache = PagedKVCache.for_model(model.config, num_blocks + 1, BLOCK, torch.float32)
    inputs = DecodeInputs(max_batch=4, max_num_seqs=4, blocks_per_seq=16, max_diffs=8, block_size=BLOCK,
                          scratch_block=num_blocks, device="cpu")
    graphs = DecodeGraphs(model, cache, inputs, max_model_len=64, buckets=(1, 2, 4), capture=False)
    prompts = [[5, 9, 3, 7, 11, 2], [4, 8, 15, 16, 23, 42, 7, 1, 9]]
    tables = [[0, 1, 2, 3], [4, 5, 6, 7]]
    meta = AttentionMetadata.build([len(p) for p in prompts], [len(p) for p in prompts], tables, BLOCK)
    model(torch.tensor(prompts[0] + prompts[1]), meta, cache)
    for row, t in enumerate(tables):
        inputs.set_blocks(row, 0, t)
    K = model.config.top_k

    def rows(tokens):
        out = []
        for row, (p, tok) in enumerate(zip(prompts, tokens)):
            pos = len(p)
            out.append(DecodeRow(tok, pos, tables[row][pos // BLOCK] * BLOCK + pos % BLOCK, row, K, K))
        return out

    return model, cache, graphs, prompts, tables, rows


def test_static_decode_equals_the_ordinary_step_and_pads_without_load(checkpoints):
    model, cache, graphs, prompts, tables, rows = _decode_setup(checkpoints)
    step = rows([13, 21])
    logits = graphs.run(step)  # 2 rows: bucket 2
    load = model.expert_load()
    assert int(load.logical.sum()) == 2 * model.config.top_k * model.config.num_moe_layers
    # The same step through the ordinary path on a fresh copy of the cache.
    ref_cache = PagedKVCache.for_model(model.config, cache.num_blocks, BLOCK, torch.float32)
    for a, b in zip(ref_cache.key + ref_cache.value, cache.key + cache.value):
        a.copy_(b)
    meta = AttentionMetadata.build([1, 1], [len(p) + 1 for p in prompts], tables, BLOCK)
    want = model.compute_logits(model(torch.tensor([13, 21]), meta, ref_cache))
    torch.testing.assert_close(logits, want, rtol=0, atol=1e-5)
    entropy = model.expert_load().gate_entropy.clone()
    graphs.inputs.stage(step, 4)  # the same two rows and two padding rows: no more entropy
    graphs.forward(4)
    torch.testing.assert_close(model.expert_load().gate_entropy, entropy, rtol=1e-6, atol=0)
    # Three rows pad to bucket 4; the padding row runs at K = 0 and writes the scratch block only.
    before = [k[: cache.num_blocks - 1].clone() for k in cache.key]
    graphs.run(rows([13, 21])[:1] + [DecodeRow(3, 0, 8 * BLOCK, 2, model.config.top_k, model.config.top_k)]
               + rows([13, 21])[1:])
    assert int(model.expert_load().logical.sum()) == 3 * model.config.top_k * model.config.num_moe_layers
    for layer, k in enumerate(cache.key):
        changed = (k[: cache.num_blocks - 1] != before[layer]).flatten(1).any(dim=1).nonzero().flatten().tolist()
        assert 8 in changed and set(changed) <= {1, 6, 8}, changed  # the rows' own blocks, none other


def test_decode_step_and_sampler_never_sync_with_the_host(checkpoints):
    model, cache, graphs, prompts, tables, rows = _decode_setup(checkpoints)
    step = rows([13, 21])
    graphs.inputs.stage(step, 2)  # host work, before the device half
    sample_rows = [SamplingRow(SamplingParams(temperature=0, logprobs=3), list(p), len(p), frozenset({2}))
                   for p in prompts[:1]] + [SamplingRow(SamplingParams(temperature=0.8, top_p=0.9, seed=7),
                                                        list(prompts[1]), len(prompts[1]), frozenset({2}))]
    with HostSyncRecorder() as rec:
        logits = graphs.forward(2)
        out = Sampler().sample(logits, sample_rows)
    assert rec.seen == []
    assert out.tokens.shape == (2,) and out.top_ids.shape == (2, 3)
    # The recorder does see syncs: a boolean mask, and the CPU expert loop (it sizes its matmuls
    # from the routing counts).
    with HostSyncRecorder() as rec:
        logits.clone()[logits > 0] = 0
    assert rec.seen == ["aten.index_put_ (boolean mask)"]
    loop = load_model(checkpoints("mixtral"), dtype="float32", expert_backend="torch")
    meta = AttentionMetadata.build([1], [1], [[0]], BLOCK)
    with HostSyncRecorder() as rec:
        loop(torch.tensor([5]), meta, PagedKVCache.for_model(loop.config, 4, BLOCK, torch.float32))
    assert "aten.bincount" in rec.seen


def test_graph_region_reads_only_persistent_tensors_with_fixed_shapes(checkpoints):
    model, cache, graphs, prompts, tables, rows = _decode_setup(checkpoints)
    persistent = [*model.parameters(), *model.buffers(), *cache.key, *cache.value, graphs.inputs.step,
                  graphs.inputs.tables, graphs.inputs.arange, graphs.inputs.zeros,
                  *(g.block_tables for m in graphs.meta.values() for g in m.groups),
                  *model.rotary._inv_freq.values(), *graphs.workspace._buffers.values()]
    graphs.forward(2)  # the warm-up a capture starts with: workspace buffers come to exist
    persistent += list(graphs.workspace._buffers.values())
    recorded = []
    for tokens in ([13, 21], [30, 2]):
        graphs.inputs.stage(rows(tokens), 2)
        with GraphRegionRecorder(persistent) as rec:
            graphs.forward(2)
        assert not rec.foreign, rec.foreign[:5]
        recorded.append(rec.ops)
    assert recorded[0] == recorded[1]  # op for op, shape for shape
    # The recorder does see a per-step tensor: the ordinary metadata is built from host lists.
    meta = AttentionMetadata.build([1, 1], [7, 10], tables[:2], BLOCK)
    with GraphRegionRecorder(persistent) as rec:
        model(torch.tensor([13, 21]), meta, cache)
    assert rec.foreign
