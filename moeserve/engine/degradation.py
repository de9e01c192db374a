"""DegradationController: under load, run the lowest priority classes with fewer experts per token.

A controller of the EngineCore (it runs between steps with the step's EngineStats). Pressure is
the worst of three ratios to their targets:

    ttft   p90 of the engine-side TTFT of recent requests          / slo_ttft
    tpot   smoothed step time (every running request waits for it) / slo_tpot
    queue  time to prefill the tokens waiting, on the engine's fitted step-time line / slo_ttft

The state is a level: how many of the classes present (a larger priority number is a lower
class, as in vLLM) run at `k` experts per token, lowest first. The level rises by one while the
pressure is above `enter`, falls by one while it is below `leave` (< enter: hysteresis), and
never changes twice within `dwell` seconds, so a load that hovers near a threshold does not make
it flap. With no pressure left it returns, one class at a time, to every request's own K.
`force-k1` runs every class at K = 1 from the start; `off` never touches K.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from moeserve.engine.messages import EngineStats

MODES = ("off", "auto", "force-k1")


@dataclass(frozen=True)
class ClassLimits:
    """The K each priority class may run at: classes >= `from_priority` (the lower ones) at most
    `k`; the others at their request's K."""

    from_priority: float | None = None  # None: no limit; -inf: every class
    k: int = 1

    def k_for(self, priority: int, requested: int) -> int:
        if self.from_priority is not None and priority >= self.from_priority:
            return min(self.k, requested)
        return requested


@dataclass(frozen=True)
class DegradationSettings:
    mode: str = "off"
    k: int = 1
    slo_ttft: float = 1.0
    slo_tpot: float = 0.1
    enter: float = 1.0
    leave: float = 0.7
    dwell: float = 5.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"degradation must be one of {MODES}, got {self.mode!r}")
        if self.k < 1 or self.slo_ttft <= 0 or self.slo_tpot <= 0 or self.dwell < 0:
            raise ValueError("degradation k must be >= 1, its SLOs > 0 and its dwell >= 0")
        if not 0 < self.leave < self.enter:
            raise ValueError(f"degradation needs 0 < leave < enter, got leave={self.leave}, enter={self.enter}")


class LimitsSink(Protocol):
    def set_class_limits(self, limits: ClassLimits) -> None: ...


class DegradationController:
    def __init__(self, settings: DegradationSettings, step_time_alpha: float = 0.1):
        self.settings = settings
        self.level = 0
        self.transitions = 0
        self._last_change = -math.inf
        self._step_time = 0.0
        self._alpha = step_time_alpha
        self.limits = ClassLimits(-math.inf, settings.k) if settings.mode == "force-k1" else ClassLimits()

    def pressure(self, stats: EngineStats) -> float:
        s = self.settings
        if stats.num_decode_tokens:
            self._step_time = (1 - self._alpha) * self._step_time + self._alpha * stats.step_time_s
        queue_s = stats.step_time_per_token_s * stats.num_waiting_tokens
        return max(stats.recent_ttft_s / s.slo_ttft, self._step_time / s.slo_tpot, queue_s / s.slo_ttft)

    def between_steps(self, core: LimitsSink, stats: EngineStats) -> None:
        s = self.settings
        if s.mode != "auto":
            return
        pressure = self.pressure(stats)
        classes = sorted(stats.top_k_by_class, reverse=True)  # lowest class first
        level = self.level
        if stats.timestamp - self._last_change >= s.dwell:
            if pressure > s.enter and level < len(classes):
                level += 1
            elif pressure < s.leave and level > 0:
                level -= 1
        if level != self.level:
            self.level, self._last_change = level, stats.timestamp
            self.transitions += 1
        limits = ClassLimits() if self.level == 0 or not classes else \
            ClassLimits(classes[min(self.level, len(classes)) - 1], s.k)
        if limits != self.limits:
            self.limits = limits
            core.set_class_limits(limits)
