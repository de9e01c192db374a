"""KV-cache sizing: the GPU budget leaves room for the largest step's activations."""

from __future__ import annotations

import pytest
import torch

from moeserve import load_model
from moeserve.worker import kv_sizing

GiB = 1 << 30


def test_the_gpu_budget_subtracts_what_is_in_use_and_the_peak_step():
    # 80 GiB card, 90%: 72 GiB for everything; 20 GiB in use after loading, 3 GiB peak activations.
    assert kv_sizing.gpu_kv_budget(80 * GiB, 20 * GiB, 3 * GiB, 0.9) == 49 * GiB
    # Sizing from free memory alone (the old rule) would have taken 0.9 x 60 = 54 GiB, leaving
    # less than the measured 3 GiB peak once the cache is allocated.
    assert 80 * GiB - 20 * GiB - kv_sizing.gpu_kv_budget(80 * GiB, 20 * GiB, 3 * GiB, 0.9) >= 3 * GiB
    with pytest.raises(ValueError, match="no memory left for the KV cache"):
        kv_sizing.gpu_kv_budget(80 * GiB, 70 * GiB, 3 * GiB, 0.9)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        kv_sizing.gpu_kv_budget(80 * GiB, 1, 1, 1.5)


def test_block_count_arithmetic(checkpoints):
    from moeserve import ModelConfig

    config = ModelConfig.from_pretrained(checkpoints("mixtral"))
    block = kv_sizing.kv_block_bytes(config, 16, torch.bfloat16)
    assert block == 2 * config.num_layers * 16 * config.num_kv_heads * config.head_dim * 2
    assert kv_sizing.num_kv_blocks(10 * block + 5, block, max_num_seqs=100, max_model_len=4096, block_size=16) == 10
    # Never more than max_num_seqs full-length sequences can use.
    assert kv_sizing.num_kv_blocks(10**6 * block, block, max_num_seqs=2, max_model_len=100, block_size=16) == 14
    assert kv_sizing.cpu_kv_budget(100 * GiB) == GiB and kv_sizing.cpu_kv_budget(2 * GiB) == GiB // 2


def test_the_profile_step_runs_the_largest_batch_and_leaves_no_state(checkpoints):
    model = load_model(checkpoints("mixtral"))
    scratch = kv_sizing.profile_step(model, num_tokens=300, max_num_seqs=8, max_model_len=128, block_size=16)
    # 300 tokens in sequences of at most 127: 127 + 127 + 46 -> 8 + 8 + 3 blocks.
    assert scratch == 19 * kv_sizing.kv_block_bytes(model.config, 16, torch.float32)
    assert int(model.expert_load().logical.sum()) == 0


@pytest.mark.gpu
def test_a_cuda_engine_sizes_its_cache_under_the_measured_budget(checkpoints):
    from moeserve.config import engine_config
    from moeserve.engine.llm_engine import LLMEngine

    engine = LLMEngine(engine_config(str(checkpoints("mixtral")), device="cuda", max_model_len=256,
                                    max_num_batched_tokens=4096, max_num_seqs=100_000,
                                    gpu_memory_utilization=0.5))
    free, total = torch.cuda.mem_get_info()
    assert total - free <= 0.5 * total + 64 * 2**20  # the cache stayed inside the share
    assert engine.core.num_kv_blocks >= 256 // 16
