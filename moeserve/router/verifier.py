"""Checks on a finished generation: JSON parses (and matches a schema), a regex matches, the
finish reason is not "length", the mean token logprob is above a threshold. A failed check may
escalate the request (pipeline.Router)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from moeserve.router.config import VerifierConfig


@dataclass(frozen=True)
class Verification:
    passed: bool
    failures: tuple[str, ...] = ()  # the checks that failed


def verify(config: VerifierConfig, text: str, finish_reason: str | None,
           token_logprobs: list[float] | None) -> Verification:
    failures = []
    if config.json or config.json_schema is not None:
        try:
            value = json.loads(text)
        except ValueError:
            failures.append("json")
        else:
            if config.json_schema is not None:
                import jsonschema

                if not jsonschema.Draft202012Validator(config.json_schema).is_valid(value):
                    failures.append("json_schema")
    if config.regex is not None and not config.regex.search(text):
        failures.append("regex")
    if config.finish_not_length and finish_reason == "length":
        failures.append("finish_length")
    if config.min_mean_logprob is not None:
        if not token_logprobs or sum(token_logprobs) / len(token_logprobs) < config.min_mean_logprob:
            failures.append("mean_logprob")
    return Verification(not failures, tuple(failures))
