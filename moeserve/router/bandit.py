"""A contextual bandit over the eligible profiles: disjoint LinUCB (one ridge regression of the
reward on the context per profile) with epsilon-uniform exploration, so that every choice is
logged with a propensity > 0 for offline replay (replay.py).

    greedy = argmax_a  theta_a . x + alpha * sqrt(x^T A_a^-1 x)   (ties: the first eligible)
    choice = greedy with probability 1 - eps, else uniform over the eligible
    propensity(a | x) = (1 - eps) [a == greedy] + eps / n_eligible

Seeded (`BanditConfig.seed`): the same requests in the same order make the same choices. The
state (A, b per profile) is written to `state_path` after every update (atomically) and read at
start, so learning survives restarts.
"""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moeserve.router.config import FEATURE_NAMES, BanditConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Choice:
    profile: str
    propensity: float
    greedy: str


class LinUCB:
    def __init__(self, arms: tuple[str, ...], config: BanditConfig, dim: int = len(FEATURE_NAMES)):
        self.config, self.dim = config, dim
        self.rng = random.Random(config.seed)
        self.A = {a: np.eye(dim) for a in arms}
        self.b = {a: np.zeros(dim) for a in arms}
        self.pulls = {a: 0 for a in arms}
        if config.state_path and Path(config.state_path).exists():
            self._load(Path(config.state_path))

    def estimate(self, arm: str, x: list[float]) -> float:
        """The expected reward of `arm` at x under its current regression."""
        theta = np.linalg.solve(self.A[arm], self.b[arm])
        return float(theta @ np.asarray(x))

    def greedy(self, x: list[float], eligible: tuple[str, ...]) -> str:
        v = np.asarray(x)
        best, best_score = eligible[0], -np.inf
        for arm in eligible:
            inv = np.linalg.inv(self.A[arm])
            score = float((inv @ self.b[arm]) @ v + self.config.alpha * np.sqrt(v @ inv @ v))
            if score > best_score + 1e-12:
                best, best_score = arm, score
        return best

    def propensity(self, arm: str, x: list[float], eligible: tuple[str, ...]) -> float:
        eps = self.config.epsilon if len(eligible) > 1 else 0.0
        return (1 - eps) * (arm == self.greedy(x, eligible)) + eps / len(eligible)

    def choose(self, x: list[float], eligible: tuple[str, ...]) -> Choice:
        greedy = self.greedy(x, eligible)
        eps = self.config.epsilon if len(eligible) > 1 else 0.0
        arm = self.rng.choice(eligible) if self.rng.random() < eps else greedy
        return Choice(arm, (1 - eps) * (arm == greedy) + eps / len(eligible), greedy)

    def update(self, arm: str, x: list[float], reward: float) -> None:
        v = np.asarray(x)
        self.A[arm] += np.outer(v, v)
        self.b[arm] += reward * v
        self.pulls[arm] += 1
        if self.config.state_path:
            self._save(Path(self.config.state_path))

    def _save(self, path: Path) -> None:
        state = {"features": list(FEATURE_NAMES), "arms": {
            a: {"A": self.A[a].tolist(), "b": self.b[a].tolist(), "pulls": self.pulls[a]} for a in self.A}}
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("w") as f:
            f.write(json.dumps(state))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def _load(self, path: Path) -> None:
        """Another feature layout or an unreadable file: start over (logged) rather than misread it."""
        try:
            state = json.loads(path.read_text())
            if state.get("features") != list(FEATURE_NAMES):
                raise ValueError(f"features {state.get('features')} are not {list(FEATURE_NAMES)}")
            loaded = {arm: (np.asarray(s["A"], dtype=float).reshape(self.dim, self.dim),
                            np.asarray(s["b"], dtype=float).reshape(self.dim), int(s["pulls"]))
                      for arm, s in state["arms"].items() if arm in self.A}  # a removed profile is forgotten
        except (OSError, ValueError, KeyError, TypeError) as e:
            logger.warning("router: the bandit state %s cannot be used (%s): starting from scratch", path, e)
            return
        for arm, (A, b, pulls) in loaded.items():
            self.A[arm], self.b[arm], self.pulls[arm] = A, b, pulls
