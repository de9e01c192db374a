"""LLMEngine: input processing -> Scheduler -> ModelRunner -> detokenise and stop -> outputs.

`step()` is the whole loop: schedule, execute, update, detokenise. Requests with n > 1 become
n child requests (ids "{i}_{id}", seeds seed + i) that share the prompt's blocks through the
prefix cache and are reported together under the parent id.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from moeserve.checkpoint import load_model
from moeserve.config import GenerationDefaults, resolve_device
from moeserve.engine import kv_sizing
from moeserve.engine.block_manager import BlockManager
from moeserve.engine.detokenizer import IncrementalDetokenizer
from moeserve.engine.faults import FaultInjector
from moeserve.engine.load_monitor import LoadMonitor
from moeserve.engine.model_runner import ModelRunner
from moeserve.engine.request import Request, RequestStatus
from moeserve.engine.sampler import Sampler
from moeserve.engine.scheduler import Scheduler, SchedulerConfig
from moeserve.model.attention import PagedKVCache
from moeserve.outputs import CompletionOutput, RequestOutput
from moeserve.sampling_params import SamplingParams
from moeserve.tokenizer import Tokenizer

Prompt = str | list[int] | dict[str, Any]
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    """Engine settings; flag names follow vLLM's. Derived at start (not stored here): the number
    of KV blocks, from `num_kv_blocks` or the memory budget."""

    model: str
    dtype: str = "auto"
    device: str = "auto"  # auto: CUDA when available, else the CPU
    max_model_len: int | None = None  # default: the checkpoint's max_position_embeddings
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    num_kv_blocks: int | None = None  # overrides the memory budget
    kv_cache_memory_bytes: int | None = None  # default: measured on the GPU, <= 1 GiB on CPU (kv_sizing)
    gpu_memory_utilization: float = 0.9  # share of the GPU's memory moeserve may use in all
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    expert_backend: str = "auto"  # auto: triton on CUDA, torch on CPU
    attention_backend: str = "auto"
    num_redundant_experts: int = 0
    record_expert_load: bool = True  # per-step expert counts (metrics); off = no accounting work
    seed: int = 0


@dataclass
class _Group:
    """A caller's request: one child per sample (n)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[Request]
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None
    num_cached_tokens: int = 0
    last_sent: dict[str, int] = field(default_factory=dict)  # child id -> tokens already reported


@dataclass(frozen=True)
class RequestFailure:
    """A request the engine could not serve: it is released; the others go on."""

    request_id: str
    message: str


class LLMEngine:
    def __init__(self, config: EngineConfig, faults: FaultInjector | None = None):
        self.config = config
        self.faults = faults or FaultInjector()
        self.device = resolve_device(config.device)
        self.model = load_model(
            config.model, dtype=config.dtype, device=self.device,
            num_redundant_experts=config.num_redundant_experts, expert_backend=config.expert_backend,
            attention_backend=config.attention_backend,
        )
        self.model.load.enabled = config.record_expert_load
        self.model_config = self.model.config
        self.tokenizer = Tokenizer(config.model)
        generation = GenerationDefaults.from_pretrained(config.model, self.model_config)
        self.generation_defaults = generation
        eos = set(generation.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        self.max_model_len = config.max_model_len or self.model_config.max_position_embeddings
        dtype = next(self.model.parameters()).dtype
        self.num_kv_blocks = self._count_kv_blocks(dtype)
        if self.num_kv_blocks * config.block_size < self.max_model_len:
            raise ValueError(
                f"the KV cache holds {self.num_kv_blocks * config.block_size} tokens, fewer than "
                f"max_model_len={self.max_model_len}: lower max_model_len or give the cache more memory"
            )
        self.kv_cache = PagedKVCache.for_model(self.model_config, self.num_kv_blocks, config.block_size, dtype,
                                               self.device)
        self.block_manager = BlockManager(self.num_kv_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(self.max_model_len, config.max_num_seqs, config.max_num_batched_tokens,
                            config.enable_chunked_prefill),
            self.block_manager,
        )
        self.runner = ModelRunner(self.model, self.kv_cache, Sampler(config.seed), self.eos_token_ids, self.faults)
        device = next(self.model.parameters()).device
        self.load_monitor = LoadMonitor(self.model_config.num_moe_layers, self.model_config.num_experts, device)
        self._groups: dict[str, _Group] = {}
        self._parent: dict[str, str] = {}
        self._detok: dict[str, IncrementalDetokenizer] = {}

    def _count_kv_blocks(self, dtype: torch.dtype) -> int:
        """See kv_sizing: a measured budget on the GPU, a fixed share of memory on the CPU."""
        cfg = self.config
        if cfg.num_kv_blocks is not None:
            return cfg.num_kv_blocks
        budget = cfg.kv_cache_memory_bytes
        if budget is None:
            device = torch.device(self.device)
            if device.type == "cuda":
                budget = self._profile_gpu_budget(device)
            else:
                budget = kv_sizing.cpu_kv_budget(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
        block_bytes = kv_sizing.kv_block_bytes(self.model_config, cfg.block_size, dtype)
        return kv_sizing.num_kv_blocks(budget, block_bytes, cfg.max_num_seqs, self.max_model_len, cfg.block_size)

    def _profile_gpu_budget(self, device: torch.device) -> int:
        cfg = self.config
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        scratch = kv_sizing.profile_step(self.model, cfg.max_num_batched_tokens, cfg.max_num_seqs,
                                         self.max_model_len, cfg.block_size)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before - scratch
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(device)
        budget = kv_sizing.gpu_kv_budget(total, total - free, peak, cfg.gpu_memory_utilization)
        logger.info("KV cache budget %.2f GiB: %.0f%% of %.1f GiB, %.2f GiB in use, %.2f GiB peak activations",
                    budget / 2**30, 100 * cfg.gpu_memory_utilization, total / 2**30, (total - free) / 2**30,
                    peak / 2**30)
        return budget

    # ---- input processing (pure: safe to call from any thread) ----

    def process_request(self, request_id: str, prompt: Prompt, params: SamplingParams | dict | None = None,
                        priority: int = 0) -> _Group:
        """Validate and tokenise; raises ValueError naming the problem, touching no engine state."""
        if isinstance(params, dict):
            params = SamplingParams.from_dict(params)
        params = params or SamplingParams()
        text: str | None = None
        if isinstance(prompt, str):
            text, token_ids = prompt, self.tokenizer.encode(prompt)
        elif isinstance(prompt, dict):
            unknown = set(prompt) - {"prompt_token_ids", "prompt"}
            if unknown or "prompt_token_ids" not in prompt:
                raise ValueError("a dict prompt must be {'prompt_token_ids': [...]}")
            token_ids = list(prompt["prompt_token_ids"])
        else:
            token_ids = list(prompt)
        if not token_ids:
            raise ValueError("the prompt is empty")
        vocab = self.model_config.vocab_size
        bad = [t for t in token_ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token id {bad[0]!r} is outside the vocabulary [0, {vocab})")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(token_ids)} tokens; max_model_len={self.max_model_len} leaves no room to generate"
            )
        children = []
        for i in range(params.n):
            child_params = params
            if params.n > 1:
                seed = None if params.seed is None else params.seed + i
                child_params = SamplingParams(**{**params.__dict__, "n": 1, "seed": seed})
            child_id = request_id if params.n == 1 else f"{i}_{request_id}"
            children.append(Request(child_id, token_ids, child_params, self.eos_token_ids, self.max_model_len, priority))
        return _Group(request_id, text, token_ids, children)

    def add_processed(self, group: _Group) -> None:
        if group.request_id in self._groups:
            raise ValueError(f"request id {group.request_id!r} is already in use")
        self._groups[group.request_id] = group
        for child in group.children:
            self._parent[child.request_id] = group.request_id
            self._detok[child.request_id] = IncrementalDetokenizer(self.tokenizer, child.prompt_token_ids,
                                                                   child.sampling_params)
            self.scheduler.add_request(child)

    def add_request(self, request_id: str, prompt: Prompt, params: SamplingParams | dict | None = None,
                    priority: int = 0) -> None:
        self.add_processed(self.process_request(request_id, prompt, params, priority))

    # ---- the loop ----

    def has_unfinished_requests(self) -> bool:
        return bool(self._groups)

    def step(self) -> list[RequestOutput | RequestFailure]:
        """One engine step. An exception in the batch's forward fails the requests of that batch;
        one in a request's own post-processing fails that request alone. Either way the failed
        requests are released and the engine stays usable."""
        self.faults.check("schedule")
        sched = self.scheduler.schedule()
        now = time.monotonic()
        for new in sched.new_requests:
            group = self._groups[self._parent[new.request_id]]
            group.first_scheduled_time = group.first_scheduled_time or now
            group.num_cached_tokens = max(group.num_cached_tokens, new.num_computed_tokens)
        try:
            sampled = self.runner.execute(sched)
        except Exception as e:
            logger.exception("engine step failed; failing the %d requests in it", len(sched.num_scheduled_tokens))
            self.scheduler.discard_step(sched)
            batch = {self._parent[r] for r in sched.num_scheduled_tokens if r in self._parent}
            return [self._fail(self._groups[g], e) for g in batch if g in self._groups]
        if sched.num_scheduled_tokens and self.config.record_expert_load:
            self.load_monitor.update(self.model.expert_load())
        results: list[RequestOutput | RequestFailure] = []
        touched: dict[str, None] = {}
        for req in self.scheduler.update_from_output(sched, sampled):
            group_id = self._parent.get(req.request_id)
            if group_id is None or group_id not in self._groups:
                continue  # its group failed earlier in this step
            try:
                detok = self._detok[req.request_id]
                stop = detok.add_token(req.output_token_ids[-1])
                if stop is not None and len(req.output_token_ids) >= req.sampling_params.min_tokens:
                    req.stop_reason = stop
                    self.scheduler.finish(req, RequestStatus.FINISHED_STOPPED)
                touched[group_id] = None
            except Exception as e:
                logger.exception("request %s failed", group_id)
                touched.pop(group_id, None)
                results.append(self._fail(self._groups[group_id], e))
        for group_id in touched:
            try:
                results.append(self._output(self._groups[group_id]))
            except Exception as e:
                logger.exception("request %s failed", group_id)
                results.append(self._fail(self._groups[group_id], e))
        return results

    def _fail(self, group: _Group, error: Exception) -> RequestFailure:
        self.abort_request(group.request_id)
        return RequestFailure(group.request_id, f"{type(error).__name__}: {error}")

    def abort_request(self, request_id: str) -> None:
        """Abort a caller's request (all its samples); its blocks are free when this returns."""
        group = self._groups.pop(request_id, None)
        if group is None:
            return
        for child in group.children:
            self.scheduler.abort(child.request_id)
            self._forget(child.request_id)

    def _forget(self, child_id: str) -> None:
        self._parent.pop(child_id, None)
        self._detok.pop(child_id, None)

    def _output(self, group: _Group) -> RequestOutput:
        outputs = []
        for i, child in enumerate(group.children):
            detok = self._detok[child.request_id]
            finished = child.status.finished
            if finished:
                detok.flush()
            sent = group.last_sent.get(child.request_id, 0)
            group.last_sent[child.request_id] = len(child.output_token_ids)
            logprobs = tuple(child.output_logprobs) if child.sampling_params.logprobs is not None else None
            cumulative = (
                sum(lp[t] for lp, t in zip(child.output_logprobs, child.output_token_ids)) if logprobs else None
            )
            outputs.append(CompletionOutput(
                index=i,
                text=detok.text,
                token_ids=tuple(child.output_token_ids),
                cumulative_logprob=cumulative,
                logprobs=logprobs,
                finish_reason=child.status.value if finished else None,
                stop_reason=child.stop_reason,
                delta_text=detok.take_delta(finished),
                delta_token_ids=tuple(child.output_token_ids[sent:]),
            ))
        done = all(o.finished for o in outputs)
        if done:
            del self._groups[group.request_id]
            for child in group.children:
                self._forget(child.request_id)
        queue_time = None if group.first_scheduled_time is None else group.first_scheduled_time - group.arrival_time
        return RequestOutput(group.request_id, group.prompt, tuple(group.prompt_token_ids), tuple(outputs), done,
                             group.num_cached_tokens, queue_time)
