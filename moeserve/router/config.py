"""The outer router's configuration (`moeserve serve --router-config router.yaml`), read once
into frozen dataclasses; a bad file is a RouterConfigError naming the field.

    version: "2026-12-01"          # written into every audit line
    profiles:                      # cheapest first: the escalation order unless `escalation.order` says
      - {name: cheap, top_k: 1, cost_per_token: 1.0, max_tokens: 256}
      - {name: full, cost_per_token: 2.0, defaults: {temperature: 0}}
    safety:
      deny: [{name: secrets, pattern: "(?i)api[_-]?key"}]
      max_prompt_chars: 20000
      pii: [{name: email, pattern: "[\\w.+-]+@[\\w-]+\\.[\\w.]+"}]
      pii_action: redact           # or refuse
      injection: [{name: ignore-previous, pattern: "(?i)ignore (all )?previous instructions"}]
    rules:                         # highest priority first; the first match decides
      - {name: code-to-full, priority: 10, when: {has_code: true}, profile: full}
      - {name: short, priority: 5, when: {max_prompt_tokens: 16}, candidates: [cheap, full]}
    bandit: {alpha: 0.5, epsilon: 0.1, seed: 0, state_path: router-state.json,
             cost_weight: 0.001, latency_weight: 0.0}
    verifier: {json: false, json_schema: null, regex: null, finish_not_length: true,
               min_mean_logprob: null}
    escalation: {max_escalations: 1, max_total_tokens: 4096}
    budgets: {period_s: 3600, default_tokens: null, tenants: {alice: 100000}, on_exhausted: cheapest}
    audit: {path: router-audit.jsonl}

A profile is a versioned bundle over one model: `model` (default: the served model; each
distinct model gets its own engine and KV pool), `top_k` (experts per token, the model's when
absent: a cheap and a full profile of the same weights), decoding `defaults` (applied to fields
the request does not set), `max_tokens` (a cap), `time_budget_s` (no escalation starts once the
request has run this long), `slo_ttft_s` (informational, in /v1/models), `cost_per_token`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

ROUTED_NAME = "moeserve-router"
FEATURE_NAMES = ("bias", "log_prompt_tokens", "has_code", "wants_json", "non_ascii")
_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty", "seed")


class RouterConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Profile:
    name: str
    model: str | None = None  # None: the served model
    top_k: int | None = None  # None: the model's K
    defaults: dict[str, Any] = field(default_factory=dict)
    max_tokens: int | None = None
    time_budget_s: float | None = None
    slo_ttft_s: float | None = None
    cost_per_token: float = 1.0


@dataclass(frozen=True)
class NamedPattern:
    name: str
    pattern: re.Pattern


@dataclass(frozen=True)
class SafetyConfig:
    deny: tuple[NamedPattern, ...] = ()
    max_prompt_chars: int | None = None
    pii: tuple[NamedPattern, ...] = ()
    pii_action: str = "redact"  # or "refuse"
    injection: tuple[NamedPattern, ...] = ()


@dataclass(frozen=True)
class Rule:
    """`when` keys (all must hold): min_prompt_tokens, max_prompt_tokens, has_code, wants_json,
    tenant (a name or a list), language ("ascii" / "other"). Exactly one of `profile`
    (routes there) and `candidates` (the bandit chooses among them)."""

    name: str
    priority: int = 0
    when: dict[str, Any] = field(default_factory=dict)
    profile: str | None = None
    candidates: tuple[str, ...] = ()


@dataclass(frozen=True)
class BanditConfig:
    """LinUCB with epsilon-uniform exploration (so every logged choice has a propensity > 0)."""

    alpha: float = 0.5
    epsilon: float = 0.1
    seed: int = 0
    state_path: str | None = None
    cost_weight: float = 0.0  # per unit of cost (tokens x cost_per_token)
    latency_weight: float = 0.0  # per second


@dataclass(frozen=True)
class VerifierConfig:
    json: bool = False
    json_schema: dict[str, Any] | None = None
    regex: re.Pattern | None = None
    finish_not_length: bool = False
    min_mean_logprob: float | None = None

    @property
    def active(self) -> bool:
        return bool(self.json or self.json_schema is not None or self.regex is not None or self.finish_not_length
                    or self.min_mean_logprob is not None)


@dataclass(frozen=True)
class EscalationConfig:
    max_escalations: int = 1
    max_total_tokens: int = 4096  # prompt + completion tokens over every attempt of one request
    order: tuple[str, ...] = ()  # weakest to strongest; default: the profiles' order


@dataclass(frozen=True)
class BudgetConfig:
    period_s: float = 3600.0
    default_tokens: int | None = None  # per tenant per period; None: unlimited
    tenants: dict[str, int] = field(default_factory=dict)
    on_exhausted: str = "cheapest"  # or "reject" (429)


@dataclass(frozen=True)
class RouterConfig:
    profiles: tuple[Profile, ...]
    version: str = "1"
    safety: SafetyConfig = field(default_factory=SafetyConfig)
    rules: tuple[Rule, ...] = ()
    bandit: BanditConfig = field(default_factory=BanditConfig)
    verifier: VerifierConfig = field(default_factory=VerifierConfig)
    escalation: EscalationConfig = field(default_factory=EscalationConfig)
    budgets: BudgetConfig = field(default_factory=BudgetConfig)
    audit_path: str | None = None

    def profile(self, name: str) -> Profile:
        for p in self.profiles:
            if p.name == name:
                return p
        raise KeyError(name)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.profiles)

    @property
    def escalation_order(self) -> tuple[str, ...]:
        return self.escalation.order or self.names

    @classmethod
    def load(cls, path: str | Path) -> RouterConfig:
        import yaml

        try:
            raw = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise RouterConfigError(f"cannot read the router config {path}: {e}") from e
        return cls.from_dict(raw or {})

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RouterConfig:
        _known(raw, {"version", "profiles", "safety", "rules", "bandit", "verifier", "escalation", "budgets",
                     "audit"}, "router config")
        profiles = tuple(_profile(p) for p in _list(raw.get("profiles"), "profiles"))
        if not profiles:
            raise RouterConfigError("profiles: at least one profile is needed")
        names = [p.name for p in profiles]
        if len(set(names)) != len(names) or ROUTED_NAME in names:
            raise RouterConfigError(f"profiles: names must be unique and not {ROUTED_NAME!r}")
        rules = tuple(sorted((_rule(r, names) for r in _list(raw.get("rules"), "rules")),
                             key=lambda r: -r.priority))  # stable: equal priorities keep file order
        escalation = _build(EscalationConfig, raw.get("escalation"), "escalation")
        escalation = EscalationConfig(escalation.max_escalations, escalation.max_total_tokens,
                                      tuple(escalation.order))
        for name in escalation.order:
            if name not in names:
                raise RouterConfigError(f"escalation.order: unknown profile {name!r}")
        if escalation.max_escalations < 0 or escalation.max_total_tokens < 1:
            raise RouterConfigError("escalation: max_escalations must be >= 0 and max_total_tokens >= 1")
        budgets = _build(BudgetConfig, raw.get("budgets"), "budgets")
        if budgets.on_exhausted not in ("cheapest", "reject") or budgets.period_s <= 0:
            raise RouterConfigError("budgets: on_exhausted is 'cheapest' or 'reject', period_s > 0")
        bandit = _build(BanditConfig, raw.get("bandit"), "bandit")
        if not 0 <= bandit.epsilon <= 1 or bandit.alpha < 0:
            raise RouterConfigError("bandit: epsilon in [0, 1], alpha >= 0")
        audit = raw.get("audit") or {}
        _known(audit, {"path"}, "audit")
        return cls(profiles=profiles, version=str(raw.get("version", "1")), safety=_safety(raw.get("safety")),
                   rules=rules, bandit=bandit, verifier=_verifier(raw.get("verifier")), escalation=escalation,
                   budgets=budgets, audit_path=audit.get("path"))


def _known(raw: Any, allowed: set[str], where: str) -> None:
    if not isinstance(raw, dict):
        raise RouterConfigError(f"{where}: expected a mapping")
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise RouterConfigError(f"{where}: unknown key(s) {', '.join(unknown)}")


def _list(raw: Any, where: str) -> list:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise RouterConfigError(f"{where}: expected a list")
    return raw


def _build(cls: type, raw: Any, where: str) -> Any:
    raw = raw or {}
    _known(raw, {f.name for f in fields(cls)}, where)
    try:
        return cls(**raw)
    except TypeError as e:
        raise RouterConfigError(f"{where}: {e}") from e


def _profile(raw: Any) -> Profile:
    p = _build(Profile, raw, "profiles[]")
    if not p.name or not isinstance(p.name, str):
        raise RouterConfigError("profiles[]: every profile needs a name")
    _known(p.defaults, set(_DEFAULT_KEYS), f"profiles.{p.name}.defaults")
    if p.top_k is not None and p.top_k < 1 or p.max_tokens is not None and p.max_tokens < 1 or p.cost_per_token < 0:
        raise RouterConfigError(f"profiles.{p.name}: top_k and max_tokens >= 1, cost_per_token >= 0")
    return p


def _patterns(raw: Any, where: str) -> tuple[NamedPattern, ...]:
    out = []
    for item in _list(raw, where):
        _known(item, {"name", "pattern"}, where)
        try:
            out.append(NamedPattern(str(item["name"]), re.compile(item["pattern"])))
        except (KeyError, re.error) as e:
            raise RouterConfigError(f"{where}: each entry needs a name and a valid pattern ({e})") from e
    return tuple(out)


def _safety(raw: Any) -> SafetyConfig:
    raw = raw or {}
    _known(raw, {"deny", "max_prompt_chars", "pii", "pii_action", "injection"}, "safety")
    action = raw.get("pii_action", "redact")
    if action not in ("redact", "refuse"):
        raise RouterConfigError("safety.pii_action: 'redact' or 'refuse'")
    return SafetyConfig(_patterns(raw.get("deny"), "safety.deny"), raw.get("max_prompt_chars"),
                        _patterns(raw.get("pii"), "safety.pii"), action,
                        _patterns(raw.get("injection"), "safety.injection"))


_WHEN = {"min_prompt_tokens", "max_prompt_tokens", "has_code", "wants_json", "tenant", "language"}


def _rule(raw: Any, names: list[str]) -> Rule:
    _known(raw, {"name", "priority", "when", "profile", "candidates"}, "rules[]")
    rule = Rule(str(raw.get("name", "")), int(raw.get("priority", 0)), dict(raw.get("when") or {}),
                raw.get("profile"), tuple(raw.get("candidates") or ()))
    _known(rule.when, _WHEN, f"rules.{rule.name}.when")
    if not rule.name or (rule.profile is None) == (not rule.candidates):
        raise RouterConfigError(f"rules.{rule.name or '?'}: a name and exactly one of profile / candidates")
    if len(set(rule.candidates)) != len(rule.candidates):
        raise RouterConfigError(f"rules.{rule.name}: a candidate listed twice")
    for name in (rule.profile,) if rule.profile else rule.candidates:
        if name not in names:
            raise RouterConfigError(f"rules.{rule.name}: unknown profile {name!r}")
    return rule


def _verifier(raw: Any) -> VerifierConfig:
    raw = dict(raw or {})
    _known(raw, {f.name for f in fields(VerifierConfig)}, "verifier")
    if raw.get("regex") is not None:
        try:
            raw["regex"] = re.compile(raw["regex"])
        except re.error as e:
            raise RouterConfigError(f"verifier.regex: {e}") from e
    if raw.get("json_schema") is not None:
        import jsonschema

        try:
            jsonschema.Draft202012Validator.check_schema(raw["json_schema"])
        except jsonschema.SchemaError as e:
            raise RouterConfigError(f"verifier.json_schema: {e.message}") from e
    return VerifierConfig(**raw)
