"""Capacity factor: the vectorised rounds against a plain loop that states the semantics, the
counts the model records, and "large enough" meaning exactly off."""

from __future__ import annotations

import math

import pytest
import torch

from moeserve import load_model
from moeserve.model.moe.capacity import apply_capacity
from moeserve.testing.runner import ReferenceRunner


def _reference(ids: list[list[int]], logits: list[list[float]], cf: float, overflow: str):
    """The semantics of moeserve.model.moe.capacity, one token-slot at a time."""
    T, K, E = len(ids), len(ids[0]), len(logits[0])
    active = [(k, t) for k in range(K) for t in range(T) if ids[t][k] < E]
    cap = math.ceil(cf * len(active) / E)
    placed = [0] * E
    result = [[E] * K for _ in range(T)]
    alternatives = [[e for e in sorted(range(E), key=lambda e: -logits[t][e]) if e not in ids[t]] for t in range(T)]
    next_alt = [0] * T
    request = {slot: ids[slot[1]][slot[0]] for slot in active}
    pending = sorted(active)
    while pending:
        refused = []
        for k, t in pending:  # (choice rank, token) order
            e = request[(k, t)]
            if placed[e] < cap:
                placed[e] += 1
                result[t][k] = e
            else:
                refused.append((k, t))
        if overflow == "drop":
            break
        pending = []
        for k, t in sorted(refused, key=lambda kt: (kt[1], kt[0])):  # per token, lower rank first
            if next_alt[t] < len(alternatives[t]):
                request[(k, t)] = alternatives[t][next_alt[t]]
                pending.append((k, t))
            next_alt[t] += 1
        pending.sort()
    rerouted = sum(1 for k, t in active if result[t][k] < E and result[t][k] != ids[t][k])
    dropped = sum(1 for k, t in active if result[t][k] == E)
    return result, rerouted, dropped, cap


def _routing(T: int, K: int, E: int, seed: int, skew: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g) + skew * torch.linspace(1, 0, E)  # low ids are popular
    ids = torch.topk(logits, K, dim=-1).indices
    k = torch.randint(1, K + 1, (T,), generator=g)  # per-token K, as under degradation
    ids = torch.where(torch.arange(K) < k[:, None], ids, E)
    return ids, logits


@pytest.mark.parametrize("overflow", ["reroute", "drop"])
@pytest.mark.parametrize("cf", [0.5, 1.0, 1.25, 2.0])
def test_rounds_equal_the_one_slot_at_a_time_loop(cf, overflow):
    for seed in range(4):
        ids, logits = _routing(T=37, K=3, E=8, seed=seed)
        got = apply_capacity(ids, logits, cf, overflow)
        expected, rerouted, dropped, cap = _reference(ids.tolist(), logits.tolist(), cf, overflow)
        assert got.expert_ids.tolist() == expected
        assert (int(got.rerouted), int(got.dropped)) == (rerouted, dropped)
        per_expert = torch.bincount(got.expert_ids.reshape(-1), minlength=9)[:8]
        assert int(per_expert.max()) <= cap
        if overflow == "drop":
            assert rerouted == 0
        else:  # a slot is dropped only when every expert the token could still take is full
            for t, k in (got.expert_ids == 8).logical_and(ids < 8).nonzero().tolist():
                open_to_token = set(range(8)) - set(ids[t].tolist()) - set(got.expert_ids[t].tolist())
                assert all(int(per_expert[e]) == cap for e in open_to_token), (t, k)
    assert rerouted + dropped > 0  # the skew does overflow


def test_rerouted_slots_go_to_the_tokens_next_best_experts():
    logits = torch.tensor([[5.0, 4.0, 3.0, 2.0], [5.0, 4.0, 3.0, 2.0], [5.0, 1.0, 4.0, 2.0]])
    ids = torch.tensor([[0, 1], [0, 1], [0, 2]])
    out = apply_capacity(ids, logits, capacity_factor=1.0, overflow="reroute")  # cap = ceil(6 / 4) = 2
    # expert 0 takes tokens 0 and 1; token 2's first choice goes to its best unchosen expert (3)
    assert out.expert_ids.tolist() == [[0, 1], [0, 1], [3, 2]]
    assert int(out.rerouted) == 1 and int(out.dropped) == 0


def test_a_large_capacity_factor_is_exactly_no_capacity_factor(checkpoints, prompts):
    path = checkpoints("olmoe")
    plain, capped = load_model(path), load_model(path)
    capped.set_capacity(float(capped.config.num_experts))  # cap >= every token-slot of the step
    batch = {i: p for i, p in enumerate(prompts)}
    a, b = ReferenceRunner(plain).step(batch), ReferenceRunner(capped).step(batch)
    assert all(torch.equal(a[i], b[i]) for i in batch)
    assert torch.equal(plain.expert_load().logical, capped.expert_load().logical)
    assert int(capped.expert_load().overflow.sum()) == 0


@pytest.mark.parametrize("overflow", ["reroute", "drop"])
def test_the_model_counts_what_the_loop_computes_on_its_routing(checkpoints, prompts, overflow):
    model = load_model(checkpoints("mixtral"))
    model.set_capacity(1.0, overflow)
    seen = []
    for moe in model.moe_layers:
        moe.gate.register_forward_hook(lambda m, args, out: seen.append(out))
    ReferenceRunner(model).step({i: p for i, p in enumerate(prompts)})
    load = model.expert_load()
    E = model.config.num_experts
    for layer, routing in enumerate(seen):
        expected, rerouted, dropped, _ = _reference(routing.expert_ids.tolist(), routing.logits.float().tolist(), 1.0,
                                                    overflow)
        assert load.overflow[layer].tolist() == [rerouted, dropped]
        counts = torch.bincount(torch.tensor(expected).reshape(-1), minlength=E + 1)[:E]
        assert load.logical[layer].tolist() == counts.tolist()  # the counters see where slots ran
    assert int(load.overflow.sum()) > 0
