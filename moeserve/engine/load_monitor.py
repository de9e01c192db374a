"""LoadMonitor: turns each step's ExpertLoad into running totals and smoothed balance figures.

Shape legend: L_moe MoE layers, E logical experts. Everything stays in tensors updated with
one add per step (no loop over layers or experts); Python lists are made only when someone
reads them (a Prometheus scrape).
"""

from __future__ import annotations

import torch

from moeserve.model.moe import ExpertLoad


class LoadMonitor:
    """routed_tokens [L_moe, E]: tokens routed to each expert since start (K per token);
    layer_tokens [L_moe]: tokens that entered each layer. Balancedness = mean / max of an
    exponential moving average of per-step expert counts (1.0 = perfectly even)."""

    def __init__(self, num_moe_layers: int, num_experts: int, device: torch.device | str, alpha: float = 0.1):
        self.alpha = alpha
        self.routed_tokens = torch.zeros(num_moe_layers, num_experts, dtype=torch.int64, device=device)
        self.layer_tokens = torch.zeros(num_moe_layers, dtype=torch.int64, device=device)
        self.entropy_sum = torch.zeros(num_moe_layers, dtype=torch.float64, device=device)
        self._ema = torch.zeros(num_moe_layers, num_experts, dtype=torch.float32, device=device)

    def update(self, load: ExpertLoad) -> None:
        if load.num_tokens == 0:
            return
        self.routed_tokens += load.logical
        self.layer_tokens += load.num_tokens
        self.entropy_sum += load.gate_entropy.double()
        self._ema.mul_(1 - self.alpha).add_(load.logical.float(), alpha=self.alpha)

    def balancedness(self) -> list[float]:
        peak = self._ema.max(dim=1).values
        return torch.where(peak > 0, self._ema.mean(dim=1) / peak.clamp(min=1e-12), 1.0).tolist()

    def mean_gate_entropy(self) -> list[float]:
        """Mean entropy (nats) of the gate's softmax per token since start, per layer."""
        return (self.entropy_sum / self.layer_tokens.clamp(min=1)).tolist()
