"""The MoE layer's runtime parts: placement with spare slots, load accounting, runtime K."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from moeserve import load_model
from moeserve.model.moe import Routing
from moeserve.testing.checkpoints import TINY_ARCHS
from moeserve.testing.equality import greedy_divergence
from moeserve.testing.oracle import hf_logits, load_hf_model
from moeserve.testing.runner import ReferenceRunner

# Replicas compute the same rows in different matmul batches: fp32 rounding may move the last
# bits, nothing more. A routing or weight-copy mistake moves logits by O(1).
FP32_NOISE = 1e-5


def _capture_routing(model) -> list[list[Routing]]:
    """Per MoE layer, the Routing of each forward."""
    seen: list[list[Routing]] = [[] for _ in model.moe_layers]
    for i, moe in enumerate(model.moe_layers):
        moe.gate.register_forward_hook(lambda m, args, out, i=i: seen[i].append(out))
    return seen


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_load_counts_equal_a_direct_count_of_router_choices(arch, checkpoints, prompts):
    model = load_model(checkpoints(arch))
    routing = _capture_routing(model)
    runner = ReferenceRunner(model)
    batch = {i: p for i, p in enumerate(prompts)}
    runner.step(batch)
    load = model.expert_load()
    K, E = model.config.top_k, model.config.num_experts
    num_tokens = sum(len(p) for p in prompts)
    assert load.logical.shape == (model.config.num_moe_layers, E)
    for layer, seen in enumerate(routing):
        # Count from the gate logits, independently of the router's own top-K and of bincount.
        probs = torch.softmax(seen[-1].logits.float(), dim=-1)
        direct = Counter(e for row in probs.tolist() for e in sorted(range(E), key=lambda e: -row[e])[:K])
        assert load.logical[layer].tolist() == [direct[e] for e in range(E)], f"MoE layer {layer}"
        assert int(load.logical[layer].sum()) == K * num_tokens
    assert torch.equal(load.physical, load.logical)  # identity placement, no spares

    # Counters describe one step: a decode step of 8 tokens replaces the prefill's counts.
    runner.step({i: [5] for i in batch})
    assert int(model.expert_load().logical.sum()) == model.config.num_moe_layers * K * len(batch)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_replicated_experts_give_the_identity_placement_outputs(arch, checkpoints, prompts):
    path = checkpoints(arch)
    identity = load_model(path)
    spares = load_model(path, num_redundant_experts=3)
    E = identity.config.num_experts
    batch = {i: p for i, p in enumerate(prompts)}
    expected = ReferenceRunner(identity).step(batch)
    assert all(torch.equal(a, b) for a, b in zip(expected.values(), ReferenceRunner(spares).step(batch).values()))

    hot = identity.expert_load().logical.argmax(dim=1).tolist()  # hottest expert per MoE layer
    for moe, expert in zip(spares.moe_layers, hot):
        moe.replicate(expert, E + 1)  # a non-identity map: spare E stays empty, E+1 gets a copy
        moe.replicate((expert + 1) % E, E + 2)
    got = ReferenceRunner(spares).step(batch)
    for seq in batch:
        assert (got[seq] - expected[seq]).abs().max().item() < FP32_NOISE

    load = spares.expert_load()
    for layer, expert in enumerate(hot):
        original, copy = load.physical[layer, expert].item(), load.physical[layer, E + 1].item()
        assert original > 0 and copy > 0, "the hot expert's tokens must be split over both copies"
        assert original + copy == load.logical[layer, expert].item()
        assert abs(original - copy) <= max(2, 0.5 * (original + copy))
        assert load.physical[layer, E].item() == 0
    assert torch.equal(load.logical, identity.expert_load().logical)

    a = ReferenceRunner(identity).greedy(prompts, 8)
    b = ReferenceRunner(spares).greedy(prompts, 8)
    assert all(greedy_divergence(x, y) is None for x, y in zip(a, b))


def test_replica_choice_is_token_index_mod_replicas(checkpoints):
    model = load_model(checkpoints("mixtral"), num_redundant_experts=2)
    placement = model.moe_layers[0].placement
    model.moe_layers[0].replicate(3, 8)
    model.moe_layers[0].replicate(3, 9)
    ids = torch.tensor([[3, 0], [3, 1], [3, 8], [3, 2], [8, 8]])  # 8 = E: no expert
    slots = placement.slots_for(ids)
    assert slots[:, 0].tolist() == [3, 8, 9, 3, 10]  # 10 = P: no slot
    assert slots[:, 1].tolist() == [0, 1, 10, 2, 10]
    placement.remove_replica(8)
    assert placement.slots_for(torch.tensor([[3], [3]]))[:, 0].tolist() == [3, 9]
    with pytest.raises(ValueError):
        placement.add_replica(1, 9)  # occupied
    placement.remove_replica(9)
    with pytest.raises(ValueError):
        placement.remove_replica(3)  # the last copy


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_runtime_top_k_lowered_to_one(arch, checkpoints, prompts):
    """K = 1 at run time computes what the checkpoint computes with num_experts_per_tok = 1:
    the top expert alone, weighted 1.0 where the family renormalises (Mixtral; Qwen3 here, with
    norm_topk_prob) and by its softmax probability where it does not (Qwen2-MoE, OLMoE)."""
    path = checkpoints(arch)
    model = load_model(path)
    hf_full, hf_top1 = load_hf_model(path), load_hf_model(path, num_experts_per_tok=1)
    routing = _capture_routing(model)
    prompt = prompts[7]

    model.set_top_k(1)
    got = ReferenceRunner(model).step({0: prompt})[0]
    assert (got - hf_logits(hf_top1, prompt)).abs().max().item() < 1e-4
    r = routing[0][-1]
    probs = torch.softmax(r.logits.float(), dim=-1)
    assert torch.equal(r.expert_ids[:, 0], probs.argmax(-1))
    assert (r.expert_ids[:, 1:] == model.config.num_experts).all()
    top_weight = torch.ones(len(prompt)) if model.config.renormalize else probs.max(-1).values
    assert torch.allclose(r.weights[:, 0].float(), top_weight, atol=1e-6, rtol=0)
    assert (r.weights[:, 1:] == 0).all()
    assert int(model.expert_load().logical.sum()) == model.config.num_moe_layers * len(prompt)

    model.set_top_k(model.config.top_k)  # back to the model's K without reloading
    got = ReferenceRunner(model).step({0: prompt})[0]
    assert (got - hf_logits(hf_full, prompt)).abs().max().item() < 1e-4


def test_runtime_top_k_per_layer(checkpoints, prompts):
    model = load_model(checkpoints("mixtral"))
    K, T = model.config.top_k, len(prompts[7])
    model.set_top_k(1, moe_layers=[1])
    ReferenceRunner(model).step({0: prompts[7]})
    assert model.expert_load().logical.sum(dim=1).tolist() == [K * T, T, K * T]
    with pytest.raises(ValueError):
        model.set_top_k(K + 1)
    with pytest.raises(ValueError):
        model.set_top_k(0)


def _record_forwards(model, recorder) -> None:
    """Enter `recorder` around every model forward (and only the forward)."""

    def enter(module, args):
        recorder.__enter__()

    def leave(module, args, out):
        recorder.__exit__(None, None, None)

    model.register_forward_pre_hook(enter)
    model.register_forward_hook(leave)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_a_decode_step_forward_never_waits_for_the_device(arch, checkpoints, prompts):
    """With the device-side expert backend, the model forward of a decode step (load accounting
    included) has no op that reads device data back to the host: on CUDA each would stall the
    step. Building the step's metadata on the host happens before the forward and is not counted."""
    from moeserve.testing.host_sync import HostSyncRecorder

    model = load_model(checkpoints(arch), expert_backend="grouped_mm", attention_backend="torch")
    runner = ReferenceRunner(model)
    out = runner.step({i: p for i, p in enumerate(prompts[:4])})
    recorder = HostSyncRecorder()
    _record_forwards(model, recorder)
    runner.step({s: [int(torch.argmax(logits[-1]))] for s, logits in out.items()})
    assert recorder.ops and recorder.seen == []
    assert int(model.expert_load().logical.sum()) == 4 * model.config.top_k * model.config.num_moe_layers


def test_no_load_accounting_when_it_is_off(checkpoints, prompts):
    from moeserve.testing.host_sync import HostSyncRecorder

    model = load_model(checkpoints("mixtral"), expert_backend="grouped_mm")
    model.load.enabled = False
    recorder = HostSyncRecorder()
    _record_forwards(model, recorder)
    ReferenceRunner(model).step({0: prompts[4]})
    load = model.expert_load()
    assert int(load.logical.sum()) == 0 and int(load.physical.sum()) == 0 and load.num_tokens == 0
    assert recorder.ops and not {"aten._log_softmax", "aten.index_add_"} & set(recorder.ops)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "grouped_mm"])
def test_a_cuda_decode_step_forward_has_no_host_sync(backend, checkpoints, prompts):
    """The same property on the device itself: CUDA's sync debug mode raises on any sync."""
    dtype = "bfloat16" if backend == "grouped_mm" else "float32"
    model = load_model(checkpoints("mixtral"), device="cuda", dtype=dtype, expert_backend=backend,
                       attention_backend="triton")
    runner = ReferenceRunner(model)
    out = runner.step({i: p for i, p in enumerate(prompts[:4])})

    def enter(module, args):
        torch.cuda.set_sync_debug_mode("error")

    def leave(module, args, result):
        torch.cuda.set_sync_debug_mode("default")

    model.register_forward_pre_hook(enter)
    model.register_forward_hook(leave)
    try:
        runner.step({s: [int(torch.argmax(logits[-1]))] for s, logits in out.items()})
    finally:
        torch.cuda.set_sync_debug_mode("default")
