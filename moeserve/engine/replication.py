"""ReplicationPlanner (EngineCore, between steps): hot-expert replication into spare slots while
serving, one expert's weights at a time.

Shape legend: L_moe MoE layers, E logical experts, P physical slots, G slot groups (ranks).

Load model. Over a sliding window of `window` steps the planner sums the routed-token counts per
(layer, expert). A token's choice of an expert with c copies goes to one copy by token index
mod c, so each copy carries load[e] / c; a group's load is the sum over its slots, and a layer's
balancedness is mean / max of its group loads (vLLM EPLB's definition, 1.0 = even).

Policy, per layer, every `interval` steps (EPLB's greedy, applied incrementally):
- first, retire a replica that went cold (its load per copy under a quarter of the mean slot
  load) when the layer stays balanced without it or its largest group load does not grow;
- balancedness >= threshold: leave the layer alone;
- below: of every single move that copies at most one expert — add a copy of any expert in any
  group with a free spare, move a copy to such a group, or retire a copy and reuse its slot for
  another expert — take the one that lowers the largest group load most (at least by 1%, so
  noise in the window does not flap the placement). Replicating the expert with the highest
  load per copy into the least-loaded group is what this picks on a skewed load.
The moves planned in a round are applied one per step, so no step waits for more than one
expert's weights; the host mirror of the placement changes with each applied move and is the
only thing the planner reads (no device reads).
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from moeserve.engine.messages import EngineStats, ReplicationStats

if TYPE_CHECKING:
    from moeserve.engine.core import EngineCore

logger = logging.getLogger(__name__)

_MIN_GAIN = 0.01  # a move must lower the largest group load by this share of it
_COLD = 0.25  # a replica is cold below this share of the mean slot load


@dataclass(frozen=True)
class ReplicationSettings:
    window: int = 64
    interval: int = 8
    threshold: float = 0.9


@dataclass(frozen=True)
class Move:
    """One change to one layer's placement: copy `expert` into the empty `slot` (add) and/or
    retire the copy in `retire_slot`. The retirement happens first when both are given and
    `slot == retire_slot` (the slot is reused), last otherwise (a move: copy, then retire)."""

    layer: int
    expert: int | None = None
    slot: int | None = None
    retire_slot: int | None = None

    @property
    def copies(self) -> bool:
        return self.expert is not None


class LayerPlacement:
    """Host mirror of one layer's placement: phy2log [P] (-1 = empty) and slot_group [P]."""

    def __init__(self, phy2log: list[int], slot_group: list[int], num_experts: int):
        self.phy2log = np.asarray(phy2log, dtype=np.int64)
        self.slot_group = np.asarray(slot_group, dtype=np.int64)
        self.num_experts = num_experts
        self.num_groups = int(self.slot_group.max()) + 1

    def copies_in_groups(self) -> np.ndarray:
        """[E, G] number of copies of each expert in each group."""
        out = np.zeros((self.num_experts, self.num_groups), dtype=np.int64)
        held = self.phy2log >= 0
        np.add.at(out, (self.phy2log[held], self.slot_group[held]), 1)
        return out

    def group_loads(self, load: np.ndarray) -> np.ndarray:
        """load [E] -> [G]: each copy carries load[e] / copies[e]."""
        n = self.copies_in_groups()  # [E, G]
        per_copy = load / np.maximum(n.sum(axis=1), 1)  # [E]
        return (per_copy[:, None] * n).sum(axis=0)

    def apply(self, move: Move) -> None:
        if move.retire_slot is not None and move.slot == move.retire_slot:
            self.phy2log[move.retire_slot] = -1
        if move.expert is not None:
            assert self.phy2log[move.slot] == -1, "copy into a slot that is not empty"
            self.phy2log[move.slot] = move.expert
        if move.retire_slot is not None and move.slot != move.retire_slot:
            self.phy2log[move.retire_slot] = -1


def balancedness(group_loads: np.ndarray) -> float:
    peak = float(group_loads.max())
    return float(group_loads.mean()) / peak if peak > 0 else 1.0


def plan_layer(layer: int, placement: LayerPlacement, load: np.ndarray, threshold: float) -> Move | None:
    """The one move (or none) for a layer under load [E] (see the module docstring)."""
    n = placement.copies_in_groups()  # [E, G]
    copies = n.sum(axis=1)  # [E]
    per_copy = load / copies  # [E]
    group = (per_copy[:, None] * n).sum(axis=0)  # [G]
    peak = float(group.max())
    if peak <= 0:
        return None
    free = np.flatnonzero(placement.phy2log < 0)  # empty slots
    held = np.flatnonzero(placement.phy2log >= 0)
    cold = _retire_cold(layer, placement, load, n, copies, group, threshold)
    if cold is not None or balancedness(group) >= threshold:
        return cold

    best: tuple[float, Move] | None = None

    def consider(new_peak: float, move: Move) -> None:
        nonlocal best
        if best is None or new_peak < best[0] - 1e-12:
            best = (new_peak, move)

    # add: a copy of e in group t; every copy of e then carries load[e] / (c + 1)
    free_group = {int(placement.slot_group[s]): int(s) for s in free[::-1]}  # group -> its first empty slot
    if free_group:
        after = load / (copies + 1)  # [E]
        base = group[None, :] - per_copy[:, None] * n + after[:, None] * n  # [E, G]
        for t, slot in free_group.items():
            peaks = np.maximum(np.delete(base, t, axis=1).max(axis=1, initial=0.0), base[:, t] + after)  # [E]
            e = int(np.argmin(peaks))
            consider(float(peaks[e]), Move(layer, expert=e, slot=slot))
        # move: a copy of e from group g to group t != g (which of e's copies in g does not matter)
        for a in _one_slot_per_pair(placement, held):
            e, g = int(placement.phy2log[a]), int(placement.slot_group[a])
            for t, slot in free_group.items():
                if t == g:
                    continue
                new = group.copy()
                new[g] -= per_copy[e]
                new[t] += per_copy[e]
                consider(float(new.max()), Move(layer, expert=e, slot=slot, retire_slot=int(a)))
    # reuse: retire a copy of x (which has >= 2) in group g and put a copy of e in its slot
    for a in _one_slot_per_pair(placement, held):
        x, g = int(placement.phy2log[a]), int(placement.slot_group[a])
        if copies[x] < 2:
            continue
        m = n.copy()
        m[x, g] -= 1
        c = copies.copy()
        c[x] -= 1
        before, after = load / c, load / (c + 1)  # [E] per copy, without / with the new copy
        new = ((before[:, None] * m).sum(axis=0))[None, :] - before[:, None] * m + after[:, None] * m  # [E, G]
        new[:, g] += after
        peaks = new.max(axis=1)
        peaks[x] = np.inf
        e = int(np.argmin(peaks))
        consider(float(peaks[e]), Move(layer, expert=e, slot=int(a), retire_slot=int(a)))
    if best is None or best[0] > peak * (1 - _MIN_GAIN):
        return None
    return best[1]


def _one_slot_per_pair(placement: LayerPlacement, slots: np.ndarray) -> list[int]:
    """The first of `slots` for each (expert, group) pair: copies of one expert in one group are
    interchangeable."""
    seen: dict[tuple[int, int], int] = {}
    for s in slots:
        seen.setdefault((int(placement.phy2log[s]), int(placement.slot_group[s])), int(s))
    return list(seen.values())


def _retire_cold(layer: int, placement: LayerPlacement, load: np.ndarray, n: np.ndarray, copies: np.ndarray,
                 group: np.ndarray, threshold: float) -> Move | None:
    """Retire one copy of the coldest replicated expert if the layer stays balanced without it,
    or its largest group load does not grow."""
    held = placement.phy2log >= 0
    mean_slot = float(load.sum()) / max(int(held.sum()), 1)
    per_copy = load / copies
    cold = [int(e) for e in np.argsort(per_copy, kind="stable") if copies[e] >= 2 and per_copy[e] < _COLD * mean_slot]
    for e in cold:
        best = None
        for a in np.flatnonzero(placement.phy2log == e):
            g = int(placement.slot_group[a])
            m = n[e].copy()
            m[g] -= 1
            new = group - per_copy[e] * n[e] + load[e] / (copies[e] - 1) * m
            fine = balancedness(new) >= threshold or new.max() <= group.max()
            if fine and (best is None or new.max() < best[0]):
                best = (float(new.max()), int(a))
        if best is not None:
            return Move(layer, retire_slot=best[1])
    return None


class ReplicationPlanner:
    """A between-steps controller (see the module docstring). It needs spare slots and at least
    two slot groups; `placement` is each MoE layer's (phy2log, slot_group) as the workers hold it."""

    def __init__(self, settings: ReplicationSettings, num_experts: int, placements: list[tuple[list[int], list[int]]]):
        self.settings = settings
        self.layers = [LayerPlacement(p, g, num_experts) for p, g in placements]
        self.home = [LayerPlacement(p, g, num_experts) for p, g in placements]  # the start placement, kept
        self.num_experts = num_experts
        self._window: collections.deque[np.ndarray] = collections.deque()
        self._sum = np.zeros((len(self.layers), num_experts), dtype=np.float64)
        self._steps = 0
        self._queue: collections.deque[Move] = collections.deque()
        self.replications = self.retirements = 0
        self.stall_total_s = self.stall_max_s = 0.0

    def resync(self, placements: list[tuple[list[int], list[int]]]) -> None:
        """Take the workers' maps as they are (after a rebuild); planned moves are dropped."""
        for layer, (phy2log, _) in zip(self.layers, placements):
            layer.phy2log = np.asarray(phy2log, dtype=np.int64)
        self._queue.clear()

    def observe(self, logical: list[list[int]]) -> None:
        counts = np.asarray(logical, dtype=np.float64)  # [L_moe, E]
        self._window.append(counts)
        self._sum += counts
        if len(self._window) > self.settings.window:
            self._sum -= self._window.popleft()

    def window_load(self) -> np.ndarray:
        """[L_moe, E] tokens routed over the window."""
        return self._sum.copy()

    def plan(self) -> list[Move]:
        """One move per layer that needs one, from the window's load."""
        load = self.window_load()
        moves = []
        for i, placement in enumerate(self.layers):
            move = plan_layer(i, placement, load[i], self.settings.threshold)
            if move is not None:
                moves.append(move)
        return moves

    def between_steps(self, core: EngineCore, stats: EngineStats) -> None:
        if stats.expert_load is not None and stats.expert_load.num_tokens:
            self.observe(stats.expert_load.logical)
            self._steps += 1
        if self._queue:
            self.apply(core, self._queue.popleft())
        elif self._steps >= min(self.settings.window, self.settings.interval) and \
                self._steps % self.settings.interval == 0:
            self._queue.extend(self.plan())

    def apply(self, core: EngineCore, move: Move) -> None:
        """Make one move on every worker and in the mirror; the copy's time is the step's stall."""
        start = time.monotonic()
        if move.retire_slot is not None and move.slot == move.retire_slot:
            core.executor.collective_rpc("retire_replica", move.layer, move.retire_slot)
        if move.expert is not None:
            core.executor.collective_rpc("replicate_expert", move.layer, move.expert, move.slot)
        if move.retire_slot is not None and move.slot != move.retire_slot:
            core.executor.collective_rpc("retire_replica", move.layer, move.retire_slot)
        stall = time.monotonic() - start
        self.layers[move.layer].apply(move)
        if move.expert is not None:
            self.replications += 1
            self.stall_total_s += stall
            self.stall_max_s = max(self.stall_max_s, stall)
        if move.retire_slot is not None:
            self.retirements += 1
        logger.debug("replication: %s in %.2f ms", move, 1e3 * stall)

    def stats(self) -> ReplicationStats:
        load = self.window_load()
        now, home = [], []
        for i, placement in enumerate(self.layers):
            now.append(balancedness(placement.group_loads(load[i])))
            home.append(balancedness(self.home[i].group_loads(load[i])))
        replicas = [np.bincount(p.phy2log[p.phy2log >= 0], minlength=self.num_experts).tolist() for p in self.layers]
        return ReplicationStats(replicas=replicas, balancedness=now, balancedness_home=home,
                                num_replications=self.replications, num_retirements=self.retirements,
                                stall_seconds_total=self.stall_total_s, stall_seconds_max=self.stall_max_s)
