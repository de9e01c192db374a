"""A Ray Serve request router for moeserve replicas: fewest outstanding tokens first.

Ray Serve's default (power of two choices on ongoing requests) counts requests: a replica with
two long prompts and one with two one-token prompts look the same to it. This router keeps,
per replica, the token budget (prompt tokens + max_tokens) of every request it routed there
that has not completed, and ranks every candidate replica by it (ties at random); Ray Serve's
FIFO and locality machinery does the rest. The counts are this router's own (one per ingress
replica): exact at routing time, with no report to wait for.
"""

from __future__ import annotations

import random
from typing import Any

from ray.serve.request_router import FIFOMixin, LocalityMixin, PendingRequest, ReplicaID, RequestRouter, \
    RunningReplica


def request_tokens(pending: PendingRequest | None) -> int:
    """The token budget of a moeserve ReplicaRequest (0 for any other call)."""
    request = pending.args[0] if pending is not None and pending.args else None
    prompt = getattr(request, "prompt", None)
    params = getattr(request, "params", None)
    prompt_tokens = len(prompt.get("prompt_token_ids", ())) if isinstance(prompt, dict) else 0
    return prompt_tokens + (getattr(params, "max_tokens", None) or 0)


class OutstandingTokensRouter(FIFOMixin, LocalityMixin, RequestRouter):
    def initialize_state(self, **kwargs: Any) -> None:
        self._tokens: dict[ReplicaID, int] = {}  # replica -> budget of its requests in flight
        self._requests: dict[str, tuple[ReplicaID, int]] = {}  # internal request id -> (replica, budget)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        return [sorted(candidate_replicas, key=lambda r: (self._tokens.get(r.replica_id, 0), random.random()))]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        budget = request_tokens(pending_request)
        self._tokens[replica_id] = self._tokens.get(replica_id, 0) + budget
        self._requests[pending_request.metadata.internal_request_id] = (replica_id, budget)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        replica, budget = self._requests.pop(internal_request_id, (replica_id, 0))
        self._tokens[replica] = max(0, self._tokens.get(replica, 0) - budget)

    def outstanding_tokens(self) -> dict[str, int]:
        return {r.unique_id: n for r, n in self._tokens.items()}
