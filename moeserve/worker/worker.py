"""Worker: the model, its KV cache and the model runner on one device.

The executor drives it in three phases: `load_model`, then `available_kv_blocks` (each worker
measures what fits; the executor takes the minimum) and `initialize_cache`, then
`execute_model` every step. Control calls (`set_top_k`, `expert_load`, ...) reach it through
the executor's `collective_rpc`, by method name.
"""

from __future__ import annotations

import logging
import os

import torch

from moeserve.checkpoint import load_model
from moeserve.config import EngineConfig
from moeserve.engine.faults import FaultInjector
from moeserve.engine.scheduler import SchedulerOutput
from moeserve.model.attention import PagedKVCache
from moeserve.model.decoder import MoEForCausalLM
from moeserve.model.moe import SlotLayout
from moeserve.model.moe.dispatch import ExpertParallelGroup
from moeserve.model_config import ModelConfig, resolve_device
from moeserve.worker import kv_sizing
from moeserve.worker.cuda_graph import DEFAULT_BUCKETS, DecodeGraphs, DecodeInputs
from moeserve.worker.model_runner import ModelRunner, ModelRunnerOutput
from moeserve.worker.sampler import Sampler

logger = logging.getLogger(__name__)


class Worker:
    """`rank` and `group` place it in the expert-parallel data-plane group (a torch.distributed
    process group of `config.parallel.world_size` workers); with one worker there is none."""

    def __init__(self, config: EngineConfig, faults: FaultInjector | None = None, rank: int = 0,
                 group: object | None = None, host: str = "127.0.0.1"):
        self.config = config
        self.faults = faults or FaultInjector()
        self.rank, self.group, self.host = rank, group, host
        self.device = resolve_device(config.load.device)
        if self.device == "cuda" and torch.cuda.device_count() > 1:  # local workers: one GPU each
            self.device = f"cuda:{rank % torch.cuda.device_count()}"
        self.model: MoEForCausalLM | None = None
        self.runner: ModelRunner | None = None
        self.max_model_len: int | None = None  # the engine's, told with available_kv_blocks

    def load_model(self) -> ModelConfig:
        load, parallel = self.config.load, self.config.parallel
        ep = None
        if parallel.world_size > 1:
            mc = ModelConfig.from_pretrained(load.model)
            layout = SlotLayout(mc.num_experts, mc.num_experts + load.num_redundant_experts, parallel.world_size)
            offset, count = layout.group_slots(self.rank)
            ep = ExpertParallelGroup(self.rank, parallel.world_size, self.group, offset, count)
        self.model = load_model(load.model, dtype=load.dtype, device=self.device,
                                num_redundant_experts=load.num_redundant_experts, expert_backend=load.expert_backend,
                                attention_backend=load.attention_backend, expert_slot_groups=parallel.num_slot_groups,
                                ep=ep, cpu_gemm=load.cpu_gemm)
        self.model.load.enabled = self.config.control.record_expert_load
        self.model.set_capacity(load.moe_capacity_factor, load.moe_overflow)
        return self.model.config

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def available_kv_blocks(self, max_model_len: int) -> int:
        """See kv_sizing: a measured budget on the GPU, a fixed share of memory on the CPU."""
        cache, sched = self.config.cache, self.config.scheduler
        self.max_model_len = max_model_len
        if cache.num_kv_blocks is not None:
            return cache.num_kv_blocks
        budget = cache.kv_cache_memory_bytes
        if budget is None:
            device = torch.device(self.device)
            if device.type == "cuda":
                budget = self._profile_gpu_budget(device, max_model_len)
            else:
                budget = kv_sizing.cpu_kv_budget(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
        block_bytes = kv_sizing.kv_block_bytes(self.model.config, cache.block_size, self.dtype)
        return kv_sizing.num_kv_blocks(budget, block_bytes, sched.max_num_seqs, max_model_len, cache.block_size)

    def _profile_gpu_budget(self, device: torch.device, max_model_len: int) -> int:
        cache, sched = self.config.cache, self.config.scheduler
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        scratch = kv_sizing.profile_step(self.model, sched.max_num_batched_tokens, sched.max_num_seqs, max_model_len,
                                         cache.block_size)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before - scratch
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(device)
        budget = kv_sizing.gpu_kv_budget(total, total - free, peak, cache.gpu_memory_utilization)
        logger.info("KV cache budget %.2f GiB: %.0f%% of %.1f GiB, %.2f GiB in use, %.2f GiB peak activations",
                    budget / 2**30, 100 * cache.gpu_memory_utilization, total / 2**30, (total - free) / 2**30,
                    peak / 2**30)
        return budget

    def initialize_cache(self, num_blocks: int) -> None:
        """The KV cache of `num_blocks` blocks (one more, never handed out, as the decode graphs'
        scratch block when they are on) and the runner."""
        graphs = self.config.load.cuda_graphs
        block_size = self.config.cache.block_size
        cache = PagedKVCache.for_model(self.model.config, num_blocks + int(graphs), block_size, self.dtype,
                                       self.device)
        decode = None
        if graphs:
            max_model_len = self.max_model_len or self.model.config.max_position_embeddings
            max_seqs = self.config.scheduler.max_num_seqs
            max_batch = next((b for b in DEFAULT_BUCKETS if b >= max_seqs), DEFAULT_BUCKETS[-1])
            inputs = DecodeInputs(max_batch=max_batch, max_num_seqs=max_seqs,
                                  blocks_per_seq=-(-max_model_len // block_size), max_diffs=min(max_seqs, 256),
                                  block_size=block_size, scratch_block=num_blocks, device=self.device)
            decode = DecodeGraphs(self.model, cache, inputs, max_model_len,
                                  capture=torch.device(self.device).type == "cuda")
        self.runner = ModelRunner(self.model, cache, Sampler(self.config.load.seed), self.faults, self.rank, decode)

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        self.faults.check("hang")
        return self.runner.execute(scheduler_output)

    # ---- control calls (collective_rpc) ----

    def device_name(self) -> str:
        if torch.device(self.device).type == "cuda":
            return torch.cuda.get_device_name(torch.device(self.device))
        return self.device

    def set_top_k(self, k: int, moe_layers: list[int] | None = None) -> None:
        self.model.set_top_k(k, moe_layers)

    def set_degrade_layers(self, moe_layers: list[int] | None) -> None:
        self.model.set_degrade_layers(moe_layers)

    # ---- the data-plane group (expert parallelism) ----

    def rendezvous(self) -> tuple[str, int]:
        """An address where this worker can host a new group's store."""
        from moeserve.executor.worker_proc import free_port

        return self.host, free_port(self.host)

    def rejoin_group(self, dist_url: str) -> None:
        """Leave the broken group and join a fresh one (the executor's recovery); the model's
        MoE layers then talk over the new group."""
        import datetime

        import torch.distributed as dist

        parallel = self.config.parallel
        backend = dist.get_backend() if dist.is_initialized() else "gloo"
        logger.info("worker %d: leaving the group", self.rank)
        try:
            dist.destroy_process_group()
        except Exception:  # a group broken by a dead peer may not close cleanly; it is dropped either way
            logger.warning("worker %d: the old group did not close cleanly", self.rank, exc_info=True)
        logger.info("worker %d: joining %s", self.rank, dist_url)
        dist.init_process_group(backend, init_method=dist_url, rank=self.rank, world_size=parallel.world_size,
                                timeout=datetime.timedelta(seconds=parallel.distributed_timeout))
        logger.info("worker %d: joined", self.rank)
        self.group = dist.group.WORLD
        if self.model is not None and self.model.ep is not None:
            self.model.set_ep_group(self.group)

    def placement_maps(self) -> list[tuple[list[int], list[list[int]], list[int]]]:
        """Each MoE layer's (phy2log, log2phy, replica_count) as this worker holds them."""
        return [(m.placement.phy2log.tolist(), m.placement.log2phy.tolist(), m.placement.replica_count.tolist())
                for m in self.model.moe_layers]

    def set_placement(self, maps: list[tuple[list[int], list[list[int]], list[int]]]) -> None:
        """Take the group's placement (a restarted worker): read from the checkpoint the experts
        the maps put in this worker's slots that its start layout did not, then the maps."""
        from moeserve.checkpoint import read_expert

        for moe, (phy2log, log2phy, count) in zip(self.model.moe_layers, maps):
            for local in range(moe.w13.shape[0]):
                expert = phy2log[moe.slot_offset + local]
                if expert >= 0 and expert != int(moe.placement.phy2log[moe.slot_offset + local]):
                    values = read_expert(self.config.load.model, self.model.config,
                                         self.model.config.moe_layer_ids[moe.moe_layer], expert)
                    for tensor, value in zip(moe.slot_tensors(), values):
                        tensor[local].copy_(value)
                    moe.repack(local)
            moe.placement.phy2log.copy_(torch.tensor(phy2log))
            moe.placement.log2phy.copy_(torch.tensor(log2phy))
            moe.placement.replica_count.copy_(torch.tensor(count))

    def pid(self) -> int:
        return os.getpid()

    def comm_seconds(self) -> tuple[float, int]:
        """(seconds, calls) in the expert all-to-alls since the last ask (0 with one worker)."""
        return self.model.ep.timer.take() if self.model.ep is not None else (0.0, 0)

    def expert_weight_bytes(self) -> int:
        """Bytes of expert weights resident on this worker (its slots only)."""
        return sum(t.numel() * t.element_size() for moe in self.model.moe_layers for t in moe.slot_tensors())

    def slot_codes(self) -> list[dict[int, tuple[float, float]]]:
        """Per MoE layer: global slot -> (mean of its w13, mean of its w2), for this worker's
        slots (tests encode an expert's id in its weights)."""
        return [{moe.slot_offset + i: (float(moe.w13[i].float().mean()), float(moe.w2[i].float().mean()))
                 for i in range(moe.w13.shape[0])} for moe in self.model.moe_layers]

    def placement(self) -> list[tuple[list[int], list[int]]]:
        """Each MoE layer's (phy2log [P], slot group [P]) as this worker holds it."""
        return [(moe.placement.phy2log.tolist(), moe.placement.slot_rank.tolist()) for moe in self.model.moe_layers]

    def replicate_expert(self, moe_layer: int, expert: int, slot: int) -> None:
        """Copy `expert` into the empty `slot` of one MoE layer and publish it (from the next step)."""
        self.model.moe_layers[moe_layer].replicate(expert, slot)

    def retire_replica(self, moe_layer: int, slot: int) -> None:
        self.model.moe_layers[moe_layer].retire(slot)
