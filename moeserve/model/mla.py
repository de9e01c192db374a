"""Multi-head latent attention (DeepSeek-V2/V3) over a latent paged KV cache.

Shape legend (shared/DESIGN.md) plus: H heads, R kv_lora_rank, Dn qk_nope_head_dim, Dr
qk_rope_head_dim, Dv v_head_dim, S sequences of an attention group, L its longest context.

Cache: one entry of R + Dr values per token per layer, key cache [num_blocks, B, 1, R + Dr]:
the normalised latent c = kv_a_layernorm(kv_a_proj(x)[:R]) then the roped key part k_r shared
by every head. The value "cache" is the view of the first R values of each entry.
kv_b_proj's weight [H * (Dn + Dv), R] splits per head into W_UK [H, Dn, R] and W_UV [H, Dv, R]:

    head h's key   k_h = [W_UK[h] c ; k_r]     value v_h = W_UV[h] c

Two ways to attend, equal in exact arithmetic (tests/test_new_families.py checks them against
each other):

    decompressed  gather each sequence's latents, K/V = kv_b_proj(c) for every cached token,
                  standard attention over H heads of Dn + Dr / Dv. Used for prefill groups: the
                  decompression is amortised over many queries.
    absorbed      q_c = W_UK[h]^T q_nope (per head, [R]); attend [q_c ; q_r] against the cache
                  entries as one KV head (MQA, key dim R + Dr, value dim R); out_h = W_UV[h] o_h.
                  Used for decode: nothing is decompressed, the backend's paged attention reads
                  the latent cache in place (torch, or the Triton kernel).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import nn

from moeserve.model.attention import AttentionGroup, AttentionMetadata, attend_padded, gather_context, \
    get_attention_backend
from moeserve.model.layers import Linear, RMSNorm, apply_rotary, apply_rotary_interleaved
from moeserve.model_config import ModelConfig

MLAMode = Literal["auto", "absorbed", "decompressed"]
LATENT_NORM_EPS = 1e-6  # transformers builds q_a_layernorm / kv_a_layernorm with the default eps


class MLAttention(nn.Module):
    """Parameter names follow the Hub (`q_proj` or `q_a_proj`/`q_a_layernorm`/`q_b_proj`,
    `kv_a_proj_with_mqa`, `kv_a_layernorm`, `kv_b_proj`, `o_proj`). `mode`: 'auto' absorbs for
    decode groups and decompresses for the rest; the other two force one path (tests)."""

    def __init__(self, config: ModelConfig, layer_id: int, backend: str = "torch"):
        super().__init__()
        m = config.mla
        assert m is not None
        D, H = config.hidden_size, config.num_heads
        self.backend = backend
        self.attend = get_attention_backend(backend)
        self.num_heads = H
        self.R, self.Dn, self.Dr, self.Dv = m.kv_lora_rank, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
        self.scale = config.attention_scale or m.qk_head_dim**-0.5
        self._rotate = apply_rotary_interleaved if m.rope_interleave else apply_rotary
        self.rope_fp32 = m.rope_fp32
        self.mode: MLAMode = "auto"
        self.q_lora = m.q_lora_rank is not None
        if self.q_lora:
            self.q_a_proj = Linear(D, m.q_lora_rank, bias=config.qkv_bias)
            self.q_a_layernorm = RMSNorm(m.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = Linear(m.q_lora_rank, H * m.qk_head_dim, bias=False)
        else:
            self.q_proj = Linear(D, H * m.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = Linear(D, self.R + self.Dr, bias=config.qkv_bias)
        self.kv_a_layernorm = RMSNorm(self.R, LATENT_NORM_EPS)
        self.kv_b_proj = Linear(self.R, H * (self.Dn + self.Dv), bias=False)
        self.o_proj = Linear(H * self.Dv, D, bias=config.o_bias)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttentionMetadata,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
    ) -> torch.Tensor:
        """x [T, D] -> [T, D]; writes this step's latent entries into key_cache [N, B, 1, R + Dr]
        (value_cache is its [..., :R] view)."""
        T, H = x.shape[0], self.num_heads
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora else self.q_proj(x)
        q = q.view(T, H, self.Dn + self.Dr)
        q_nope, q_rope = q[..., : self.Dn], self.rotate(q[..., self.Dn :], cos, sin)  # [T, H, Dn], [T, H, Dr]
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.R, self.Dr], dim=-1)  # [T, R], [T, Dr]
        k_rope = self.rotate(k_rope[:, None, :], cos, sin)  # [T, 1, Dr]
        entry = torch.cat([self.kv_a_layernorm(latent)[:, None, :], k_rope], dim=-1)  # [T, 1, R + Dr]
        key_cache.view(-1, 1, self.R + self.Dr).index_copy_(0, meta.slot_mapping, entry)

        out = x.new_empty(T, H, self.Dv)
        for g in meta.groups:
            absorbed = self.mode == "absorbed" or (self.mode == "auto" and g.max_query_len == 1)
            attend = self._absorbed if absorbed else self._decompressed
            out[g.tokens] = attend(q_nope[g.tokens], q_rope[g.tokens], key_cache, value_cache, meta, g)
        return self.o_proj(out.reshape(T, H * self.Dv))  # [T, D]

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, h, Dr] rotated (cos/sin [T, Dr], fp32 when the family rotates in fp32)."""
        if self.rope_fp32:
            return self._rotate(x.float(), cos.float(), sin.float()).to(x.dtype)
        return self._rotate(x, cos.to(x.dtype), sin.to(x.dtype))

    def _w_uk_uv(self) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.kv_b_proj.weight.view(self.num_heads, self.Dn + self.Dv, self.R)
        return w[:, : self.Dn], w[:, self.Dn :]  # [H, Dn, R], [H, Dv, R]

    def _absorbed(self, q_nope, q_rope, key_cache, value_cache, meta: AttentionMetadata,
                  g: AttentionGroup) -> torch.Tensor:
        """q_nope [T_g, H, Dn], q_rope [T_g, H, Dr] -> [T_g, H, Dv] without decompressing."""
        w_uk, w_uv = self._w_uk_uv()
        q_latent = torch.einsum("thn,hnr->thr", q_nope, w_uk)  # [T_g, H, R]
        q_abs = torch.cat([q_latent, q_rope], dim=-1)  # [T_g, H, R + Dr]
        one = dataclasses.replace(meta, groups=(g,))
        o_latent = self.attend(q_abs, key_cache, value_cache, one, self.scale, None)  # [T_g, H, R]
        return torch.einsum("thr,hvr->thv", o_latent, w_uv)  # [T_g, H, Dv]

    def _decompressed(self, q_nope, q_rope, key_cache, value_cache, meta: AttentionMetadata,
                      g: AttentionGroup) -> torch.Tensor:
        """q_nope [T_g, H, Dn], q_rope [T_g, H, Dr] -> [T_g, H, Dv] through per-head K/V."""
        H = self.num_heads
        entries = gather_context(key_cache, g, meta.block_size)[:, :, 0]  # [S, L, R + Dr]
        S, L = entries.shape[:2]
        kv = self.kv_b_proj(entries[..., : self.R]).view(S, L, H, self.Dn + self.Dv)  # [S, L, H, Dn + Dv]
        keys = torch.cat([kv[..., : self.Dn], entries[:, :, None, self.R :].expand(S, L, H, self.Dr)], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)  # [T_g, H, Dn + Dr]
        return attend_padded(q, keys, kv[..., self.Dn :], meta, g, self.scale, None)
