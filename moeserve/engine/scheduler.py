"""Scheduler: continuous batching under a token budget, chunked prefill, preemption by recompute.

Each step, every request's computed tokens try to catch up with its total tokens. Running
requests go first, in (priority, arrival) order, each taking min(tokens still to run, budget
left); a request whose blocks cannot grow preempts the lowest-priority, latest-arrived running
request (possibly itself), which frees all its blocks and waits to be recomputed. Waiting
requests are admitted in the same order while budget, `max_num_seqs` and blocks allow, and not
in a step that had to preempt. A prompt longer than the budget is run in chunks over several
steps: that is all chunked prefill is.

The output is a typed SchedulerOutput: a request's data is sent whole once (when it starts or
restarts after preemption), afterwards only its new blocks.

With several workers (expert parallelism, attention data-parallel) there is one block pool per
worker: a request is given the rank with the most free blocks when it is admitted and keeps it
while it runs (a preempted request chooses again); its blocks, its prefix-cache hits and the
requests it may preempt are all in that rank's pool. `SchedulerOutput.ranks` says where each scheduled request runs.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from moeserve.config import SchedulerConfig
from moeserve.engine.block_manager import BlockManager
from moeserve.engine.request import Request, RequestStatus
from moeserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from moeserve.worker.model_runner import ModelRunnerOutput


@dataclass(frozen=True)
class NewRequestData:
    """A request the model runner has no state for (new, or restarting after preemption)."""

    request_id: str
    token_ids: tuple[int, ...]  # prompt + outputs so far
    num_prompt_tokens: int
    block_table: tuple[int, ...]
    num_computed_tokens: int
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int]


@dataclass(frozen=True)
class CachedRequestData:
    """A request the runner already holds: only what changed."""

    request_id: str
    new_block_ids: tuple[int, ...]
    num_computed_tokens: int


@dataclass(frozen=True)
class SchedulerOutput:
    new_requests: tuple[NewRequestData, ...]
    cached_requests: tuple[CachedRequestData, ...]
    num_scheduled_tokens: dict[str, int]  # request id -> tokens to run; iteration order = batch order
    finished_request_ids: frozenset[str]  # the runner drops their state (finished, aborted, preempted)
    num_decode_tokens: int = 0  # of the scheduled tokens, those that are one new token after an output
    # request id -> (its requested K, the K it runs at this step); absent: the model's K for both
    top_k: dict[str, tuple[int, int]] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)  # request id -> its worker; empty with one worker
    # per rank: the tokens of its batch (in batch order) that micro-batch A holds, B the rest;
    # None: no split. Decided for every rank at once (model/overlap.py).
    micro_batch_cut: tuple[int, ...] | None = None
    active: bool | None = None  # the step runs on some worker (None: iff tokens are scheduled here)

    def rank_of(self, request_id: str) -> int:
        return self.ranks.get(request_id, 0)

    @property
    def runs(self) -> bool:
        return bool(self.num_scheduled_tokens) if self.active is None else self.active

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())


ExpertConfig = tuple[int, int]  # (the request's K, the K it runs at now)


class Scheduler:
    """`expert_config(request)` says under which expert configuration the request's tokens run
    this step; it salts the prefix-cache keys of the blocks they fill (and of the lookups), so KV
    computed under one configuration is never reused under another. None: one configuration."""

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager | list[BlockManager],
                 expert_config: Callable[[Request], ExpertConfig] | None = None, on_gpu: bool = False):
        self.config = config
        self.pools = block_manager if isinstance(block_manager, list) else [block_manager]
        self.block_manager = self.pools[0]
        self.expert_config = expert_config
        self.requests: dict[str, Request] = {}
        self.waiting: list[tuple[tuple[int, int], Request]] = []  # heap by sort_key
        self.running: list[Request] = []
        self.num_preemptions = 0
        # auto: split only where there is an all-to-all to hide
        self.overlap = config.enable_overlap if config.enable_overlap is not None else len(self.pools) > 1
        self.overlap_decode, self.overlap_prefill = config.overlap_thresholds(on_gpu)
        self._arrivals = itertools.count()
        self._dropped: set[str] = set()  # runner state to drop at the next step

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        request.arrival = next(self._arrivals)
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        heapq.heappush(self.waiting, (request.sort_key, request))

    def _pool(self, req: Request) -> BlockManager:
        return self.pools[req.rank or 0]

    def _assign_rank(self, req: Request) -> None:
        """The pool with the most free blocks, then the fewest running requests."""
        if req.rank is None:
            running = [0] * len(self.pools)
            for r in self.running:
                running[r.rank or 0] += 1
            req.rank = max(range(len(self.pools)), key=lambda i: (self.pools[i].num_free_blocks, -running[i], -i))

    def _victim(self, rank: int | None) -> Request:
        """The lowest-priority, latest-arrived running request of that rank's pool (running is sorted)."""
        for i in range(len(self.running) - 1, -1, -1):
            if self.running[i].rank == rank:
                return self.running.pop(i)
        raise AssertionError("a running request's own rank has no running request")

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: dict[str, int] = {}
        top_k: dict[str, ExpertConfig] = {}
        new_data: list[NewRequestData] = []
        cached_data: list[CachedRequestData] = []
        preempted = False

        self.running.sort(key=lambda r: r.sort_key)
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            bm = self._pool(req)
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            old_blocks = len(req.block_table)
            while not bm.allocate(req.block_table, req.num_computed_tokens + n):
                victim = self._victim(req.rank)
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            else:
                salt = self._salt(req, top_k)
                filled = (req.num_computed_tokens + n) // bm.block_size
                if bm.enable_prefix_caching and len(req.block_keys) < filled:  # a block just filled
                    first = len(req.block_keys) * bm.block_size  # only the blocks not keyed yet: no history copy
                    bm.cache_full_blocks(req.block_table, req.token_range(first, req.num_computed_tokens + n),
                                         req.block_keys, salt, first)
                cached_data.append(CachedRequestData(req.request_id, tuple(req.block_table[old_blocks:]), req.num_computed_tokens))
                scheduled[req.request_id] = n
                budget -= n
                i += 1

        while not preempted and self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0][1]
            if req.status.finished:  # aborted while waiting
                heapq.heappop(self.waiting)
                continue
            self._assign_rank(req)
            bm = self._pool(req)
            tokens = req.all_token_ids
            salt = self._salt(req, top_k)
            hits = bm.lookup_prefix(tokens, salt)
            computed = len(hits) * bm.block_size
            n = min(len(tokens) - computed, budget)
            if n < len(tokens) - computed and not self.config.enable_chunked_prefill:
                req.rank = None  # not admitted: choose again next time
                break
            if not bm.allocate(req.block_table, computed + n, hits):
                top_k.pop(req.request_id, None)
                req.rank = None  # not admitted: choose again next time
                break
            heapq.heappop(self.waiting)
            req.num_computed_tokens = computed
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            bm.cache_full_blocks(req.block_table, tokens[: computed + n], req.block_keys, salt)
            new_data.append(
                NewRequestData(req.request_id, tuple(tokens), len(req.prompt_token_ids), tuple(req.block_table),
                               computed, req.sampling_params, req.eos_token_ids)
            )
            scheduled[req.request_id] = n
            budget -= n

        dropped, self._dropped = frozenset(self._dropped), set()
        decodes = {r for r, n in scheduled.items() if self._is_decode(self.requests[r], n)}
        top_k = {r: top_k[r] for r in scheduled if r in top_k}
        ranks = {r: self.requests[r].rank or 0 for r in scheduled} if len(self.pools) > 1 else {}
        cut = self._micro_batch_cut(scheduled, decodes) if self.overlap else None
        return SchedulerOutput(tuple(new_data), tuple(cached_data), scheduled, dropped, len(decodes), top_k, ranks,
                               micro_batch_cut=cut)

    @staticmethod
    def _is_decode(req: Request, n: int) -> bool:
        """One new token right after an output: the request is decoding."""
        return n == 1 and bool(req.output_token_ids) and req.num_computed_tokens == req.num_tokens - 1

    def _micro_batch_cut(self, scheduled: dict[str, int], decodes: set[str]) -> tuple[int, ...] | None:
        """Split every rank's batch in two token-balanced halves (A takes the odd token), or none.
        A rank whose tokens are all decodes needs the decode threshold of them, any other the
        prefill threshold (SchedulerConfig.overlap_thresholds); one rank below its threshold (an idle rank included) and no
        rank splits: the ranks must run the same number of micro-batches. A split whose second
        half would be empty is cancelled. The cut may fall inside a prefill."""
        tokens, prefill = [0] * len(self.pools), [False] * len(self.pools)
        for req_id, n in scheduled.items():
            rank = self.requests[req_id].rank or 0
            tokens[rank] += n
            prefill[rank] |= req_id not in decodes
        for t, p in zip(tokens, prefill):
            if t < (self.overlap_prefill if p else self.overlap_decode):
                return None
        cut = tuple((t + 1) // 2 for t in tokens)
        if any(c == t for c, t in zip(cut, tokens)):
            return None
        return cut

    def _salt(self, req: Request, top_k: dict[str, ExpertConfig]) -> bytes:
        """Records the request's expert configuration for this step; its prefix-cache salt."""
        if self.expert_config is None:
            return b""
        config = top_k[req.request_id] = self.expert_config(req)
        return b"k%d/%d" % config

    def discard_step(self, output: SchedulerOutput) -> None:
        """The step's forward failed, so the blocks it was to fill hold nothing: withdraw their
        prefix-cache keys (published by `schedule`). Call before the step's requests are freed."""
        bs = self.block_manager.block_size
        for req_id, n in output.num_scheduled_tokens.items():
            req = self.requests.get(req_id)
            if req is not None:
                start = req.num_computed_tokens
                self._pool(req).uncache(req.block_table[start // bs : (start + n) // bs])

    def _preempt(self, req: Request) -> None:
        self._pool(req).free(req.block_table)
        req.block_keys.clear()  # its next blocks are keyed (and published) afresh
        req.rank = None  # restarts from nothing: on whichever pool has room then
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self._dropped.add(req.request_id)
        heapq.heappush(self.waiting, (req.sort_key, req))

    def update_from_output(self, output: SchedulerOutput, result: ModelRunnerOutput) -> list[Request]:
        """Advance computed tokens, append sampled tokens, apply token-level stops. Returns the
        requests that got a new token this step (finished ones included, already released)."""
        sampled = {r: (t, lp) for r, t, lp in zip(result.req_ids, result.sampled_token_ids, result.logprobs)}
        updated = []
        for req_id, n in output.num_scheduled_tokens.items():
            req = self.requests.get(req_id)
            if req is None or req.status is not RequestStatus.RUNNING:
                continue  # finished or aborted while the step ran
            req.num_computed_tokens += n
            if req_id not in sampled:
                continue  # a prefill chunk that has not reached the end
            token, logprobs = sampled[req_id]
            req.output_token_ids.append(token)
            if logprobs is not None:
                req.output_logprobs.append(logprobs)
            status = req.check_token_stop()
            if status is not None:
                self.finish(req, status)
            updated.append(req)
        return updated

    def finish(self, req: Request, status: RequestStatus) -> None:
        """Release a request (stopped, length, aborted) and all its blocks."""
        if req.status.finished:
            return
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        req.status = status
        self._pool(req).free(req.block_table)
        self._dropped.add(req.request_id)
        del self.requests[req.request_id]

    def waiting_tokens_by_priority(self) -> dict[int, int]:
        """Tokens still to compute of the requests not running, by priority."""
        out: dict[int, int] = {}
        for _, req in self.waiting:
            if not req.status.finished:
                out[req.priority] = out.get(req.priority, 0) + req.num_tokens - req.num_computed_tokens
        return out

    @property
    def num_waiting(self) -> int:
        return len(self.requests) - len(self.running)

    def abort(self, request_id: str) -> Request | None:
        req = self.requests.get(request_id)
        if req is not None:
            self.finish(req, RequestStatus.FINISHED_ABORTED)
        return req
