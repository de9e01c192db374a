"""Policy as code: ordered rules (highest priority first, file order among equals) matched on
cheap features; the first match names a profile or a candidate set, no match leaves every
profile a candidate."""

from __future__ import annotations

from dataclasses import dataclass

from moeserve.router.config import Rule
from moeserve.router.features import RequestFeatures


@dataclass(frozen=True)
class RuleDecision:
    rule: str | None  # the matching rule, None: no rule matched
    candidates: tuple[str, ...]  # one name when the rule names a profile


def matches(rule: Rule, f: RequestFeatures) -> bool:
    w = rule.when
    if "min_prompt_tokens" in w and f.prompt_tokens < w["min_prompt_tokens"]:
        return False
    if "max_prompt_tokens" in w and f.prompt_tokens > w["max_prompt_tokens"]:
        return False
    for key in ("has_code", "wants_json"):
        if key in w and bool(w[key]) != getattr(f, key):
            return False
    if "tenant" in w:
        tenants = w["tenant"] if isinstance(w["tenant"], list) else [w["tenant"]]
        if f.tenant not in tenants:
            return False
    return "language" not in w or w["language"] == f.language


def decide(rules: tuple[Rule, ...], f: RequestFeatures, all_profiles: tuple[str, ...]) -> RuleDecision:
    for rule in rules:
        if matches(rule, f):
            return RuleDecision(rule.name, (rule.profile,) if rule.profile else rule.candidates)
    return RuleDecision(None, all_profiles)
