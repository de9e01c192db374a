"""SparseMoE: router -> placement -> dispatch/experts/combine -> load accounting (+ shared expert).

Shape legend: T tokens, D hidden, E logical experts, P physical slots, K experts per token,
I expert intermediate size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moeserve.model_config import ModelConfig
from moeserve.model.layers import GatedMLP
from moeserve.model.moe.experts import ExpertBackend
from moeserve.model.moe.load import LoadRecorder
from moeserve.model.moe.placement import ExpertPlacement
from moeserve.model.moe.router import Router


class SparseMoE(nn.Module):
    """Expert weights live in physical-slot tensors w13 [P, 2I, D] and w2 [P, D, I]; slot s holds
    the weights of placement.phy2log[s]. A shared expert (Qwen2-MoE) is a dense path added for
    every token, gated by sigmoid(shared_expert_gate(x)); it is outside counts, placement and K.
    """

    def __init__(self, config: ModelConfig, moe_layer: int, num_slots: int, backend: ExpertBackend):
        super().__init__()
        D, I, E = config.hidden_size, config.moe_intermediate_size, config.num_experts
        self.moe_layer = moe_layer
        self.intermediate_size = I
        self.gate = Router(D, E, config.top_k, config.renormalize, config.router_weights_fp32,
                           select=backend.select_experts)
        self.w13 = nn.Parameter(torch.empty(num_slots, 2 * I, D), requires_grad=False)  # [P, 2I, D]
        self.w2 = nn.Parameter(torch.empty(num_slots, D, I), requires_grad=False)  # [P, D, I]
        self.placement = ExpertPlacement(E, num_slots)
        self.backend = backend
        self.shared_expert: GatedMLP | None = None
        if config.shared_expert_intermediate_size:
            self.shared_expert = GatedMLP(D, config.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(D, 1, bias=False)

    def forward(self, x: torch.Tensor, k: torch.Tensor, load: LoadRecorder) -> torch.Tensor:
        routing = self.gate(x, k)  # ids/weights [T, K]
        slots = self.placement.slots_for(routing.expert_ids)  # [T, K]
        load.record(self.moe_layer, routing.expert_ids, slots, routing.logits)
        out = self.backend(x, slots, routing.weights, self.w13, self.w2)  # [T, D]
        if self.shared_expert is not None:
            out = out + F.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out

    @torch.no_grad()
    def replicate(self, expert: int, slot: int) -> None:
        """Copy `expert`'s weights into the empty `slot`, then publish the new map (in that order,
        so no step can route to a slot whose weights are not there yet)."""
        source = int(self.placement.log2phy[expert, 0])
        self.w13[slot].copy_(self.w13[source])
        self.w2[slot].copy_(self.w2[source])
        self.placement.add_replica(expert, slot)
