"""Capacity factor: at most C = ceil(CF * n / E) token-slots per expert per step (n = the step's
active token-slots, T*K at full K); the rest overflow and are re-routed or dropped.

Shape legend: T tokens, K experts per token (K_max), E logical experts.

Semantics (what `apply_capacity` computes, and what the reference loop in the tests computes):
- Priority: token-slots are served in rounds. Round 0 takes every token's chosen experts; an
  expert accepts its requests in (choice rank k, token index) order up to its room, so every
  first choice comes before any second choice.
- Overflow with `reroute`: a refused token-slot asks, in the next round, for the token's next
  expert in gate-logit order among those it has not chosen nor asked yet (a token with several
  refused slots hands them successive experts, lower choice rank first). Rounds repeat until
  every slot is placed or has run out of experts (then it is dropped).
- Overflow with `drop`: a refused token-slot is dropped (id E, contributes nothing).
- A re-routed slot keeps the routing weight of the choice it replaces, so a token's weights
  still sum as the router made them.
With CF large enough that no expert overflows, the routing is returned unchanged.

No host sync on CUDA: the rounds run a fixed E - 1 times there (each is a handful of small
ops); on the CPU they stop as soon as nothing is pending.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

OVERFLOW_MODES = ("reroute", "drop")


@dataclass(frozen=True)
class CapacityResult:
    expert_ids: torch.Tensor  # [T, K] int64 in [0, E]: where each token-slot runs (E = dropped / inactive)
    rerouted: torch.Tensor  # [] int64: token-slots that run on an expert they did not choose
    dropped: torch.Tensor  # [] int64: active token-slots that run nowhere


def capacity(capacity_factor: float, num_active: torch.Tensor, num_experts: int) -> torch.Tensor:
    """ceil(CF * n / E) as a device scalar (n is a device tensor: no sync)."""
    return torch.ceil(num_active.to(torch.float64) * capacity_factor / num_experts).to(torch.int64)


def apply_capacity(expert_ids: torch.Tensor, logits: torch.Tensor, capacity_factor: float,
                   overflow: str) -> CapacityResult:
    """expert_ids [T, K] in [0, E] (E = inactive), logits [T, E] -> CapacityResult."""
    if overflow not in OVERFLOW_MODES:
        raise ValueError(f"overflow must be one of {OVERFLOW_MODES}, got {overflow!r}")
    T, K = expert_ids.shape
    E = logits.shape[-1]
    device = expert_ids.device
    active = expert_ids < E  # [T, K]
    cap = capacity(capacity_factor, active.sum(), E)  # []
    # alternatives [T, E]: each token's experts in logit order, its chosen ones moved to the end
    chosen = torch.zeros(T, E + 1, dtype=torch.bool, device=device)
    chosen.scatter_(1, expert_ids, True)
    masked = logits.float().masked_fill(chosen[:, :E], float("-inf"))
    alternatives = torch.argsort(masked, dim=-1, descending=True, stable=True)  # [T, E]
    num_alternatives = E - active.sum(dim=1)  # [T]
    next_alt = torch.zeros(T, dtype=torch.int64, device=device)  # [T] first alternative not yet asked

    placed = torch.zeros(E + 1, dtype=torch.int64, device=device)  # token-slots accepted per expert (+ sentinel)
    result = torch.full_like(expert_ids, E)  # [T, K]
    request = expert_ids.clone()  # [T, K] the expert each pending slot asks for this round
    pending = active.clone()  # [T, K]
    # k-major order, so that (k, t) is the flat index order: first choices come first
    order_index = torch.arange(K * T, device=device)
    rounds = E if device.type == "cuda" else E + 1
    for _ in range(rounds):
        asked = torch.where(pending, request, E).t().reshape(-1)  # [K*T] k-major
        by_expert = torch.argsort(asked, stable=True)  # [K*T]
        counts = torch.zeros(E + 1, dtype=torch.int64, device=device).index_add_(0, asked, torch.ones_like(asked))
        starts = torch.cumsum(counts, 0) - counts  # [E+1]
        position = torch.empty_like(asked)
        position[by_expert] = order_index - starts[asked[by_expert]]
        room = (cap - placed).clamp(min=0)  # [E+1]
        accepted_flat = (asked < E) & (position < room[asked])  # [K*T]
        accepted = accepted_flat.reshape(K, T).t()  # [T, K]
        result = torch.where(accepted, request, result)
        placed = placed.index_add_(0, asked, accepted_flat.to(torch.int64))
        refused = pending & ~accepted  # [T, K]
        if overflow == "drop":
            break
        ordinal = torch.cumsum(refused.to(torch.int64), dim=1) - 1  # [T, K] among the token's refused slots
        pick = next_alt[:, None] + ordinal  # [T, K]
        exhausted = pick >= num_alternatives[:, None]
        request = torch.where(refused & ~exhausted,
                              torch.gather(alternatives, 1, pick.clamp(0, E - 1)), E)
        next_alt = next_alt + refused.sum(dim=1)
        pending = refused & ~exhausted
        if device.type != "cuda" and not bool(pending.any()):
            break
    landed = result < E
    rerouted = (landed & (result != expert_ids)).sum()
    dropped = (active & ~landed).sum()
    return CapacityResult(result, rerouted, dropped)

