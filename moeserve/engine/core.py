"""EngineCore: the scheduler, the executor and the controllers. One step reads top to bottom:

    schedule -> execute on the workers -> update requests (token stops) -> outputs + stats
             -> controllers, between steps

The core thinks in token ids only: tokenising, detokenising and stop strings are the front's
(a stop string ends a request by an abort from the front). It runs in the engine process
(core_proc.py, behind ZMQ) for serving, and in the caller's process for the offline LLM API:
the same object either way.

Failures: an exception in the step's forward fails the requests of that batch (and withdraws
the prefix-cache keys of the blocks it was to write); the core goes on. A lost expert-parallel
worker (WorkerFailure) fails the batch and every request on the lost worker's rank, as
`unavailable` (503), empties that rank's KV pool, and marks the core unavailable; the host then
calls `recover()` (or, with --ep-failure-policy fail, the core raises). Any other exception
(in schedule(), a controller, a command) propagates: the process hosting the core reports it
dead rather than serve from a state nobody can vouch for.
"""

from __future__ import annotations

import collections
import logging
import os
import time
from typing import Any, Protocol

from moeserve.config import EngineConfig
from moeserve.engine.block_manager import BlockManager
from moeserve.engine.degradation import ClassLimits, DegradationController, DegradationSettings
from moeserve.engine.faults import FaultInjector
from moeserve.engine.messages import (
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    EngineInfo,
    EngineStats,
    ExpertLoadStats,
)
from moeserve.engine.replication import ReplicationPlanner, ReplicationSettings
from moeserve.engine.request import Request
from moeserve.engine.scheduler import Scheduler, SchedulerOutput
from moeserve.executor import Executor
from moeserve.executor.multi import WorkerCallError, WorkerFailure
from moeserve.generation_config import GenerationDefaults
from moeserve.worker.model_runner import ModelRunnerOutput

logger = logging.getLogger(__name__)
_RATE_ALPHA = 0.2  # weight of the newest step in the token-rate averages


class Controller(Protocol):
    """A policy that runs between steps with the step's stats (degradation, replication, ...).
    It may change the engine through `core.call` (e.g. set K); it must not block."""

    def between_steps(self, core: EngineCore, stats: EngineStats) -> None: ...


class EngineCore:
    def __init__(self, config: EngineConfig, faults: FaultInjector | None = None):
        self.config = config
        self.faults = faults or FaultInjector()
        self.executor = Executor.create(config, self.faults)
        mc = self.model_config = self.executor.model_config
        self.max_model_len = config.load.max_model_len or mc.max_position_embeddings
        self.num_kv_blocks = self.executor.num_kv_blocks(self.max_model_len)
        block_size = config.cache.block_size
        if self.num_kv_blocks * block_size < self.max_model_len:
            raise ValueError(
                f"the KV cache holds {self.num_kv_blocks * block_size} tokens, fewer than "
                f"max_model_len={self.max_model_len}: lower max_model_len or give the cache more memory"
            )
        self.executor.initialize_cache(self.num_kv_blocks)
        # one KV pool per worker (attention is data-parallel under expert parallelism)
        self.block_pools = [BlockManager(self.num_kv_blocks, block_size, config.cache.enable_prefix_caching)
                            for _ in range(config.parallel.world_size)]
        self.block_manager = self.block_pools[0]
        device = self.executor.collective_rpc("device_name")[0]
        self.scheduler = Scheduler(config.scheduler, self.block_pools, self.expert_config,
                                   on_gpu=device != "cpu")  # else a GPU's name, e.g. "NVIDIA H200"
        self._split_steps = 0
        self._check_overlap(config)
        generation = GenerationDefaults.from_pretrained(config.model, mc)
        self.info = EngineInfo(
            model=config.model, max_model_len=self.max_model_len, vocab_size=mc.vocab_size,
            eos_token_ids=tuple(generation.eos_token_ids), generation_defaults=generation,
            num_kv_blocks=self.num_kv_blocks, block_size=block_size, max_num_seqs=config.scheduler.max_num_seqs,
            max_num_batched_tokens=config.scheduler.max_num_batched_tokens, moe_layer_ids=mc.moe_layer_ids,
            num_experts=mc.num_experts, top_k=mc.top_k, device=device,
            pid=os.getpid(),
        )
        self.top_k = [mc.top_k] * mc.num_moe_layers  # K in force per MoE layer (the core sets it)
        self.controllers: list[Controller] = []
        self.class_limits = ClassLimits()  # what the degradation controller allows each class
        control = config.control
        if control.degradation != "off":
            controller = DegradationController(DegradationSettings(
                control.degradation, control.degradation_k, control.degradation_slo_ttft, control.degradation_slo_tpot,
                control.degradation_enter, control.degradation_leave, control.degradation_dwell))
            self.class_limits = controller.limits
            self.add_controller(controller)
        if control.degradation_layers:
            layers = [int(x) for x in control.degradation_layers.split(",") if x.strip()]
            if not all(0 <= layer < mc.num_moe_layers for layer in layers):
                raise ValueError(f"degradation_layers must be MoE-layer indices in [0, {mc.num_moe_layers}), "
                                 f"got {control.degradation_layers!r}")
            self.executor.collective_rpc("set_degrade_layers", layers)
        self.replication: ReplicationPlanner | None = None
        if control.replication == "auto":
            self.replication = self._replication_planner()
            self.add_controller(self.replication)
        self.unavailable: str | None = None
        self._lost_ranks: tuple[int, ...] = ()
        self._failed_outputs: list[EngineCoreOutput] = []
        self._worker_failures = self._worker_recoveries = 0
        self._recovery_s_total = self._last_recovery_s = 0.0
        self._degraded_tokens = 0
        self._recent_ttft: collections.deque[tuple[float, float]] = collections.deque()
        self._step = 0
        self._step_time = 0.0
        self._prefill_rate = 0.0
        self._decode_rate = 0.0
        self._prefill_per_step = 0.0
        self._step_model = StepTimeModel()
        self._received = 0

    def _replication_planner(self) -> ReplicationPlanner:
        spares, groups = self.config.load.num_redundant_experts, self.config.parallel.num_slot_groups
        if spares < 1 or groups < 2:
            raise ValueError("replication balances load across slot groups with spare slots: it needs "
                             f"--num-redundant-experts >= 1 and --expert-slot-groups >= 2 (got {spares}, {groups})")
        control = self.config.control
        settings = ReplicationSettings(control.replication_window, control.replication_interval,
                                       control.replication_threshold)
        return ReplicationPlanner(settings, self.model_config.num_experts, self.executor.collective_rpc("placement")[0])

    # ---- requests ----

    def add_request(self, request: EngineCoreRequest) -> None:
        """Queue one sequence; a ValueError (naming the problem) leaves the core unchanged."""
        if request.request_id in self.scheduler.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        n, vocab = len(request.prompt_token_ids), self.model_config.vocab_size
        if not 0 < n < self.max_model_len:
            raise ValueError(f"the prompt has {n} tokens; it must have 1 to {self.max_model_len - 1}")
        if not all(0 <= t < vocab for t in request.prompt_token_ids):
            raise ValueError(f"a prompt token id is outside the vocabulary [0, {vocab})")
        req = Request(request.request_id, list(request.prompt_token_ids), request.sampling_params,
                      frozenset(request.eos_token_ids), self.max_model_len, request.priority)
        req.arrival_time = time.monotonic()
        self.scheduler.add_request(req)
        self._received += 1

    def abort_requests(self, request_ids: list[str]) -> None:
        """Release the requests and all their blocks (unknown or finished ids are ignored)."""
        for request_id in request_ids:
            self.scheduler.abort(request_id)

    def has_work(self) -> bool:
        return bool(self.scheduler.requests)

    def _check_overlap(self, config: EngineConfig) -> None:
        """Split steps need per-step expert capacity to mean the same in both halves: with a
        capacity factor the split is off. Say so when the thresholds cannot be reached."""
        sched = self.scheduler
        if not sched.overlap:
            return
        if config.load.moe_capacity_factor is not None:
            sched.overlap = False
            logger.info("micro-batch overlap is off: the capacity factor caps experts per step, not per half")
            return
        workers = len(self.block_pools)
        if sched.overlap_decode > config.scheduler.max_num_seqs // workers and \
                sched.overlap_prefill > config.scheduler.max_num_batched_tokens // workers:
            logger.info("micro-batch overlap: no step can reach the thresholds (%d decode / %d prefill tokens per "
                        "worker) with --max-num-seqs %d and --max-num-batched-tokens %d over %d workers: steps are "
                        "not split", sched.overlap_decode, sched.overlap_prefill, config.scheduler.max_num_seqs,
                        config.scheduler.max_num_batched_tokens, workers)

    # ---- the step ----

    def step(self) -> EngineCoreOutputs:
        start = time.monotonic()
        self.faults.check("schedule")
        sched = self.scheduler.schedule()
        self._note_first_scheduled(sched, start)
        self._count_degraded(sched)
        try:
            result = self.executor.execute(sched)
        except WorkerFailure as e:
            return self._worker_failure(sched, e, start)
        except Exception as e:
            logger.exception("engine step failed; failing the %d requests in it", len(sched.num_scheduled_tokens))
            self.scheduler.discard_step(sched)
            failed = [self._fail(request_id, e) for request_id in sched.num_scheduled_tokens]
            return EngineCoreOutputs(failed, self._finish_step(sched, ModelRunnerOutput.empty(), start))
        outputs = [self._output(req) for req in self.scheduler.update_from_output(sched, result)]
        self._split_steps += sched.micro_batch_cut is not None  # steps that ran split, not those scheduled so
        stats = self._finish_step(sched, result, start)
        for controller in self.controllers:
            try:
                controller.between_steps(self, stats)
            except (WorkerFailure, WorkerCallError) as e:  # a control call on the group went wrong: rebuild it
                self.mark_lost(e if isinstance(e, WorkerFailure) else WorkerFailure(str(e)))
                break
        return EngineCoreOutputs(outputs + self.take_failed(), stats)

    def _note_first_scheduled(self, sched: SchedulerOutput, now: float) -> None:
        for new in sched.new_requests:
            req = self.scheduler.requests[new.request_id]
            if req.first_scheduled_time is None:
                req.first_scheduled_time = now
                req.num_cached_tokens = new.num_computed_tokens

    def expert_config(self, req: Request) -> tuple[int, int]:
        """(the K the request asked for, the K it runs at now: capped by its class's limit)."""
        requested = req.sampling_params.moe_top_k or self.model_config.top_k
        return requested, min(requested, self.class_limits.k_for(req.priority, requested))

    def _count_degraded(self, sched: SchedulerOutput) -> None:
        for request_id, (requested, running) in sched.top_k.items():
            if running < requested:
                n = sched.num_scheduled_tokens[request_id]
                self.scheduler.requests[request_id].num_degraded_tokens += n
                self._degraded_tokens += n

    def _output(self, req: Request) -> EngineCoreOutput:
        first = not req.reported
        req.reported = True
        if first:
            now = time.monotonic()
            self._recent_ttft.append((now, now - req.arrival_time))
        logprobs = [req.output_logprobs[-1]] if req.sampling_params.logprobs is not None else None
        return EngineCoreOutput(
            request_id=req.request_id,
            new_token_ids=[req.output_token_ids[-1]],
            new_logprobs=logprobs,
            finish_reason=req.status.value if req.status.finished else None,
            stop_reason=req.stop_reason,
            num_cached_tokens=req.num_cached_tokens if first else None,
            queue_time_s=req.first_scheduled_time - req.arrival_time if first else None,
            num_degraded_tokens=req.num_degraded_tokens,
        )

    def _fail(self, request_id: str, error: Exception, unavailable: bool = False) -> EngineCoreOutput:
        self.scheduler.abort(request_id)
        return EngineCoreOutput(request_id, error=f"{type(error).__name__}: {error}", unavailable=unavailable)

    def _worker_failure(self, sched: SchedulerOutput, error: WorkerFailure, start: float) -> EngineCoreOutputs:
        self.scheduler.discard_step(sched)
        self.mark_lost(error, list(sched.num_scheduled_tokens))
        return EngineCoreOutputs(self.take_failed(), self._finish_step(sched, ModelRunnerOutput.empty(), start))

    def mark_lost(self, error: WorkerFailure, victims: list[str] = ()) -> None:
        """Workers failed (in a step, a controller or a control call): fail `victims` and every
        request on a lost rank as unavailable, give the lost ranks fresh pools, and stop serving
        until `recover()`. With --ep-failure-policy fail, raise instead."""
        logger.error("expert-parallel workers failed: %s", error)
        if self.config.parallel.ep_failure_policy == "fail":
            raise error
        self._lost_ranks = tuple(sorted(set(self._lost_ranks) | set(error.ranks)))
        self._fail_ranks(error.ranks, error, victims)
        self.unavailable = f"rebuilding the expert-parallel workers: {error}"
        self._worker_failures += 1

    def _fail_ranks(self, ranks, error: Exception, victims: list[str] = ()) -> None:
        lost = set(ranks)
        victims = list(victims) + [r.request_id for r in self.scheduler.requests.values()
                                   if r.rank in lost and r.request_id not in victims]
        self._failed_outputs += [self._fail(request_id, error, unavailable=True) for request_id in victims
                                 if request_id in self.scheduler.requests]
        for rank in lost:  # its KV is gone with it: a fresh pool, no prefix-cache keys
            pool = BlockManager(self.num_kv_blocks, self.config.cache.block_size, self.config.cache.enable_prefix_caching)
            self.block_pools[rank] = self.scheduler.pools[rank] = pool
        self.block_manager = self.scheduler.block_manager = self.block_pools[0]

    def take_failed(self) -> list[EngineCoreOutput]:
        """Requests failed by a worker loss and not reported yet."""
        out, self._failed_outputs = self._failed_outputs, []
        return out

    @property
    def needs_recovery(self) -> bool:
        return self.unavailable is not None

    def recover(self, attempts: int = 3) -> None:
        """Rebuild the workers after a failure, restore what the core set on them, serve again.
        Ranks restarted beyond those named lose their requests too (see `take_failed`); a
        failure while rebuilding starts the rebuild again, `attempts` times at most."""
        began = time.monotonic()
        for attempt in range(attempts):
            try:
                self._rebuild()
                break
            except WorkerFailure as e:
                if attempt == attempts - 1:
                    raise
                self.mark_lost(e)
        self._last_recovery_s = time.monotonic() - began
        self._recovery_s_total += self._last_recovery_s
        self._worker_recoveries += 1
        self._lost_ranks = ()
        self.unavailable = None
        logger.warning("expert-parallel workers rebuilt in %.1f s", self._last_recovery_s)

    def _rebuild(self) -> None:
        restarted = self.executor.recover(self._lost_ranks)
        extra = set(restarted) - set(self._lost_ranks)
        if extra:
            self._fail_ranks(extra, WorkerFailure(f"worker(s) {sorted(extra)} restarted during recovery", extra))
        # the core's settings are the truth: a control call cut short may have reached some ranks
        for k in sorted(set(self.top_k)):
            self.executor.collective_rpc("set_top_k", k, [i for i, x in enumerate(self.top_k) if x == k])
        if self.config.control.degradation_layers:
            layers = [int(x) for x in self.config.control.degradation_layers.split(",") if x.strip()]
            self.executor.collective_rpc("set_degrade_layers", layers)
        if self.replication is not None:  # the workers' maps are the truth (a move may have been cut short)
            self.replication.resync(self.executor.collective_rpc("placement")[0])

    def _finish_step(self, sched: SchedulerOutput, result: ModelRunnerOutput, start: float) -> EngineStats:
        self._step += 1
        self._step_time = time.monotonic() - start
        decode = sched.num_decode_tokens
        prefill = sched.total_num_scheduled_tokens - decode
        if sched.total_num_scheduled_tokens:
            self._step_model.add(sched.total_num_scheduled_tokens, self._step_time)
            self._prefill_per_step = (1 - _RATE_ALPHA) * self._prefill_per_step + _RATE_ALPHA * prefill
        if self._step_time > 0:
            if prefill:
                self._prefill_rate = _ema(self._prefill_rate, prefill / self._step_time)
            if decode:
                self._decode_rate = _ema(self._decode_rate, decode / self._step_time)
        return self.stats(prefill, decode, result.expert_load)

    def stats(self, num_prefill_tokens: int = 0, num_decode_tokens: int = 0,
              expert_load: ExpertLoadStats | None = None) -> EngineStats:
        """The engine's state now; the step figures are those of the last step when given."""
        sched, pools = self.scheduler, self.block_pools
        by_priority = sched.waiting_tokens_by_priority()
        classes = {r.priority for r in sched.requests.values()}
        return EngineStats(
            step=self._step, timestamp=time.monotonic(), num_running=len(sched.running),
            num_waiting=sched.num_waiting, num_waiting_tokens=sum(by_priority.values()),
            waiting_tokens_by_priority=by_priority, num_blocks=sum(bm.num_blocks for bm in pools),
            num_free_blocks=sum(bm.num_free_blocks for bm in pools),
            step_time_s=self._step_time, num_prefill_tokens=num_prefill_tokens, num_decode_tokens=num_decode_tokens,
            prefill_tokens_per_s=self._prefill_rate, decode_tokens_per_s=self._decode_rate,
            step_time_base_s=self._step_model.base, step_time_per_token_s=self._step_model.per_token,
            prefill_tokens_per_step=self._prefill_per_step,
            top_k_by_class={p: self.class_limits.k_for(p, self.model_config.top_k) for p in sorted(classes)},
            num_degraded_tokens=self._degraded_tokens, recent_ttft_s=self._ttft_p90(),
            num_requests_received=self._received, num_preemptions=sched.num_preemptions, prefix_cache_hits=sum(bm.stats.hits for bm in pools), top_k=list(self.top_k),
            expert_load=expert_load, replication=self.replication.stats() if self.replication else None,
            running_by_rank=self._running_by_rank(), unavailable=self.unavailable,
            worker_failures=self._worker_failures, worker_recoveries=self._worker_recoveries,
            recovery_seconds_total=self._recovery_s_total, last_recovery_s=self._last_recovery_s,
            num_split_steps=self._split_steps,
        )

    def _running_by_rank(self) -> list[int]:
        counts = [0] * len(self.block_pools)
        for req in self.scheduler.running:
            counts[req.rank or 0] += 1
        return counts

    # ---- control ----

    def add_controller(self, controller: Controller) -> None:
        self.controllers.append(controller)

    def call(self, method: str, *args: Any) -> Any:
        """A control call by name (the front's UtilityCall): `set_top_k(k, moe_layers=None)`,
        `stats()`, or `collective_rpc(worker_method, *args)`. A worker lost on the way is
        `mark_lost` (the host then recovers) and the call answers with a ValueError saying so."""
        if self.unavailable is not None and method != "stats":
            raise ValueError(self.unavailable)
        try:
            if method == "set_top_k":
                return self.set_top_k(*args)
            if method == "stats":
                return self.stats()
            if method == "collective_rpc":
                return self.executor.collective_rpc(*args)
        except WorkerFailure as e:
            self.mark_lost(e)
            raise ValueError(f"expert-parallel workers failed: {e}") from e
        raise ValueError(f"unknown engine call {method!r}")

    def _ttft_p90(self, window_s: float = 10.0) -> float:
        """p90 of the engine-side TTFT of the requests whose first token came in the last window."""
        recent, horizon = self._recent_ttft, time.monotonic() - window_s
        while recent and recent[0][0] < horizon:
            recent.popleft()
        if not recent:
            return 0.0
        values = sorted(t for _, t in recent)
        return values[min(len(values) - 1, int(0.9 * len(values)))]

    def set_class_limits(self, limits: ClassLimits) -> None:
        """What the degradation controller allows each class, from the next step."""
        self.class_limits = limits

    def set_top_k(self, k: int, moe_layers: list[int] | None = None) -> None:
        """The K in force for every MoE layer (or the given MoE-layer indices), from the next step."""
        if not 1 <= k <= self.model_config.top_k:
            raise ValueError(f"top_k must lie in [1, {self.model_config.top_k}], got {k}")
        self.executor.collective_rpc("set_top_k", k, moe_layers)
        for layer in range(len(self.top_k)) if moe_layers is None else moe_layers:
            self.top_k[layer] = k

    def shutdown(self) -> None:
        self.executor.shutdown()


class StepTimeModel:
    """step_time ~ base + per_token * tokens, by exponentially weighted least squares over the
    steps seen (the newest weighs `1 / horizon` of the total). With too little spread in the
    token counts to separate the two, the line goes through the origin."""

    def __init__(self, horizon: int = 200):
        self.decay = 1 - 1 / horizon
        self._w = self._x = self._xx = self._y = self._xy = 0.0
        self.base = self.per_token = 0.0

    def add(self, tokens: int, seconds: float) -> None:
        d = self.decay
        self._w, self._x, self._xx = d * self._w + 1, d * self._x + tokens, d * self._xx + tokens * tokens
        self._y, self._xy = d * self._y + seconds, d * self._xy + tokens * seconds
        spread = self._w * self._xx - self._x * self._x
        if spread > 1e-9 * self._w * self._xx:
            per_token = (self._w * self._xy - self._x * self._y) / spread
            base = (self._y - per_token * self._x) / self._w
            if per_token > 0 and base >= 0:
                self.base, self.per_token = base, per_token
                return
        self.base, self.per_token = 0.0, self._xy / self._xx

    def predict(self, tokens: int) -> float:
        return self.base + self.per_token * tokens


def _ema(average: float, sample: float) -> float:
    return sample if average == 0 else (1 - _RATE_ALPHA) * average + _RATE_ALPHA * sample
