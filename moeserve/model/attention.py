"""Grouped-query attention over a paged KV cache.

Shape legend (shared/DESIGN.md) plus: S sequences in the step, B tokens per KV block,
H query heads, Hkv key/value heads, G = H / Hkv, Dh head dim, L longest context in the step.

Cache layout: each layer owns key and value tensors [num_blocks, B, Hkv, Dh]. Token position p of
sequence s lives in block `block_tables[s, p // B]` at offset `p % B`, i.e. flat slot
`block_tables[s, p // B] * B + p % B`.

    sequence s:  | cached prefix (computed earlier) | new tokens of this step |
                 0                      seq_len - q_len               seq_len
    every new token attends to all keys at positions <= its own (and > pos - window)

The torch path pads the step to [S, max_query_len] queries and [S, L] keys so that there is no
per-sequence Python loop; the Triton kernels (kernels issue) read the blocks in place instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moeserve.config import ModelConfig
from moeserve.model.layers import RMSNorm, apply_rotary


@dataclass(frozen=True)
class AttentionMetadata:
    """One step's flat batch: S sequences, T new tokens in sequence order.

    Invariants: sequence s owns flat tokens query_start_loc[s] : query_start_loc[s + 1]; they sit
    at the last q_len(s) positions before seq_lens[s] (new tokens always extend the cached
    prefix, so positions are contiguous from 0); block_tables[s] covers ceil(seq_lens[s] / B)
    blocks. `token_seq`/`token_index` place each flat token in the padded [S, max_query_len] grid.
    """

    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64
    query_start_loc: torch.Tensor  # [S + 1] int64
    seq_lens: torch.Tensor  # [S] int64
    block_tables: torch.Tensor  # [S, max_blocks] int64
    token_seq: torch.Tensor  # [T] int64
    token_index: torch.Tensor  # [T] int64
    max_query_len: int
    max_seq_len: int
    block_size: int

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        seq_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> AttentionMetadata:
        """Derive every per-token tensor from per-sequence lengths and block tables."""
        if not (len(query_lens) == len(seq_lens) == len(block_tables)) or not query_lens:
            raise ValueError("query_lens, seq_lens and block_tables must be non-empty and of equal length")
        for q, n, blocks in zip(query_lens, seq_lens, block_tables):
            if not 0 < q <= n or len(blocks) * block_size < n:
                raise ValueError(f"bad sequence: query_len={q}, seq_len={n}, {len(blocks)} blocks of {block_size}")
        width = max(len(b) for b in block_tables)
        tables = torch.tensor([b + [0] * (width - len(b)) for b in block_tables], dtype=torch.int64)
        q_lens = torch.tensor(query_lens, dtype=torch.int64)
        s_lens = torch.tensor(seq_lens, dtype=torch.int64)
        qsl = torch.zeros(len(query_lens) + 1, dtype=torch.int64)
        qsl[1:] = torch.cumsum(q_lens, 0)
        num_tokens = int(qsl[-1])
        token_seq = torch.repeat_interleave(torch.arange(len(query_lens)), q_lens, output_size=num_tokens)
        token_index = torch.arange(num_tokens) - qsl[token_seq]
        positions = s_lens[token_seq] - q_lens[token_seq] + token_index
        slots = tables[token_seq, positions // block_size] * block_size + positions % block_size
        return cls(
            positions=positions.to(device),
            slot_mapping=slots.to(device),
            query_start_loc=qsl.to(device),
            seq_lens=s_lens.to(device),
            block_tables=tables.to(device),
            token_seq=token_seq.to(device),
            token_index=token_index.to(device),
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            block_size=block_size,
        )


class PagedKVCache:
    """Key/value blocks of every attention layer, allocated once; block ids are shared by layers."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ):
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.key = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.value = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @classmethod
    def for_model(cls, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device="cpu"):
        return cls(config.num_layers, num_blocks, block_size, config.num_kv_heads, config.head_dim, dtype, device)


def paged_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    """q [T, H, Dh] against cached keys/values (already holding this step's tokens) -> [T, H, Dh].

    Softmax runs in fp32 and its result is cast to q's dtype before the value product, as
    transformers' eager attention does.
    """
    S, Qmax, L, B = meta.num_seqs, meta.max_query_len, meta.max_seq_len, meta.block_size
    T, H, Dh = q.shape
    Hkv = key_cache.shape[2]
    G = H // Hkv
    nb = -(-L // B)
    tables = meta.block_tables[:, :nb]  # [S, nb]
    keys = key_cache[tables].reshape(S, nb * B, Hkv, Dh)[:, :L]  # [S, L, Hkv, Dh]
    values = value_cache[tables].reshape(S, nb * B, Hkv, Dh)[:, :L]  # [S, L, Hkv, Dh]

    q_pad = q.new_zeros(S, Qmax, H, Dh)
    q_pad[meta.token_seq, meta.token_index] = q
    q_pos = torch.full((S, Qmax), -1, dtype=torch.int64, device=q.device)
    q_pos[meta.token_seq, meta.token_index] = meta.positions  # padding rows see no key
    k_pos = torch.arange(L, device=q.device)
    allowed = k_pos[None, None, :] <= q_pos[:, :, None]  # [S, Qmax, L]
    if window is not None:
        allowed &= k_pos[None, None, :] > q_pos[:, :, None] - window

    q_g = q_pad.view(S, Qmax, Hkv, G, Dh).permute(0, 2, 3, 1, 4).reshape(S, Hkv, G * Qmax, Dh)
    scores = torch.matmul(q_g, keys.permute(0, 2, 3, 1)) * scale  # [S, Hkv, G*Qmax, L]
    scores = scores.view(S, Hkv, G, Qmax, L).masked_fill(~allowed[:, None, None], torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs.view(S, Hkv, G * Qmax, L), values.permute(0, 2, 1, 3))  # [S, Hkv, G*Qmax, Dh]
    out = out.view(S, Hkv, G, Qmax, Dh).permute(0, 3, 1, 2, 4).reshape(S, Qmax, H, Dh)
    return out[meta.token_seq, meta.token_index]  # [T, H, Dh]


class Attention(nn.Module):
    """q/k/v projections, optional q/k RMSNorm ('head': per head, Qwen3; 'full': over the whole
    projection, OLMoE), optional clamp, RoPE, cache write, paged attention, output projection."""

    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        D, H, Hkv, Dh = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = H, Hkv, Dh
        self.scale = Dh**-0.5
        self.window = config.sliding_windows[layer_id]
        self.clip_qkv = config.clip_qkv
        self.qk_norm = config.qk_norm
        self.q_proj = nn.Linear(D, H * Dh, bias=config.qkv_bias)
        self.k_proj = nn.Linear(D, Hkv * Dh, bias=config.qkv_bias)
        self.v_proj = nn.Linear(D, Hkv * Dh, bias=config.qkv_bias)
        self.o_proj = nn.Linear(H * Dh, D, bias=config.o_bias)
        if config.qk_norm == "head":
            self.q_norm = RMSNorm(Dh, config.rms_norm_eps)
            self.k_norm = RMSNorm(Dh, config.rms_norm_eps)
        elif config.qk_norm == "full":
            self.q_norm = RMSNorm(H * Dh, config.rms_norm_eps)
            self.k_norm = RMSNorm(Hkv * Dh, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttentionMetadata,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
    ) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # [T, H*Dh], [T, Hkv*Dh] x2
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q = q.view(T, self.num_heads, self.head_dim)
        k = k.view(T, self.num_kv_heads, self.head_dim)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        key_cache.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, meta.slot_mapping, k)
        value_cache.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, meta.slot_mapping, v)
        out = paged_attention(q, key_cache, value_cache, meta, self.scale, self.window)  # [T, H, Dh]
        return self.o_proj(out.reshape(T, self.num_heads * self.head_dim))  # [T, D]
