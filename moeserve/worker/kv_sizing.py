"""How many KV-cache blocks to allocate at start.

    GPU:  budget = gpu_memory_utilization x total memory
                   - memory in use after loading (weights, CUDA context, other processes)
                   - peak activation memory of the largest step
    CPU:  budget = min(1 GiB, a quarter of the memory available)

The peak activation is measured, as vLLM's profile run does, by running the largest step the
scheduler can send (max_num_batched_tokens prompt tokens, logits and a sort for max_num_seqs
rows; for MLA also the last chunk of a max_model_len prompt, whose whole context prefill
decompresses) before the cache exists: sizing the cache from free memory alone leaves nothing
for the first large prefill. Either budget can be overridden (kv_cache_memory_bytes, num_kv_blocks).
The number of blocks never exceeds what max_num_seqs sequences of max_model_len tokens can use.
"""

from __future__ import annotations

import torch

from moeserve.model_config import ModelConfig
from moeserve.model.attention import AttentionMetadata, PagedKVCache
from moeserve.model.decoder import MoEForCausalLM

CPU_BUDGET_CAP = 1 << 30


def kv_block_bytes(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one block across every layer: keys and values, or MLA's one latent entry."""
    heads, key_dim, value_dim = config.kv_entry
    per_token = heads * (key_dim if config.mla is not None else key_dim + value_dim)
    return config.num_layers * block_size * per_token * dtype.itemsize


def gpu_kv_budget(total: int, used_after_load: int, peak_activation: int, utilization: float) -> int:
    """The GPU formula above; a ValueError naming the figures when nothing is left."""
    if not 0 < utilization <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {utilization}")
    budget = int(utilization * total) - used_after_load - peak_activation
    if budget <= 0:
        gib = 1 << 30
        raise ValueError(
            f"no memory left for the KV cache: {utilization:.0%} of {total / gib:.1f} GiB, less "
            f"{used_after_load / gib:.2f} GiB in use after loading and {peak_activation / gib:.2f} GiB peak activations "
            "of the largest step; raise gpu_memory_utilization or lower max_num_batched_tokens"
        )
    return budget


def cpu_kv_budget(available: int) -> int:
    return min(CPU_BUDGET_CAP, available // 4)


def num_kv_blocks(budget: int, block_bytes: int, max_num_seqs: int, max_model_len: int, block_size: int) -> int:
    useful = max_num_seqs * -(-max_model_len // block_size)  # more blocks are never used
    return max(1, min(budget // block_bytes, useful))


@torch.inference_mode()
def profile_step(model: MoEForCausalLM, num_tokens: int, max_num_seqs: int, max_model_len: int,
                 block_size: int) -> int:
    """Run the largest step once on dummy tokens, into a scratch cache; returns the scratch
    cache's bytes (to leave out of the measured peak). Leaves no state behind in the model."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    seq_len = max(1, min(num_tokens, max_model_len - 1))
    lengths = [seq_len] * (num_tokens // seq_len) + ([num_tokens % seq_len] if num_tokens % seq_len else [])
    blocks_per_seq = [-(-n // block_size) for n in lengths]
    scratch = PagedKVCache.for_model(model.config, sum(blocks_per_seq), block_size, dtype, device)
    tables, start = [], 0
    for n in blocks_per_seq:
        tables.append(list(range(start, start + n)))
        start += n
    meta = AttentionMetadata.build(lengths, lengths, tables, block_size, device)
    input_ids = torch.zeros(num_tokens, dtype=torch.int64, device=device)
    hidden = model(input_ids, meta, scratch)  # [T, D]
    rows = hidden[-1:].expand(max_num_seqs, -1)  # [N, D]
    logits = model.compute_logits(rows).float()  # [N, V]
    torch.sort(torch.softmax(logits, dim=-1), dim=-1, descending=True)  # what top-p needs
    scratch_bytes = scratch.nbytes
    del scratch, hidden, rows, logits
    if model.config.mla is not None and max_model_len > seq_len:
        # MLA prefill decompresses the whole context of a chunk: its worst case is the last
        # chunk of a max_model_len prompt, not a fresh prompt of the chunk's length.
        chunk = min(num_tokens, max_model_len)
        blocks = -(-max_model_len // block_size)
        scratch = PagedKVCache.for_model(model.config, blocks, block_size, dtype, device)
        meta = AttentionMetadata.build([chunk], [max_model_len], [list(range(blocks))], block_size, device)
        model(torch.zeros(chunk, dtype=torch.int64, device=device), meta, scratch)
        scratch_bytes = max(scratch_bytes, scratch.nbytes)
    model.load.reset_state()
    return scratch_bytes
