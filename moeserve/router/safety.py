"""The safety gate, first in the pipeline: a refusal names its rule and no model runs.

Order: prompt length, deny patterns, prompt-injection markers, then PII (redacted in place as
`[REDACTED:<name>]`, or refused, per `pii_action`)."""

from __future__ import annotations

from dataclasses import dataclass

from moeserve.router.config import SafetyConfig


@dataclass(frozen=True)
class SafetyVerdict:
    text: str  # the prompt to run (redacted where PII was found)
    refused_by: str | None = None  # "<kind>:<rule name>" when refused
    redactions: tuple[str, ...] = ()  # PII rule names that matched

    @property
    def refused(self) -> bool:
        return self.refused_by is not None


def check(config: SafetyConfig, text: str) -> SafetyVerdict:
    if config.max_prompt_chars is not None and len(text) > config.max_prompt_chars:
        return SafetyVerdict(text, "length:max_prompt_chars")
    for kind, rules in (("deny", config.deny), ("injection", config.injection)):
        for rule in rules:
            if rule.pattern.search(text):
                return SafetyVerdict(text, f"{kind}:{rule.name}")
    redactions = []
    for rule in config.pii:
        if rule.pattern.search(text):
            if config.pii_action == "refuse":
                return SafetyVerdict(text, f"pii:{rule.name}")
            text = rule.pattern.sub(f"[REDACTED:{rule.name}]", text)
            redactions.append(rule.name)
    return SafetyVerdict(text, None, tuple(redactions))
