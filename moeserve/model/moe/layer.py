"""SparseMoE: router -> capacity (optional) -> placement -> dispatch/experts/combine -> load
accounting (+ shared expert).

Shape legend: T tokens, D hidden, E logical experts, P physical slots, K experts per token,
I expert intermediate size.
"""

from __future__ import annotations

from collections.abc import Generator

import torch
import torch.nn.functional as F
from torch import nn

from moeserve.model import cpu_gemm
from moeserve.model_config import ModelConfig
from moeserve.model.layers import GatedMLP
from moeserve.model.moe.experts import ExpertBackend
from moeserve.model.moe.load import LoadRecorder
from moeserve.model.moe.capacity import OVERFLOW_MODES, apply_capacity
from moeserve.model.moe.dispatch import ExpertParallelGroup, dispatch_combine, dispatch_combine_steps, run_to_end, wire
from moeserve.model.moe.placement import ExpertPlacement, SlotLayout
from moeserve.model.moe.router import Router


class SparseMoE(nn.Module):
    """Expert weights live in physical-slot tensors w13 [P, 2I, D] and w2 [P, D, I] (and, for
    GPT-OSS, biases b13 [P, 2I] and b2 [P, D]); slot s holds the weights of
    placement.phy2log[s]. A shared expert is a dense path added for every token, gated by
    sigmoid(shared_expert_gate(x)) (Qwen2-MoE) or not (DeepSeek's shared_experts); it is
    outside counts, placement and K.
    With `capacity_factor` set, the routing passes through capacity.apply_capacity first (off:
    exact semantics).
    """

    def __init__(self, config: ModelConfig, moe_layer: int, layout: SlotLayout, backend: ExpertBackend,
                 ep: ExpertParallelGroup | None = None):
        super().__init__()
        D, I, E = config.hidden_size, config.moe_intermediate_size, config.num_experts
        self.ep = ep
        self.slot_offset = ep.slot_offset if ep else 0  # global slot of local slot 0
        num_slots = ep.num_local_slots if ep else layout.num_slots  # the slots whose weights live here
        self.moe_layer = moe_layer
        self.intermediate_size = I
        self.gate = Router(D, E, config.top_k, config.renormalize, config.router_weights_fp32,
                           select=backend.select_experts, spec=config.router)
        self.w13 = nn.Parameter(torch.empty(num_slots, 2 * I, D), requires_grad=False)  # [P_local, 2I, D]
        self.w2 = nn.Parameter(torch.empty(num_slots, D, I), requires_grad=False)  # [P_local, D, I]
        self.act = config.expert_activation
        self.b13 = self.b2 = None
        if config.expert_bias:
            self.b13 = nn.Parameter(torch.empty(num_slots, 2 * I), requires_grad=False)  # [P_local, 2I]
            self.b2 = nn.Parameter(torch.empty(num_slots, D), requires_grad=False)  # [P_local, D]
        if not backend.supports(self.act, config.expert_bias):
            raise ValueError(f"the {backend.name} moe backend cannot compute {config.architecture}'s experts "
                             f"({self.act.kind}{', with biases' if config.expert_bias else ''}); use --moe-backend torch")
        self.placement = ExpertPlacement(layout)
        self.capacity_factor: float | None = None
        self.overflow = "reroute"
        self.backend = backend
        self.packed: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per local slot (w13, w2), see pack()
        self.shared_expert: GatedMLP | None = None
        self.shared_expert_gate: nn.Linear | None = None
        if config.shared_expert_intermediate_size:
            self.shared_expert = GatedMLP(D, config.shared_expert_intermediate_size)
            if config.shared_expert_gated:
                self.shared_expert_gate = nn.Linear(D, 1, bias=False)

    def forward(self, x: torch.Tensor, k: torch.Tensor, load: LoadRecorder) -> torch.Tensor:
        return run_to_end(self.steps(x, k, load))

    def steps(self, x: torch.Tensor, k: torch.Tensor, load: LoadRecorder,
              trace=None) -> Generator[str, None, torch.Tensor]:
        """The layer as a staged computation: x [T, D] -> out [T, D]. Under expert parallelism
        it yields right after issuing its dispatch and its combine all-to-all (see
        dispatch.dispatch_combine_steps); on one worker it never yields."""
        routing = self.gate(x, k)  # ids/weights [T, K]
        expert_ids = routing.expert_ids  # [T, K]
        if self.capacity_factor is not None:
            limited = apply_capacity(expert_ids, routing.logits, self.capacity_factor, self.overflow)
            expert_ids = limited.expert_ids
            load.record_overflow(self.moe_layer, limited.rerouted, limited.dropped)
        slots = self.placement.slots_for(expert_ids)  # [T, K]
        load.record(self.moe_layer, expert_ids, slots, routing.logits, routing.expert_ids)
        if self.ep is None:
            out = self.backend(x, slots, routing.weights, self.w13, self.w2, self.act, self.b13, self.b2,
                               self.packed)  # [T, D]
        else:
            out = yield from dispatch_combine_steps(x, slots, routing.weights, self.placement.slot_rank, self.ep,
                                                    self._local_experts, trace)
        if self.shared_expert_gate is not None:
            out = out + F.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        elif self.shared_expert is not None:
            out = out + self.shared_expert(x)
        return out

    def _local_experts(self, rows: torch.Tensor, local_slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.backend(rows, local_slots, weights, self.w13, self.w2, self.act, self.b13, self.b2, self.packed)

    def weight_elements(self) -> int:
        """Elements of one slot's smaller weight (what decides whether packing pays)."""
        return min(self.w13[0].numel(), self.w2[0].numel()) if self.w13.shape[0] else 0

    def pack(self) -> None:
        """Keep oneDNN-packed copies of every local slot's w13/w2 (model/cpu_gemm.py), which the
        torch backend then multiplies with; `repack(slot)` after a slot's weights change."""
        self.packed = [(cpu_gemm.pack(self.w13[i]), cpu_gemm.pack(self.w2[i])) for i in range(self.w13.shape[0])]

    def repack(self, local_slot: int) -> None:
        """The weights of `local_slot` changed: make its packed copies again (no-op when the
        slots are not packed)."""
        if self.packed is not None:
            self.packed[local_slot] = (cpu_gemm.pack(self.w13[local_slot]), cpu_gemm.pack(self.w2[local_slot]))

    def slot_tensors(self) -> list[torch.Tensor]:
        """Every per-slot tensor (dim 0 = local slot): what a replica copies."""
        return [t for t in (self.w13, self.w2, self.b13, self.b2) if t is not None]

    def forward_idle(self, x: torch.Tensor) -> None:
        """A worker with no tokens this step: join the layer's collectives with nothing to send
        (in the dtypes a busy worker sends: every rank must pass the same dtype to a collective)."""
        K = self.gate.top_k
        empty = torch.empty(0, K, dtype=torch.int64, device=x.device)
        weights = torch.empty(0, K, dtype=torch.float32 if self.gate.weights_fp32 else x.dtype, device=x.device)
        dispatch_combine(x[:0], empty, weights, self.placement.slot_rank, self.ep, self._local_experts)

    def local(self, slot: int) -> int | None:
        """The index of global `slot` in this worker's tensors, None when another worker owns it."""
        i = slot - self.slot_offset
        return i if 0 <= i < self.w13.shape[0] else None

    def set_capacity(self, capacity_factor: float | None, overflow: str = "reroute") -> None:
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(f"capacity factor must be > 0, got {capacity_factor}")
        if overflow not in OVERFLOW_MODES:
            raise ValueError(f"overflow must be one of {OVERFLOW_MODES}, got {overflow!r}")
        spec = self.gate.spec
        if capacity_factor is not None and overflow == "reroute" and (spec.group_select != "none"
                                                                      or spec.correction_bias):
            # Re-routing ranks the raw gate logits: it would ignore the group limit and the bias.
            raise ValueError("capacity re-routing does not follow group-limited routing (DeepSeek); "
                             "use --moe-overflow drop")
        self.capacity_factor, self.overflow = capacity_factor, overflow

    @torch.no_grad()
    def replicate(self, expert: int, slot: int) -> None:
        """Copy `expert`'s weights into the empty `slot`, then publish the new map (in that order,
        so no step can route to a slot whose weights are not there yet). Under expert parallelism
        every worker calls this: the owner of a copy sends it over the data-plane group to the
        owner of `slot` (a local copy when they are the same), and every worker updates its map."""
        if int(self.placement.phy2log[slot]) >= 0:
            raise ValueError(f"slot {slot} already holds expert {int(self.placement.phy2log[slot])}")
        source = int(self.placement.log2phy[expert, 0])
        src, dst = self.local(source), self.local(slot)
        if self.ep is None or (src is not None and dst is not None):
            for t in self.slot_tensors():
                t[dst].copy_(t[src])
            self.repack(dst)
        elif src is not None:
            to = int(self.placement.slot_rank[slot])
            for t in self.slot_tensors():
                torch.distributed.send(wire(t[src].contiguous()), to, group=self.ep.group)
        elif dst is not None:
            frm = int(self.placement.slot_rank[source])
            for t in (t[dst] for t in self.slot_tensors()):
                buf = torch.empty_like(t)
                torch.distributed.recv(wire(buf), frm, group=self.ep.group)
                t.copy_(buf)
            self.repack(dst)
        self.placement.add_replica(expert, slot)

    def retire(self, slot: int) -> None:
        """Unpublish one copy (never the last); its weights stay until the slot is reused."""
        self.placement.remove_replica(slot)
