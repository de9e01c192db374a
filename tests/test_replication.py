"""Hot-expert replication: slot groups, map updates that are safe at every write, the planner,
and generations that stay equal to the unreplicated engine's while experts are copied between
steps of running requests."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from moeserve import SamplingParams, load_model
from moeserve.config import engine_config
from moeserve.engine.llm_engine import LLMEngine
from moeserve.engine.replication import LayerPlacement, Move, ReplicationPlanner, ReplicationSettings, balancedness, plan_layer
from moeserve.model.moe import SlotLayout
from moeserve.testing.equality import GreedyTrace, greedy_divergence
from moeserve.testing.runner import ReferenceRunner

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=5)


def test_slot_layout_is_group_major_with_uneven_splits():
    layout = SlotLayout(num_experts=8, num_slots=11, num_groups=3)  # 8 experts, 3 spares over 3 groups
    assert layout.slot_group == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    assert layout.initial_phy2log == [0, 1, -1, 2, 3, 4, -1, 5, 6, 7, -1]
    assert layout.home_slot == [0, 1, 3, 4, 5, 7, 8, 9]
    assert SlotLayout(8, 10, 1).initial_phy2log == list(range(8)) + [-1, -1]  # one group: the identity
    with pytest.raises(ValueError, match="slot groups"):
        SlotLayout(4, 6, 5)


def test_slot_groups_load_each_expert_into_its_home_slot(checkpoints, prompts):
    """Outputs with 4 groups and spares equal the identity layout's bit for bit: every expert's
    weights went to the slot the maps name."""
    path = checkpoints("qwen3_moe")
    identity = load_model(path)
    grouped = load_model(path, num_redundant_experts=4, expert_slot_groups=4)
    moe = grouped.moe_layers[0]
    home = grouped.layout.home_slot
    for e in range(identity.config.num_experts):
        assert torch.equal(moe.w13[home[e]], identity.moe_layers[0].w13[e])
    batch = {i: p for i, p in enumerate(prompts[:4])}
    a, b = ReferenceRunner(identity).step(batch), ReferenceRunner(grouped).step(batch)
    assert all(torch.equal(a[i], b[i]) for i in batch)


class _CheckEveryMapWrite(TorchFunctionMode):
    """After every torch call that writes one of a layer's placement maps, route every
    (expert, replica) the maps allow and check the slot holds that expert's weights."""

    def __init__(self, moe, originals: torch.Tensor):
        super().__init__()
        self.moe, self.originals = moe, originals
        self.maps = {id(t) for t in (moe.placement.phy2log, moe.placement.log2phy, moe.placement.replica_count)}
        self.checked = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        writes = name == "__setitem__" or (name.endswith("_") and not name.startswith("__"))
        if writes and args and isinstance(args[0], torch.Tensor) and id(args[0]) in self.maps:
            self._check()  # the mode is off inside its own handler
        return result

    def _check(self) -> None:
        p = self.moe.placement
        E = p.num_experts
        ids = torch.arange(E).repeat_interleave(p.num_slots)[:, None]  # token t asks for expert t // P
        slots = p.slots_for(ids)[:, 0]  # token index mod count covers every valid replica
        for e, s in zip(ids[:, 0].tolist(), slots.tolist()):
            assert 0 <= s < p.num_slots, f"expert {e} routed to {s}"
            assert torch.equal(self.moe.w13[s], self.originals[e]), f"expert {e} routed to slot {s} holding other weights"
        self.checked += 1


def test_every_intermediate_map_state_routes_to_the_right_weights(checkpoints):
    """Replicate, retire (first, middle and last row entries) and reuse a slot; a forward that
    ran between any two writes would find each expert's own weights wherever it routes."""
    model = load_model(checkpoints("mixtral"), num_redundant_experts=3)
    moe, E = model.moe_layers[0], model.config.num_experts
    originals = moe.w13[:E].clone()
    with _CheckEveryMapWrite(moe, originals) as check:
        moe.replicate(2, E)
        moe.replicate(2, E + 1)
        moe.replicate(2, E + 2)
        moe.retire(E + 1)  # a middle entry
        moe.retire(2)  # the first entry: the home slot is just another copy
        moe.retire(E + 2)
        moe.replicate(5, 2)  # reuse the retired home slot for another expert
        moe.retire(5)  # and retire 5's home copy: 5 now lives in slot 2 only
    assert check.checked >= 8 * 3
    p = moe.placement
    assert p.replica_count.tolist() == [1] * E
    assert p.log2phy[2, 0].item() == E and p.log2phy[5, 0].item() == 2
    assert p.phy2log.tolist() == [0, 1, 5, 3, 4, -1, 6, 7, 2, -1, -1]
    with pytest.raises(ValueError):
        moe.replicate(1, 2)  # occupied by expert 5's copy
    with pytest.raises(ValueError):
        moe.retire(E)  # expert 2's last copy


# ---- the planner on synthetic loads ----

def _placement(E: int, spares: int, groups: int) -> LayerPlacement:
    layout = SlotLayout(E, E + spares, groups)
    return LayerPlacement(layout.initial_phy2log, layout.slot_group, E)


def test_planner_replicates_the_hottest_expert_into_the_least_loaded_group():
    placement = _placement(16, 4, 4)  # groups hold experts 0-3, 4-7, 8-11, 12-15 and one spare each
    load = np.full(16, 10.0)
    load[5] = 100.0  # group 1 is hot because of expert 5
    load[12:] = 5.0  # group 3 is the coolest
    before = balancedness(placement.group_loads(load))
    move = plan_layer(0, placement, load, threshold=0.9)
    assert move is not None and move.expert == 5 and move.retire_slot is None
    assert placement.slot_group[move.slot] == 3
    placement.apply(move)
    assert balancedness(placement.group_loads(load)) > before


def test_planner_converges_and_stops_when_balanced():
    rng = np.random.default_rng(0)
    E, G = 64, 4
    load = 1000.0 / np.arange(1, E + 1) ** 1.2
    load = load[rng.permutation(E)]
    placement = _placement(E, 8, G)
    start = balancedness(placement.group_loads(load))
    moves = 0
    while (move := plan_layer(0, placement, load, threshold=0.9)) is not None:
        placement.apply(move)
        moves += 1
        assert moves < 50, "the planner does not settle"
    after = balancedness(placement.group_loads(load))
    assert after >= 0.9 > start
    assert (placement.phy2log >= 0).sum() <= E + 8
    assert plan_layer(0, placement, load, threshold=0.9) is None  # balanced: no more moves


def test_planner_does_not_act_on_a_balanced_layer():
    placement = _placement(8, 4, 4)
    assert plan_layer(0, placement, np.full(8, 50.0), threshold=0.9) is None


def test_planner_retires_a_replica_that_went_cold():
    placement = _placement(8, 4, 4)
    placement.apply(Move(0, expert=1, slot=int(np.flatnonzero(placement.phy2log < 0)[-1])))  # 1 was hot
    load = np.full(8, 50.0)
    load[1] = 2.0  # and is now cold
    move = plan_layer(0, placement, load, threshold=0.9)
    assert move is not None and move.expert is None and placement.phy2log[move.retire_slot] == 1


def test_planner_window_forgets_old_steps():
    planner = ReplicationPlanner(ReplicationSettings(window=3, interval=1), 4, [([0, 1, 2, 3, -1], [0, 0, 1, 1, 1])])
    for step in range(5):
        planner.observe([[step, 0, 0, 1]])
    assert planner.window_load()[0].tolist() == [2 + 3 + 4, 0, 0, 3]


# ---- in the engine: equal generations while experts move ----

def _generate(engine: LLMEngine, prompts, between_steps=None) -> dict[str, GreedyTrace]:
    for i, p in enumerate(prompts):
        engine.add_request(str(i), {"prompt_token_ids": p}, GREEDY)
    done, step = {}, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = GreedyTrace(out.outputs[0].token_ids, out.outputs[0].logprobs)
        if between_steps is not None:
            between_steps(step)
        step += 1
    return done


def test_generations_equal_the_unreplicated_engine_while_experts_move(checkpoints, prompts):
    """Every kind of move (copy, move across groups, retire, reuse a slot), in every MoE layer,
    one per step while requests run: the generations equal the engine that never replicates."""
    path = checkpoints("mixtral")
    plain = _generate(LLMEngine(engine_config(path, max_model_len=128, block_size=4)), prompts)
    engine = LLMEngine(engine_config(path, max_model_len=128, block_size=4, num_redundant_experts=4,
                                     expert_slot_groups=4, replication="auto", replication_interval=10**6))
    planner = engine.core.replication
    E = engine.core.model_config.num_experts
    rng = np.random.default_rng(0)
    applied = {"copy": 0, "retire": 0}

    def one_move(step: int) -> None:
        """Cycle copy -> move across groups -> reuse a retired slot -> retire, over the layers."""
        layer = step % len(planner.layers)
        placement = planner.layers[layer]
        free = np.flatnonzero(placement.phy2log < 0)
        copies = np.bincount(placement.phy2log[placement.phy2log >= 0], minlength=E)
        retirable = [int(s) for s in np.flatnonzero(placement.phy2log >= 0) if copies[placement.phy2log[s]] >= 2]
        kind = (step // len(planner.layers)) % 4
        e = int(rng.integers(E))
        if kind == 0 and len(free):
            move = Move(layer, expert=e, slot=int(rng.choice(free)))
        elif kind == 1 and len(free):
            source = int(rng.choice(np.flatnonzero(placement.phy2log == e)))
            move = Move(layer, expert=e, slot=int(free[-1]), retire_slot=source)
        elif kind == 2 and retirable and placement.phy2log[retirable[-1]] != e:
            move = Move(layer, expert=e, slot=retirable[-1], retire_slot=retirable[-1])
        elif retirable:
            move = Move(layer, retire_slot=retirable[0])
        else:
            return
        planner.apply(engine.core, move)
        applied["copy"] += move.expert is not None
        applied["retire"] += move.retire_slot is not None

    moved = _generate(engine, prompts, one_move)
    assert applied["copy"] >= 10 and applied["retire"] >= 5
    model = engine.core.executor.worker.model
    for i, moe in enumerate(model.moe_layers):  # the mirror and the device maps agree
        assert moe.placement.phy2log.tolist() == planner.layers[i].phy2log.tolist()
    for key in plain:
        assert greedy_divergence(moved[key], plain[key]) is None, f"prompt {key}"
    # After the moves, a fresh batch still agrees (the placement is far from the start now).
    engine.core.replication = None
    again = _generate(engine, prompts[:3])
    for key in again:
        assert greedy_divergence(again[key], plain[key]) is None, f"prompt {key} after"


def test_auto_replication_acts_on_real_load_and_keeps_generations_equal(checkpoints, prompts):
    path = checkpoints("qwen3_moe")
    plain = _generate(LLMEngine(engine_config(path, max_model_len=128, block_size=4)), prompts)
    engine = LLMEngine(engine_config(path, max_model_len=128, block_size=4, num_redundant_experts=4,
                                     expert_slot_groups=4, replication="auto", replication_window=8,
                                     replication_interval=2, replication_threshold=1.0))
    got = _generate(engine, prompts)
    stats = engine.core.stats().replication
    assert stats.num_replications >= 1 and stats.stall_seconds_max > 0
    assert sum(map(sum, stats.replicas)) > engine.core.model_config.num_experts * len(stats.replicas)
    for key in plain:
        assert greedy_divergence(got[key], plain[key]) is None, f"prompt {key}"


def test_replication_refuses_a_configuration_with_nothing_to_balance(checkpoints):
    with pytest.raises(ValueError, match="slot groups"):
        LLMEngine(engine_config(checkpoints("mixtral"), max_model_len=64, replication="auto",
                                num_redundant_experts=2))


def test_server_reports_replication_and_overflow_in_metrics(checkpoints):
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    from server_utils import start_server

    server = start_server(str(checkpoints("qwen3_moe")), "--max-model-len", "128", "--expert-metrics", "expert",
                          "--num-redundant-experts", "4", "--expert-slot-groups", "4", "--replication", "auto",
                          "--replication-window", "4", "--replication-interval", "2", "--replication-threshold", "1.0",
                          "--moe-capacity-factor", "1.0")
    try:
        for i in range(4):
            r = httpx.post(f"{server.url}/v1/completions", timeout=60,
                           json={"prompt": f"def f_{i}(x): return x", "max_tokens": 16, "ignore_eos": True})
            assert r.status_code == 200
        families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text)}
    finally:
        server.stop()

    def values(name: str) -> list:
        return [s for s in families[name].samples if not s.name.endswith("_created")]

    assert values("moeserve:replications")[0].value >= 1
    assert values("moeserve:replication_stall_seconds_max")[0].value > 0
    placements = {s.labels["placement"] for s in values("moeserve:replication_balancedness")}
    assert placements == {"current", "start"}
    replicas = values("moeserve:expert_replicas")
    in_use = {s.labels["layer"]: s.value for s in values("moeserve:moe_slots_in_use")}
    for layer, n in in_use.items():  # the two series describe the same placement
        assert n == sum(s.value for s in replicas if s.labels["layer"] == layer)
    assert max(in_use.values()) > 8
    rerouted = sum(s.value for s in values("moeserve:moe_overflow_token_slots") if s.labels["outcome"] == "rerouted")
    assert rerouted > 0  # a capacity factor of 1.0 overflows on a random router
    assert all(s.value >= 0 for s in values("moeserve:moe_load_cv2"))
