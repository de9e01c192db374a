"""The router pipeline for requests to the routed name. The front calls, in order:

    gate(text)                  safety: a refusal is audited, counted and answered 400
    route(features)             rules -> budget -> bandit: the first profile (or a 429 refusal)
    [generate with the profile; verify(...) the result]
    escalation(trace, ...)      the next stronger profile, or None (passed, capped, or none left)
    finish(trace)               reward -> bandit update, regret, metrics, one audit line

A RoutedTrace carries one request through all of it; every routed request ends in exactly one
`finish` (refused and rejected ones included), so it yields exactly one audit line.

Reward of a request (what the bandit learns for its first choice, and replay estimates):
    verifier passed (1 or 0, on the final attempt)
    - cost_weight * sum over attempts of tokens x the profile's cost_per_token
    - latency_weight * seconds over all attempts
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from prometheus_client import CollectorRegistry

from moeserve.router import rules as rule_stage
from moeserve.router import safety
from moeserve.router.audit import AuditLog, RouterMetrics
from moeserve.router.bandit import LinUCB
from moeserve.router.budget import TenantBudgets
from moeserve.router.config import Profile, RouterConfig
from moeserve.router.features import RequestFeatures
from moeserve.router.verifier import Verification
from moeserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


def apply_profile(params: SamplingParams, profile: Profile, explicit: set[str], needs_logprobs: bool) -> SamplingParams:
    """The request's sampling parameters under `profile`: its K; its decoding defaults for the
    fields the request did not set; its max_tokens as the default and the cap; the sampled
    token's logprob when the verifier needs it. ValueError when the result is invalid."""
    changes: dict = {k: v for k, v in profile.defaults.items() if k not in explicit}
    if profile.top_k is not None:
        changes["moe_top_k"] = profile.top_k
    if profile.max_tokens is not None:
        asked = params.max_tokens if explicit & {"max_tokens", "max_completion_tokens"} else None
        changes["max_tokens"] = profile.max_tokens if asked is None else min(asked, profile.max_tokens)
    if needs_logprobs and params.logprobs is None:
        changes["logprobs"] = 0
    return dataclasses.replace(params, **changes)


@dataclass
class Attempt:
    profile: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    finish_reason: str | None
    verification: Verification


@dataclass
class RoutedTrace:
    request_id: str
    tenant: str
    stream: bool
    features: RequestFeatures | None = None
    rule: str | None = None
    candidates: tuple[str, ...] = ()
    choice: str | None = None
    propensity: float | None = None
    budget_action: str | None = None  # "cheapest" or "rejected" when the tenant was over budget
    refused_by: str | None = None
    redactions: tuple[str, ...] = ()
    attempts: list[Attempt] = field(default_factory=list)
    escalations: list[dict] = field(default_factory=list)  # {from, to, why}
    error: str | None = None
    start: float = field(default_factory=time.monotonic)

    @property
    def profile(self) -> str | None:
        """The profile that served the request last."""
        return self.attempts[-1].profile if self.attempts else self.choice

    @property
    def tokens(self) -> int:
        return sum(a.prompt_tokens + a.completion_tokens for a in self.attempts)

    @property
    def passed(self) -> bool | None:
        return self.attempts[-1].verification.passed if self.attempts else None


@dataclass(frozen=True)
class Route:
    profile: str
    rejected: bool = False  # over budget with on_exhausted: reject -> 429


class Router:
    def __init__(self, config: RouterConfig, registry: CollectorRegistry | None = None,
                 clock: Callable[[], float] = time.time):
        self.config = config
        self.budgets = TenantBudgets(config.budgets, clock)
        self.bandit = LinUCB(config.names, config.bandit)
        self.audit = AuditLog(config.audit_path)
        self.metrics = RouterMetrics(registry or CollectorRegistry())
        self._regret = 0.0

    # ---- before generation ----

    def gate(self, trace: RoutedTrace, text: str) -> safety.SafetyVerdict:
        verdict = safety.check(self.config.safety, text)
        trace.redactions = verdict.redactions
        if verdict.refused:
            trace.refused_by = verdict.refused_by
            self.metrics.refusals.labels(verdict.refused_by).inc()
        return verdict

    def route(self, trace: RoutedTrace, features: RequestFeatures) -> Route:
        trace.features = features
        decision = rule_stage.decide(self.config.rules, features, self.config.names)
        trace.rule, trace.candidates = decision.rule, decision.candidates
        if self.budgets.exhausted(features.tenant):
            if self.config.budgets.on_exhausted == "reject":
                trace.budget_action = "rejected"
                self.metrics.budget_rejections.labels("rejected").inc()
                return Route(decision.candidates[0], rejected=True)
            trace.budget_action = "cheapest"
            self.metrics.budget_rejections.labels("cheapest").inc()
            cheapest = min(decision.candidates, key=lambda n: self.config.profile(n).cost_per_token)
            trace.choice, trace.propensity = cheapest, 1.0
            return Route(cheapest)
        choice = self.bandit.choose(features.vector(), decision.candidates)
        trace.choice, trace.propensity = choice.profile, choice.propensity
        return Route(choice.profile)

    # ---- after each attempt ----

    def record(self, trace: RoutedTrace, attempt: Attempt) -> None:
        trace.attempts.append(attempt)
        self.budgets.charge(trace.tenant, attempt.prompt_tokens + attempt.completion_tokens)
        if not attempt.verification.passed:
            self.metrics.verifier_failures.labels(attempt.profile).inc()

    def escalation(self, trace: RoutedTrace, planned_tokens: Callable[[str], int]) -> str | None:
        """The profile to try next, or None. Never for a passed or streamed attempt, beyond
        `max_escalations`, past `max_total_tokens` (counting the next attempt's most tokens,
        `planned_tokens(profile)`: prompts + their max_tokens under it), past the profile's time
        budget, for a tenant now over budget, or beyond the strongest of the rule's candidates
        (a rule that pins a profile pins escalation too)."""
        last = trace.attempts[-1]
        esc = self.config.escalation
        if last.verification.passed or trace.stream or not self.config.verifier.active:
            return None
        why = None
        order = tuple(n for n in self.config.escalation_order if n in trace.candidates) or (last.profile,)
        i = order.index(last.profile) if last.profile in order else len(order)
        budget_s = self.config.profile(last.profile).time_budget_s
        if len(trace.escalations) >= esc.max_escalations:
            why = "max_escalations"
        elif i + 1 < len(order) and trace.tokens + planned_tokens(order[i + 1]) > esc.max_total_tokens:
            why = "max_total_tokens"
        elif budget_s is not None and time.monotonic() - trace.start > budget_s:
            why = "time_budget"
        elif self.budgets.exhausted(trace.tenant):
            why = "tenant_budget"
        elif i + 1 >= len(order):
            why = "strongest"
        if why is not None:
            trace.escalations.append({"from": last.profile, "to": None, "why": why,
                                      "failed": list(last.verification.failures)})
            return None
        target = order[i + 1]
        trace.escalations.append({"from": last.profile, "to": target, "why": "verifier",
                                  "failed": list(last.verification.failures)})
        self.metrics.escalations.labels(last.profile).inc()
        return target

    # ---- the end ----

    def reward(self, trace: RoutedTrace) -> float:
        b = self.config.bandit
        cost = sum((a.prompt_tokens + a.completion_tokens) * self.config.profile(a.profile).cost_per_token
                   for a in trace.attempts)
        seconds = sum(a.seconds for a in trace.attempts)
        return float(bool(trace.passed)) - b.cost_weight * cost - b.latency_weight * seconds

    def finish(self, trace: RoutedTrace) -> dict:
        """Learn, count and audit; returns the audit record."""
        reward = None
        reward = self.reward(trace) if trace.attempts and trace.error is None else None
        if reward is not None:
            self.metrics.requests.labels(trace.profile).inc()
        record = {
            "request_id": trace.request_id, "tenant": trace.tenant, "config_version": self.config.version,
            "features": trace.features.as_dict() if trace.features else None,
            "context": trace.features.vector() if trace.features else None,
            "rule": trace.rule, "candidates": list(trace.candidates), "choice": trace.choice,
            "propensity": trace.propensity, "budget_action": trace.budget_action, "refused_by": trace.refused_by,
            "redactions": list(trace.redactions), "stream": trace.stream,
            "attempts": [{**asdict(a), "verification": asdict(a.verification)} for a in trace.attempts],
            "escalations": trace.escalations, "profile": trace.profile if trace.attempts else None,
            "tokens": trace.tokens, "latency_s": time.monotonic() - trace.start, "passed": trace.passed,
            "reward": reward, "error": trace.error,
        }
        try:
            self.audit.write(record)
        except OSError:
            logger.exception("router: the audit line of %s could not be written", trace.request_id)
        if reward is not None and trace.budget_action is None and trace.features is not None \
                and len(trace.candidates) > 1:
            x = trace.features.vector()
            best = max(self.bandit.estimate(a, x) for a in trace.candidates)
            self._regret += best - self.bandit.estimate(trace.choice, x)
            self.metrics.regret.set(self._regret)
            try:
                self.bandit.update(trace.choice, x, reward)
            except OSError:
                logger.exception("router: the bandit state could not be saved")
        return record
