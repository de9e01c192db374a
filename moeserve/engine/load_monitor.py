"""LoadMonitor (front): each step's ExpertLoadStats -> running totals and smoothed balance figures.

Shape legend: L_moe MoE layers, E logical experts. numpy arrays updated with one add per step
(no loop over layers or experts); lists are made only when someone reads them (a scrape).
"""

from __future__ import annotations

import numpy as np

from moeserve.engine.messages import ExpertLoadStats


class LoadMonitor:
    """routed_tokens [L_moe, E]: tokens routed to each expert since start (K per token);
    layer_tokens [L_moe]: tokens that entered each layer. Balancedness = mean / max of an
    exponential moving average of per-step expert counts (1.0 = perfectly even)."""

    def __init__(self, num_moe_layers: int, num_experts: int, alpha: float = 0.1):
        self.alpha = alpha
        self.routed_tokens = np.zeros((num_moe_layers, num_experts), dtype=np.int64)
        self.layer_tokens = np.zeros(num_moe_layers, dtype=np.int64)
        self.entropy_sum = np.zeros(num_moe_layers, dtype=np.float64)
        self._ema = np.zeros((num_moe_layers, num_experts), dtype=np.float64)
        self.overflow = np.zeros((num_moe_layers, 2), dtype=np.int64)  # re-routed, dropped (capacity factor)

    def update(self, load: ExpertLoadStats) -> None:
        if load.num_tokens == 0:
            return
        counts = np.asarray(load.logical, dtype=np.int64)  # [L_moe, E]
        self.routed_tokens += counts
        self.layer_tokens += load.num_tokens
        self.entropy_sum += np.asarray(load.gate_entropy, dtype=np.float64)
        self._ema *= 1 - self.alpha
        self._ema += self.alpha * counts
        if load.overflow:
            self.overflow += np.asarray(load.overflow, dtype=np.int64)

    def balancedness(self) -> list[float]:
        peak = self._ema.max(axis=1)
        mean = self._ema.mean(axis=1)
        return np.where(peak > 0, mean / np.maximum(peak, 1e-12), 1.0).tolist()

    def cv2(self) -> list[float]:
        """Squared coefficient of variation (variance / mean^2) of the smoothed expert load, per
        layer: 0 = even; the auxiliary-loss papers' imbalance measure."""
        mean = self._ema.mean(axis=1)
        return np.where(mean > 0, self._ema.var(axis=1) / np.maximum(mean, 1e-12) ** 2, 0.0).tolist()

    def mean_gate_entropy(self) -> list[float]:
        """Mean entropy (nats) of the gate's softmax per token since start, per layer."""
        return (self.entropy_sum / np.maximum(self.layer_tokens, 1)).tolist()
