"""Per-tenant token budgets over fixed periods (prompt + completion tokens of every attempt)."""

from __future__ import annotations

import time
from collections.abc import Callable

from moeserve.router.config import BudgetConfig


class TenantBudgets:
    def __init__(self, config: BudgetConfig, clock: Callable[[], float] = time.time):
        self.config, self.clock = config, clock
        self._used: dict[str, tuple[int, int]] = {}  # tenant -> (period index, tokens used in it)

    def limit(self, tenant: str) -> int | None:
        return self.config.tenants.get(tenant, self.config.default_tokens)

    def used(self, tenant: str) -> int:
        period = int(self.clock() // self.config.period_s)
        start, tokens = self._used.get(tenant, (period, 0))
        return tokens if start == period else 0

    def remaining(self, tenant: str) -> int | None:
        limit = self.limit(tenant)
        return None if limit is None else max(limit - self.used(tenant), 0)

    def exhausted(self, tenant: str) -> bool:
        return self.remaining(tenant) == 0

    def charge(self, tenant: str, tokens: int) -> None:
        period = int(self.clock() // self.config.period_s)
        self._used[tenant] = (period, self.used(tenant) + tokens)
