"""Offline replay: what would a new router config have earned on the logged traffic?

Inverse propensity scoring over the audit log. Each logged routed request i carries its
context x_i (features), the profile the logging policy chose a_i with propensity p_i, and its
reward r_i. The new config's policy gives pi(a_i | x_i) (its rules, then its bandit's
epsilon-greedy choice with the bandit state it would start from), and

    V_ips = mean_i  pi(a_i | x_i) / p_i * r_i,    95% interval V_ips +- 1.96 * sd / sqrt(n)

Unbiased when every profile the new policy may choose had p > 0 under the logging policy. A
logged choice the new config no longer has is a term of 0 (the new policy never makes it).
Requests refused by the gate, rejected or rerouted by budgets, or failed by the engine are not
policy decisions and are left out (counted in `skipped`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from moeserve.router import rules as rule_stage
from moeserve.router.audit import read_audit
from moeserve.router.bandit import LinUCB
from moeserve.router.config import RouterConfig
from moeserve.router.features import RequestFeatures


def new_policy_probability(config: RouterConfig, bandit: LinUCB, features: RequestFeatures, profile: str) -> float:
    decision = rule_stage.decide(config.rules, features, config.names)
    if profile not in decision.candidates:
        return 0.0
    if len(decision.candidates) == 1:
        return 1.0
    return bandit.propensity(profile, features.vector(), decision.candidates)


def replay(records: list[dict[str, Any]], config: RouterConfig) -> dict[str, Any]:
    bandit = LinUCB(config.names, config.bandit)  # its starting state, read (only `update` writes it)
    terms, logged, skipped = [], [], 0
    for rec in records:
        usable = (rec.get("reward") is not None and rec.get("propensity") and rec.get("features")
                  and rec.get("budget_action") is None and rec.get("choice"))
        if not usable:
            skipped += 1
            continue
        features = RequestFeatures(**rec["features"])
        pi = new_policy_probability(config, bandit, features, rec["choice"]) if rec["choice"] in config.names else 0.0
        terms.append(pi / rec["propensity"] * rec["reward"])
        logged.append(rec["reward"])
    n = len(terms)
    if n == 0:
        return {"n": 0, "skipped": skipped, "estimate": None, "ci95": None, "logged_mean_reward": None}
    mean = sum(terms) / n
    sd = math.sqrt(sum((t - mean) ** 2 for t in terms) / (n - 1)) if n > 1 else 0.0
    half = 1.96 * sd / math.sqrt(n)
    return {"n": n, "skipped": skipped, "estimate": mean, "ci95": [mean - half, mean + half],
            "logged_mean_reward": sum(logged) / n, "config_version": config.version}


def replay_file(audit_path: str | Path, config_path: str | Path) -> dict[str, Any]:
    return replay(read_audit(audit_path), RouterConfig.load(config_path))
