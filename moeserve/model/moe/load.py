"""Load accounting: tokens routed per logical expert and per physical slot, per MoE layer.

Shape legend: L_moe MoE layers (indexed by MoE layer, not decoder layer), E experts, P slots.
Counts are int64 device tensors of fixed shape filled with index_add_ (no Python loop, and no
op that reads device data on the host: bincount would, to size its output); the row sums of
one step equal (K in force) x (tokens in the step). Each counter has one extra column for the
"no expert" / "no slot" sentinel (E, P), so inactive choices need no masking; it is never read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ExpertLoad:
    """One step's routed-token counts (a snapshot, safe to hand to another stage)."""

    logical: torch.Tensor  # [L_moe, E] int64
    physical: torch.Tensor  # [L_moe, P] int64
    gate_entropy: torch.Tensor  # [L_moe] fp32, summed over the step's tokens (nats)
    num_tokens: int  # tokens that entered each MoE layer
    overflow: torch.Tensor  # [L_moe, 2] int64: token-slots re-routed, dropped by the capacity factor


class LoadRecorder(nn.Module):
    """Per-step counters the MoE layers add into; zeroed at the start of every forward.
    With `enabled` False the layers record nothing and the counters stay zero."""

    def __init__(self, num_moe_layers: int, num_experts: int, num_slots: int, enabled: bool = True):
        super().__init__()
        self.num_experts, self.num_slots = num_experts, num_slots
        self.enabled = enabled
        self.register_buffer("logical", torch.zeros(num_moe_layers, num_experts + 1, dtype=torch.int64))
        self.register_buffer("physical", torch.zeros(num_moe_layers, num_slots + 1, dtype=torch.int64))
        self.register_buffer("entropy", torch.zeros(num_moe_layers, dtype=torch.float32))
        self.register_buffer("overflow", torch.zeros(num_moe_layers, 2, dtype=torch.int64))
        self.num_tokens = 0

    def begin_step(self) -> None:
        if self.enabled:
            self.reset_state()

    def reset_state(self) -> None:
        self.logical.zero_()
        self.physical.zero_()
        self.entropy.zero_()
        self.overflow.zero_()
        self.num_tokens = 0

    def record(self, moe_layer: int, expert_ids: torch.Tensor, slots: torch.Tensor, logits: torch.Tensor,
               router_ids: torch.Tensor | None = None) -> None:
        """expert_ids [T, K] in [0, E], slots [T, K] in [0, P] (the sentinels E and P land in the
        extra column), gate logits [T, E]; the gate entropy counts the rows the router chose an
        expert for (`router_ids` [T, K], its choice before any capacity drop; default
        expert_ids)."""
        if not self.enabled:
            return
        ids, slot_ids = expert_ids.reshape(-1), slots.reshape(-1)  # [T*K] x2
        self.logical[moe_layer].index_add_(0, ids, torch.ones_like(ids))
        self.physical[moe_layer].index_add_(0, slot_ids, torch.ones_like(slot_ids))
        logp = torch.log_softmax(logits.float(), dim=-1)  # [T, E]
        chosen = expert_ids if router_ids is None else router_ids
        routed = (chosen < self.num_experts).any(dim=-1)  # [T]: rows run at K = 0 (padding) count nothing
        self.entropy[moe_layer] += (-(logp.exp() * logp).sum(dim=-1) * routed).sum()
        if moe_layer == 0:  # micro-batches of one step add up
            self.num_tokens += expert_ids.shape[0]

    def record_overflow(self, moe_layer: int, rerouted: torch.Tensor, dropped: torch.Tensor) -> None:
        """Device scalars from the capacity factor (no host read)."""
        if self.enabled:
            self.overflow[moe_layer, 0] += rerouted
            self.overflow[moe_layer, 1] += dropped

    def snapshot(self) -> ExpertLoad:
        return ExpertLoad(logical=self.logical[:, : self.num_experts].clone(),
                          physical=self.physical[:, : self.num_slots].clone(),
                          gate_entropy=self.entropy.clone(), num_tokens=self.num_tokens,
                          overflow=self.overflow.clone())
