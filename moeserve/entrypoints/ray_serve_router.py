"""A Ray Serve request router for moeserve replicas: fewest outstanding tokens first.

Ray Serve's default (power of two choices on ongoing requests) counts requests: a replica with
two long prompts and one with two one-token prompts look the same to it. This router keeps,
per replica, the token budget (prompt tokens + n * max_tokens, the context's room when
max_tokens is unset) of every request it routed there that has not completed, and ranks every
candidate replica by it (ties at random); requests are routed in arrival order (FIFOMixin).
The counts are this router's own (one per ingress replica): exact at routing time, with no
report to wait for, but blind to how far each request has got.
"""

from __future__ import annotations

import random
from typing import Any

from ray.serve.request_router import FIFOMixin, PendingRequest, ReplicaID, RequestRouter, RunningReplica


class OutstandingTokensRouter(FIFOMixin, RequestRouter):
    def initialize_state(self, max_model_len: int = 2048, **kwargs: Any) -> None:
        self.max_model_len = max_model_len
        self._tokens: dict[ReplicaID, int] = {}  # replica -> budget of its requests in flight
        self._requests: dict[tuple[ReplicaID, str], int] = {}  # (replica, internal request id) -> budget

    def _budget(self, pending: PendingRequest | None) -> int:
        """The token budget of a moeserve ReplicaRequest (0 for any other call)."""
        from moeserve.entrypoints.ray_serve import ReplicaRequest, request_budget

        request = pending.args[0] if pending is not None and pending.args else None
        return request_budget(request, self.max_model_len) if isinstance(request, ReplicaRequest) else 0

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        return [sorted(candidate_replicas, key=lambda r: (self._tokens.get(r.replica_id, 0), random.random()))]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        budget = self._budget(pending_request)
        self._tokens[replica_id] = self._tokens.get(replica_id, 0) + budget
        self._requests[(replica_id, pending_request.metadata.internal_request_id)] = budget

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        budget = self._requests.pop((replica_id, internal_request_id), 0)
        self._tokens[replica_id] = max(0, self._tokens.get(replica_id, 0) - budget)
