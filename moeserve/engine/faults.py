"""Fault injection: make a named site in the engine raise on chosen calls, for tests.

A plan is a comma-separated list of `site@N` (raise on the N-th call of that site, counting
from 1, once) or `site@N+` (raise on the N-th call and every call after it); `site:R@N` limits
it to expert-parallel worker R. Sites:

    schedule   the scheduler's schedule(), before it changes anything
    forward    the model runner, after the batch is built and before the model runs
    hang       an expert-parallel worker's step: it blocks for good instead of raising (a
               worker that stops answering while its process lives)
    split      a step run as two micro-batches, as micro-batch B begins its first layer: A's
               dispatch is then in flight on every rank (model/overlap.py)

The engine reads a plan from the MOESERVE_INJECT_FAULTS environment variable when none is given
to it, so a test can fault an engine that runs in another process. Without a plan every check
is one dict lookup.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass

SITES = ("schedule", "forward", "hang", "split")
ENV_VAR = "MOESERVE_INJECT_FAULTS"
_SPEC = re.compile(r"^(\w+)(?::(\d+))?@(\d+)(\+?)$")


class InjectedFault(RuntimeError):
    """Raised by an injected fault; the message names the site and the call."""


@dataclass(frozen=True)
class Fault:
    site: str
    call: int  # 1-based
    repeat: bool  # also every later call
    rank: int | None = None  # only on this expert-parallel worker

    def hits(self, call: int) -> bool:
        return call == self.call or (self.repeat and call > self.call)


@dataclass(frozen=True)
class FaultPlan:
    faults: tuple[Fault, ...] = ()

    @classmethod
    def parse(cls, spec: str | None) -> FaultPlan:
        faults = []
        for part in (spec or "").split(","):
            part = part.strip()
            if not part:
                continue
            m = _SPEC.match(part)
            if m is None or m[1] not in SITES or int(m[3]) < 1:
                raise ValueError(f"bad fault {part!r}: expected site@N, site@N+ or site:RANK@N with site in "
                                 f"{SITES}, N >= 1")
            faults.append(Fault(m[1], int(m[3]), bool(m[4]), None if m[2] is None else int(m[2])))
        return cls(tuple(faults))

    @classmethod
    def from_env(cls) -> FaultPlan:
        return cls.parse(os.environ.get(ENV_VAR))


class FaultInjector:
    """Counts calls per site and raises InjectedFault where the plan says."""

    def __init__(self, plan: FaultPlan | None = None, rank: int | None = None):
        plan = plan if plan is not None else FaultPlan.from_env()
        self.plan = FaultPlan(tuple(f for f in plan.faults if f.rank is None or f.rank == rank))
        self._sites = {f.site for f in self.plan.faults}
        self._calls: dict[str, int] = {}

    def armed(self, site: str) -> bool:
        """Whether the plan names `site` (so a caller can skip setting up a check)."""
        return site in self._sites

    def check(self, site: str) -> None:
        if site not in self._sites:
            return
        call = self._calls.get(site, 0) + 1
        self._calls[site] = call
        if any(f.site == site and f.hits(call) for f in self.plan.faults):
            if site == "hang":
                threading.Event().wait()
            raise InjectedFault(f"injected fault at {site} (call {call})")
