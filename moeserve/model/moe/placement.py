"""Placement: logical experts -> physical weight slots, and slots -> slot groups (ranks).

Shape legend: T tokens, K experts per token, E logical experts, P physical slots (E + spares),
G slot groups, R = P - E + 1, the most replicas one expert can have.

Slots are laid out group-major (`SlotLayout`): group g holds a contiguous run of experts and
then its share of the spares, so a group is one contiguous block of the slot tensors (what an
expert-parallel rank owns). With one group the layout is the identity: slot e holds expert e,
spares come last.

Maps (int64 buffers, fixed shapes, updated in place so captured graphs stay valid):
    phy2log [P]     expert held by each slot, -1 for an empty spare
    log2phy [E, R]  slots holding each expert; the first replica_count[e] entries are valid
    replica_count [E]
    slot_rank [P]   slot group (rank) that owns each slot
A token's choice of expert e goes to replica (token index mod replica_count[e]): deterministic,
needs no communication, and spreads a hot expert's tokens evenly over its copies.

Every update writes the maps in an order such that a reader (a forward between any two writes)
only ever routes to a slot that holds the expert's weights: see add_replica / remove_replica.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class SlotLayout:
    """Where experts and spares start: `home_slot[e]` holds expert e, `slot_group[s]` owns slot s.
    Group g gets experts [E*g//G, E*(g+1)//G) and spares [N*g//G, N*(g+1)//G) (N = P - E), so
    uneven splits differ by at most one."""

    num_experts: int
    num_slots: int
    num_groups: int = 1

    def __post_init__(self) -> None:
        if self.num_slots < self.num_experts:
            raise ValueError(f"num_slots={self.num_slots} < num_experts={self.num_experts}")
        if not 1 <= self.num_groups <= self.num_experts:
            raise ValueError(f"slot groups must lie in [1, {self.num_experts}] (one expert each at least), "
                             f"got {self.num_groups}")

    def _bounds(self, g: int) -> tuple[int, int, int, int]:
        """(first slot, experts, spares, first expert) of group g."""
        E, N, G = self.num_experts, self.num_slots - self.num_experts, self.num_groups
        first_expert, experts = E * g // G, E * (g + 1) // G - E * g // G
        first_spare, spares = N * g // G, N * (g + 1) // G - N * g // G
        return first_expert + first_spare, experts, spares, first_expert

    def group_slots(self, g: int) -> tuple[int, int]:
        """(first slot, number of slots) of group g."""
        start, experts, spares, _ = self._bounds(g)
        return start, experts + spares

    @property
    def home_slot(self) -> list[int]:
        out = []
        for g in range(self.num_groups):
            start, experts, _, _ = self._bounds(g)
            out += range(start, start + experts)
        return out

    @property
    def slot_group(self) -> list[int]:
        out = []
        for g in range(self.num_groups):
            _, experts, spares, _ = self._bounds(g)
            out += [g] * (experts + spares)
        return out

    @property
    def initial_phy2log(self) -> list[int]:
        out = []
        for g in range(self.num_groups):
            _, experts, spares, first = self._bounds(g)
            out += list(range(first, first + experts)) + [-1] * spares
        return out


class ExpertPlacement(nn.Module):
    """The layout's placement at start (each expert in its home slot, spares empty); spares are
    filled by `add_replica` and emptied by `remove_replica`."""

    def __init__(self, layout: SlotLayout):
        super().__init__()
        self.layout = layout
        self.num_experts, self.num_slots = layout.num_experts, layout.num_slots
        R = layout.num_slots - layout.num_experts + 1
        self.register_buffer("phy2log", torch.empty(self.num_slots, dtype=torch.int64))
        self.register_buffer("log2phy", torch.empty(self.num_experts, R, dtype=torch.int64))
        self.register_buffer("replica_count", torch.empty(self.num_experts, dtype=torch.int64))
        self.register_buffer("slot_rank", torch.empty(self.num_slots, dtype=torch.int64))
        self.reset_state()

    def reset_state(self) -> None:
        layout = self.layout
        self.phy2log.copy_(torch.tensor(layout.initial_phy2log))
        self.log2phy.fill_(-1)
        self.log2phy[:, 0] = torch.tensor(layout.home_slot)
        self.replica_count.fill_(1)
        self.slot_rank.copy_(torch.tensor(layout.slot_group))

    def slots_for(self, expert_ids: torch.Tensor) -> torch.Tensor:
        """expert_ids [T, K] in [0, E] (E = no expert) -> slots [T, K] in [0, P] (P = no slot)."""
        E, T = self.num_experts, expert_ids.shape[0]
        active = expert_ids < E
        ids = expert_ids.clamp(max=E - 1)
        token = torch.arange(T, device=expert_ids.device)[:, None]  # [T, 1]
        replica = token % self.replica_count[ids]  # [T, K]
        return torch.where(active, self.log2phy[ids, replica], self.num_slots)

    def add_replica(self, expert: int, slot: int) -> None:
        """Publish `slot` as one more copy of `expert`; its weights must already be in place.
        Order: the new row entry (invisible: beyond the count), then the count (now routable),
        then phy2log (bookkeeping only)."""
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert {expert} is not in [0, {self.num_experts})")
        if self.phy2log[slot] >= 0:
            raise ValueError(f"slot {slot} already holds expert {int(self.phy2log[slot])}")
        n = int(self.replica_count[expert])
        self.log2phy[expert, n] = slot
        self.replica_count[expert] = n + 1
        self.phy2log[slot] = expert

    def remove_replica(self, slot: int) -> None:
        """Retire a copy; an expert's last copy cannot be removed. Order: the row's last valid
        entry overwrites the retired one (both entries then name a valid copy), the count drops
        (the duplicate falls out of range), and only then is the slot marked empty and its row
        entry cleared, so no intermediate state routes a token to the retired slot's successor
        weights or to an empty slot."""
        expert = int(self.phy2log[slot])
        n = int(self.replica_count[expert]) if expert >= 0 else 0
        if n <= 1:
            raise ValueError(f"slot {slot} is empty or holds the last copy of expert {expert}")
        row = self.log2phy[expert, :n].tolist()
        i = row.index(slot)
        if i != n - 1:
            self.log2phy[expert, i] = row[n - 1]
        self.replica_count[expert] = n - 1
        self.log2phy[expert, n - 1] = -1
        self.phy2log[slot] = -1
