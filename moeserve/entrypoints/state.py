"""What the HTTP and gRPC fronts share: the engine front, the served name, the API keys, and
the draining flag that SIGTERM sets."""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass, field

from moeserve.entrypoints.async_engine import AsyncEngine
from moeserve.router.config import Profile
from moeserve.router.pipeline import Router


@dataclass
class ServerState:
    """`router`: the outer router when --router-config is given; `engines`: one engine per
    distinct model path its profiles name beyond the served model (their own KV pools)."""

    engine: AsyncEngine
    model_name: str
    api_keys: tuple[str, ...] = ()
    draining: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    router: Router | None = None
    engines: dict[str, AsyncEngine] = field(default_factory=dict)

    def engine_for(self, profile: Profile) -> AsyncEngine:
        return self.engine if profile.model is None else self.engines.get(profile.model, self.engine)

    @property
    def all_engines(self) -> list[AsyncEngine]:
        return [self.engine, *self.engines.values()]

    def key_ok(self, authorization: str | None) -> bool:
        """Whether an `Authorization` value carries an accepted key (always, with no keys set)."""
        return not self.api_keys or bearer_key_ok(authorization, self.api_keys)


def bearer_key_ok(header: str | None, keys: tuple[str, ...]) -> bool:
    """`Bearer <key>` with one of `keys`. Constant time in the key's content: every configured
    key is compared, with no early exit."""
    presented = (header or "").removeprefix("Bearer ").encode()
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(presented, key.encode())
    return ok and (header or "").startswith("Bearer ")
