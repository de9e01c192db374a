"""Placement: logical experts -> physical weight slots (and slots -> ranks).

Shape legend: T tokens, K experts per token, E logical experts, P physical slots (E + spares),
R = P - E + 1, the most replicas one expert can have.

Maps (int64 buffers, fixed shapes, updated in place so captured graphs stay valid):
    phy2log [P]     expert held by each slot, -1 for an empty spare
    log2phy [E, R]  slots holding each expert; the first replica_count[e] entries are valid
    replica_count [E]
    slot_rank [P]   worker that owns each slot (0 on one worker)
A token's choice of expert e goes to replica (token index mod replica_count[e]): deterministic,
needs no communication, and spreads a hot expert's tokens evenly over its copies.
"""

from __future__ import annotations

import torch
from torch import nn


class ExpertPlacement(nn.Module):
    """Identity placement at start (slot e holds expert e); spares are filled by `add_replica`."""

    def __init__(self, num_experts: int, num_slots: int):
        super().__init__()
        if num_slots < num_experts:
            raise ValueError(f"num_slots={num_slots} < num_experts={num_experts}")
        self.num_experts, self.num_slots = num_experts, num_slots
        R = num_slots - num_experts + 1
        self.register_buffer("phy2log", torch.empty(num_slots, dtype=torch.int64))
        self.register_buffer("log2phy", torch.empty(num_experts, R, dtype=torch.int64))
        self.register_buffer("replica_count", torch.empty(num_experts, dtype=torch.int64))
        self.register_buffer("slot_rank", torch.empty(num_slots, dtype=torch.int64))
        self.reset_state()

    def reset_state(self) -> None:
        E = self.num_experts
        self.phy2log.fill_(-1)
        self.phy2log[:E] = torch.arange(E)
        self.log2phy.fill_(-1)
        self.log2phy[:, 0] = torch.arange(E)
        self.replica_count.fill_(1)
        self.slot_rank.zero_()

    def slots_for(self, expert_ids: torch.Tensor) -> torch.Tensor:
        """expert_ids [T, K] in [0, E] (E = no expert) -> slots [T, K] in [0, P] (P = no slot)."""
        E, T = self.num_experts, expert_ids.shape[0]
        active = expert_ids < E
        ids = expert_ids.clamp(max=E - 1)
        token = torch.arange(T, device=expert_ids.device)[:, None]  # [T, 1]
        replica = token % self.replica_count[ids]  # [T, K]
        return torch.where(active, self.log2phy[ids, replica], self.num_slots)

    def add_replica(self, expert: int, slot: int) -> None:
        """Publish `slot` as one more copy of `expert`; its weights must already be in place."""
        if self.phy2log[slot] >= 0:
            raise ValueError(f"slot {slot} already holds expert {int(self.phy2log[slot])}")
        n = int(self.replica_count[expert])
        self.phy2log[slot] = expert
        self.log2phy[expert, n] = slot
        self.replica_count[expert] = n + 1

    def remove_replica(self, slot: int) -> None:
        """Retire a copy; an expert's last copy cannot be removed."""
        expert = int(self.phy2log[slot])
        n = int(self.replica_count[expert]) if expert >= 0 else 0
        if n <= 1:
            raise ValueError(f"slot {slot} is empty or holds the last copy of expert {expert}")
        row = [s for s in self.log2phy[expert, :n].tolist() if s != slot]
        self.log2phy[expert].fill_(-1)
        self.log2phy[expert, : n - 1] = torch.tensor(row)
        self.replica_count[expert] = n - 1
        self.phy2log[slot] = -1
