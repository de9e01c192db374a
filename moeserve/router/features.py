"""Cheap features of a request, computed before any model runs: what the rules match on and
the bandit's context vector (config.FEATURE_NAMES, in that order)."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

_CODE = re.compile(r"```|^\s*(def|class|import|from|fn|func|public|#include)\b|[{};]\s*$|=>|\breturn\b", re.M)


@dataclass(frozen=True)
class RequestFeatures:
    prompt_tokens: int
    has_code: bool
    wants_json: bool
    non_ascii: bool
    tenant: str

    @property
    def language(self) -> str:
        return "other" if self.non_ascii else "ascii"

    def vector(self) -> list[float]:
        """The bandit's context x: [1, log(1 + tokens) / 8, has_code, wants_json, non_ascii]."""
        return [1.0, math.log1p(self.prompt_tokens) / 8, float(self.has_code), float(self.wants_json),
                float(self.non_ascii)]

    def as_dict(self) -> dict:
        return asdict(self)


def extract(text: str, prompt_tokens: int, tenant: str, json_requested: bool = False) -> RequestFeatures:
    """`json_requested`: the request asked for a JSON answer (response_format); a prompt that
    mentions JSON counts too."""
    return RequestFeatures(prompt_tokens=prompt_tokens, has_code=bool(_CODE.search(text)),
                           wants_json=json_requested or "json" in text.lower(),
                           non_ascii=not text.isascii(), tenant=tenant)
