"""Grouped-query attention over a paged KV cache.

Shape legend (shared/DESIGN.md) plus: S sequences in the step, B tokens per KV block,
H query heads, Hkv key/value heads, G = H / Hkv, Dh head dim, L longest context in the step.

Cache layout: each layer owns key and value tensors [num_blocks, B, Hkv, Dh]. Token position p of
sequence s lives in block `block_tables[s, p // B]` at offset `p % B`, i.e. flat slot
`block_tables[s, p // B] * B + p % B`.

    sequence s:  | cached prefix (computed earlier) | new tokens of this step |
                 0                      seq_len - q_len               seq_len
    every new token attends to all keys at positions <= its own (and > pos - window)

The torch path pads each group of sequences (decodes; the rest) to [S, max_query_len] queries
and gathers each sequence's whole blocks into a workspace reused by every layer and step (one
index_select per cache per layer; the block list, query grid and masks are built once per step),
so that there is no per-sequence Python loop, except for fp32 prefill groups, which attend
sequence by sequence with SDPA over exactly each sequence's queries and keys
(`attend_per_sequence`: prefills are few and long, and their padded grid is mostly waste); the
triton backend (moeserve.kernels.paged_attention) reads the blocks in place instead, one launch
per group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from moeserve.model_config import ModelConfig
from moeserve.model.layers import Linear, RMSNorm, apply_rotary


class Workspace:
    """Scratch tensors reused by every layer of a step and across steps: the per-layer context
    gathers of the torch path write into memory that stays mapped (an allocation of tens of MB
    is mapped and faulted in anew each time).
    `get(tag, shape, dtype)` returns a view of the buffer kept for (tag, dtype, device), grown
    when too small; a view is valid until the next `get` with the same tag. Not thread-safe:
    one per model runner."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}

    def get(self, tag: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        numel = math.prod(shape)
        key = (tag, dtype, torch.device(device))
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = self._buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel].view(shape)


@dataclass(frozen=True)
class AttentionGroup:
    """Sequences attended together: S_g sequences, T_g tokens, in one padded batch (or, for an
    fp32 prefill group, sequence by sequence: `attend_per_sequence`). Everything the torch path
    needs per layer is derived here once per step: the blocks to gather, the padded query grid,
    the causal mask and each sequence's lengths on the host.

    `tokens` indexes the step's flat batch; `token_seq`/`token_index` place each of those
    tokens in the padded [S_g, max_query_len] grid. Each sequence's context is gathered as the
    ceil(max_seq_len / B) whole blocks of `context_blocks`; `blocked` masks what lies past its
    length.
    """

    tokens: torch.Tensor  # [T_g] int64
    query_start_loc: torch.Tensor  # [S_g + 1] int64, sequence i owns tokens[qsl[i]:qsl[i + 1]]
    seq_lens: torch.Tensor  # [S_g] int64
    block_tables: torch.Tensor  # [S_g, max_blocks] int64
    token_seq: torch.Tensor  # [T_g] int64
    token_index: torch.Tensor  # [T_g] int64
    max_query_len: int
    max_seq_len: int
    context_blocks: torch.Tensor  # [S_g * ceil(max_seq_len / B)] int64, block_tables[:, :nb] row-major
    query_pos: torch.Tensor  # [S_g, max_query_len] int64, each grid cell's position, -1 for padding
    uniform_query: bool  # every sequence has max_query_len tokens: the grid is a view of the tokens
    static: bool = False  # views of buffers refilled every step (decode graphs): derive nothing once
    host_query_lens: tuple[int, ...] = ()  # query_start_loc's differences on the host (not for static groups)
    host_seq_lens: tuple[int, ...] = ()  # seq_lens on the host (not for static groups)
    # masks built once per step: `blocked`'s by (window, length), `allowed`'s by ("allowed", window)
    _blocked: dict = field(default_factory=dict, compare=False, repr=False)

    def blocked(self, window: int | None, length: int) -> torch.Tensor:
        """[S_g, max_query_len, length] bool, True where a query may not see a key: past its
        own position, before its window, or a padding query. Built once per step and window
        (every call for a static group, whose positions change under it)."""
        key = (window, length)
        mask = None if self.static else self._blocked.get(key)
        if mask is None:
            k_pos = torch.arange(length, device=self.query_pos.device)
            q_pos = self.query_pos[:, :, None]
            mask = k_pos[None, None, :] > q_pos  # [S, Qmax, length]
            if window is not None:
                mask |= k_pos[None, None, :] <= q_pos - window
            if not self.static:
                self._blocked[key] = mask
        return mask

    def allowed(self, window: int | None) -> tuple[torch.Tensor | None, ...]:
        """Per sequence, [q_len, seq_len] bool, True where a query sees a key (its new tokens
        are the last q_len of seq_len positions), or None where that is plain causal attention
        of a whole sequence (q_len == seq_len, no window: SDPA's is_causal). Built once per
        step and window."""
        key = ("allowed", window)
        masks = self._blocked.get(key)
        if masks is None:
            masks = []
            for q_len, seq_len in zip(self.host_query_lens, self.host_seq_lens):
                if q_len == seq_len and window is None:
                    masks.append(None)
                    continue
                k_pos = torch.arange(seq_len, device=self.seq_lens.device)
                q_pos = torch.arange(seq_len - q_len, seq_len, device=self.seq_lens.device)[:, None]
                mask = k_pos[None, :] <= q_pos  # [q_len, seq_len]
                if window is not None:
                    mask &= k_pos[None, :] > q_pos - window
                masks.append(mask)
            masks = self._blocked[key] = tuple(masks)
        return masks


@dataclass(frozen=True)
class AttentionMetadata:
    """One step's flat batch: S sequences, T new tokens in sequence order.

    Invariants: sequence s owns flat tokens query_start_loc[s] : query_start_loc[s + 1]; they sit
    at the last q_len(s) positions before seq_lens[s] (new tokens always extend the cached
    prefix, so positions are contiguous from 0); its block table covers ceil(seq_lens[s] / B)
    blocks. Sequences are attended in groups: decodes (one new token), then the rest, so that
    padding to the longest query never multiplies a decode batch by a prefill's length. With
    `split_decodes` (the torch path, whose cost is the padded context it reads) the decodes are
    further cut into at most three groups of similar lengths when that saves more padding than
    a group costs (`_length_buckets`).
    """

    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64
    query_start_loc: torch.Tensor  # [S + 1] int64
    groups: tuple[AttentionGroup, ...]
    block_size: int
    workspace: Workspace = field(default_factory=Workspace, compare=False, repr=False)

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        seq_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str = "cpu",
        workspace: Workspace | None = None,
        split_decodes: bool = False,
    ) -> AttentionMetadata:
        """Derive every per-token tensor from per-sequence lengths and block tables."""
        if not (len(query_lens) == len(seq_lens) == len(block_tables)) or not query_lens:
            raise ValueError("query_lens, seq_lens and block_tables must be non-empty and of equal length")
        for q, n, blocks in zip(query_lens, seq_lens, block_tables):
            if not 0 < q <= n or len(blocks) * block_size < n:
                raise ValueError(f"bad sequence: query_len={q}, seq_len={n}, {len(blocks)} blocks of {block_size}")
        q_lens = torch.tensor(query_lens, dtype=torch.int64)
        s_lens = torch.tensor(seq_lens, dtype=torch.int64)
        qsl = torch.zeros(len(query_lens) + 1, dtype=torch.int64)
        qsl[1:] = torch.cumsum(q_lens, 0)
        num_tokens = int(qsl[-1])
        seq_of_token = torch.repeat_interleave(torch.arange(len(query_lens)), q_lens, output_size=num_tokens)
        positions = s_lens[seq_of_token] - q_lens[seq_of_token] + (torch.arange(num_tokens) - qsl[seq_of_token])
        # Flat slot of each token: its block's id * B + offset, read from its sequence's table.
        flat_tables = torch.tensor([b for blocks in block_tables for b in blocks], dtype=torch.int64)
        table_start = torch.tensor([0] + [len(b) for b in block_tables[:-1]], dtype=torch.int64).cumsum(0)
        blocks = flat_tables[table_start[seq_of_token] + positions // block_size]
        slots = blocks * block_size + positions % block_size

        groups = []
        decodes = [i for i, q in enumerate(query_lens) if q == 1]
        buckets = _length_buckets(decodes, seq_lens, block_size) if split_decodes else [decodes]
        for members in (*buckets, [i for i, q in enumerate(query_lens) if q > 1]):
            if members:
                groups.append(_group(members, query_lens, seq_lens, block_tables, qsl, positions, block_size, device))
        return cls(
            positions=positions.to(device),
            slot_mapping=slots.to(device),
            query_start_loc=qsl.to(device),
            groups=tuple(groups),
            block_size=block_size,
            workspace=workspace if workspace is not None else Workspace(),
        )


# Padding (in context positions) a split must save to pay for one more group: a group costs a
# gather and 2 * Hkv small matmuls per layer, about what reading this much padding costs (CPU).
SPLIT_MIN_SAVING = 4096
MAX_BUCKETS = 3


def _length_buckets(members: list[int], seq_lens: list[int], block_size: int, max_buckets: int = MAX_BUCKETS) -> list[list[int]]:
    """`members` cut into at most `max_buckets` sets of neighbouring (block-rounded) lengths, each
    cut the one that saves the most padded positions (count x longest), taken while it saves at
    least SPLIT_MIN_SAVING. Each set keeps the batch order."""
    if len(members) < 2:
        return [members]
    ordered = sorted(members, key=lambda i: seq_lens[i])
    buckets = [ordered]
    while len(buckets) < max_buckets:
        best = None  # (saving, bucket index, cut)
        for b, bucket in enumerate(buckets):
            lens = [-(-seq_lens[i] // block_size) * block_size for i in bucket]
            whole = len(lens) * lens[-1]
            for cut in range(1, len(lens)):
                if lens[cut - 1] == lens[cut]:
                    continue
                saving = whole - (cut * lens[cut - 1] + (len(lens) - cut) * lens[-1])
                if best is None or saving > best[0]:
                    best = (saving, b, cut)
        if best is None or best[0] < SPLIT_MIN_SAVING:
            break
        _, b, cut = best
        buckets[b : b + 1] = [buckets[b][:cut], buckets[b][cut:]]
    # In batch order within each bucket: a lone group must list the batch's tokens in order.
    return [sorted(bucket) for bucket in buckets]


def _group(members, query_lens, seq_lens, block_tables, qsl, positions, block_size, device) -> AttentionGroup:
    width = max(len(block_tables[i]) for i in members)
    tables = torch.tensor([block_tables[i] + [0] * (width - len(block_tables[i])) for i in members],
                          dtype=torch.int64)
    q_lens = torch.tensor([query_lens[i] for i in members], dtype=torch.int64)
    num_tokens = int(q_lens.sum())
    token_seq = torch.repeat_interleave(torch.arange(len(members)), q_lens, output_size=num_tokens)
    starts = torch.tensor([int(qsl[i]) for i in members], dtype=torch.int64)
    group_start = torch.cumsum(q_lens, 0) - q_lens
    token_index = torch.arange(num_tokens) - group_start[token_seq]
    tokens = starts[token_seq] + token_index
    group_qsl = torch.zeros(len(members) + 1, dtype=torch.int64)
    group_qsl[1:] = torch.cumsum(q_lens, 0)
    max_query_len = max(query_lens[i] for i in members)
    max_seq_len = max(seq_lens[i] for i in members)
    query_pos = torch.full((len(members), max_query_len), -1, dtype=torch.int64)
    query_pos[token_seq, token_index] = positions[tokens]
    num_blocks = -(-max_seq_len // block_size)
    return AttentionGroup(
        tokens=tokens.to(device),
        query_start_loc=group_qsl.to(device),
        seq_lens=torch.tensor([seq_lens[i] for i in members], dtype=torch.int64, device=device),
        block_tables=tables.to(device),
        token_seq=token_seq.to(device),
        token_index=token_index.to(device),
        max_query_len=max_query_len,
        max_seq_len=max_seq_len,
        context_blocks=tables[:, :num_blocks].reshape(-1).to(device),
        query_pos=query_pos.to(device),
        uniform_query=num_tokens == len(members) * max_query_len,
        host_query_lens=tuple(query_lens[i] for i in members),
        host_seq_lens=tuple(seq_lens[i] for i in members),
    )


class PagedKVCache:
    """Key/value blocks of every attention layer, allocated once; block ids are shared by layers.

    Each layer's key is [num_blocks, B, Hkv, Dk] and its value [num_blocks, B, Hkv, Dv]. With
    `value_in_key` (MLA) there is no value tensor: a layer's value is the view of the first Dv
    values of each key entry (the latent), so one entry per token per layer is stored."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        value_dim: int | None = None,
        value_in_key: bool = False,
    ):
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.key = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        value_dim = head_dim if value_dim is None else value_dim
        if value_in_key:
            self.value = [k[..., :value_dim] for k in self.key]
        else:
            vshape = (num_blocks, block_size, num_kv_heads, value_dim)
            self.value = [torch.zeros(vshape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.value_in_key = value_in_key

    @classmethod
    def for_model(cls, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device="cpu"):
        heads, key_dim, value_dim = config.kv_entry
        return cls(config.num_layers, num_blocks, block_size, heads, key_dim, dtype, device, value_dim,
                   value_in_key=config.mla is not None)

    @property
    def nbytes(self) -> int:
        tensors = self.key if self.value_in_key else self.key + self.value
        return sum(t.numel() * t.element_size() for t in tensors)


def paged_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    window: int | None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [T, H, Dk] against cached keys [.., Hkv, Dk] / values [.., Hkv, Dv] (already holding
    this step's tokens) -> [T, H, Dv]. `sinks` [H]: one more logit per head in every softmax,
    whose probability mass is dropped (GPT-OSS attention sinks)."""
    return attend_groups(q, value_cache.shape[-1], meta,
                         lambda q_g, g: attend_group(q_g, key_cache, value_cache, meta, g, scale, window, sinks))


def attend_groups(q: torch.Tensor, value_dim: int, meta: AttentionMetadata, attend) -> torch.Tensor:
    """q [T, H, Dk] -> [T, H, Dv]: `attend(q_g, group)` ([T_g, H, Dk] -> [T_g, H, Dv]) for each
    of the step's groups, its rows put back at the group's tokens (no copy with one group)."""
    if len(meta.groups) == 1:
        return attend(q, meta.groups[0])
    out = q.new_empty(q.shape[0], q.shape[1], value_dim)
    for group in meta.groups:
        out[group.tokens] = attend(q[group.tokens], group)
    return out


def gather_context(cache: torch.Tensor, g: AttentionGroup, block_size: int,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """cache [num_blocks, B, ...] -> each sequence's whole context in order [S_g, L, ...],
    L = max_seq_len (a view of the ceil(L / B) whole blocks gathered; positions past a
    sequence's own length hold whatever their block does, and attention masks them). The blocks
    are written into `out` ([S_g * nb, B, ...]) when given."""
    S = g.seq_lens.shape[0]
    blocks = torch.index_select(cache, 0, g.context_blocks, out=out) if out is not None else \
        cache.index_select(0, g.context_blocks)  # [S * nb, B, ...]
    return blocks.view(S, -1, *cache.shape[2:])[:, : g.max_seq_len]


def attend_group(q, key_cache, value_cache, meta: AttentionMetadata, g: AttentionGroup, scale, window, sinks=None):
    """q [T_g, H, Dk] of one group -> [T_g, H, Dv]; the contexts are gathered into the step's
    workspace (one gather of the keys and, unless they are a view of the keys, of the values)."""
    ws, n = meta.workspace, g.context_blocks.shape[0]
    keys = gather_context(key_cache, g, meta.block_size,
                          ws.get("key", (n, *key_cache.shape[1:]), key_cache.dtype, key_cache.device))  # [S, L, Hkv, Dk]
    if value_cache.data_ptr() == key_cache.data_ptr() and value_cache.stride() == key_cache.stride():
        values = keys[..., : value_cache.shape[-1]]  # MLA: the value is the head of each key entry
    else:
        values = gather_context(value_cache, g, meta.block_size,
                                ws.get("value", (n, *value_cache.shape[1:]), value_cache.dtype, value_cache.device))
    if attends_per_sequence(q, keys, values, g, sinks):
        return attend_per_sequence(q, keys, values, g, scale, window)
    return attend_padded(q, keys, values, meta, g, scale, window, sinks)


# Shortest longest-query of a group that attends sequence by sequence: below it the group is a
# handful of tokens per sequence, where one padded batch costs less than a call per sequence.
PER_SEQUENCE_MIN_QUERY = 16


def attends_per_sequence(q, keys, values, g: AttentionGroup, sinks) -> bool:
    """Whether `g` takes attend_per_sequence: an fp32 group of prefills (max_query_len >=
    PER_SEQUENCE_MIN_QUERY), no sinks, keys and values of one width, host lengths known. Its
    results differ from the padded path's in the last bits (SDPA sums in another order), which the
    equality rule of shared/DESIGN.md absorbs; bf16/fp16 keep the padded path, whose ops are
    transformers' eager attention's, bit for bit."""
    return (g.max_query_len >= PER_SEQUENCE_MIN_QUERY and sinks is None and q.dtype == torch.float32
            and keys.shape[-1] == values.shape[-1] and not g.static and bool(g.host_query_lens))


def attend_per_sequence(q, keys, values, g: AttentionGroup, scale, window):
    """q [T_g, H, Dk] against each sequence's own context of keys [S, Lc, Hkv, Dk] and values
    [S, Lc, Hkv, Dv] -> [T_g, H, Dv], one SDPA call per sequence over exactly its q_len x seq_len
    (no padding to the group's longest query and context; a whole causal sequence skips the
    masked half). Prefills are few per step and long, so the per-sequence call is cheap next to
    the padded grid it avoids (up to max_query_len x max_seq_len per sequence)."""
    out = torch.empty(q.shape[0], q.shape[1], values.shape[-1], dtype=q.dtype, device=q.device)  # [T_g, H, Dv]
    start = 0
    for s, (q_len, seq_len, mask) in enumerate(zip(g.host_query_lens, g.host_seq_lens, g.allowed(window))):
        q_s = q[start : start + q_len].transpose(0, 1)  # [H, q_len, Dk]
        k_s = keys[s, :seq_len].transpose(0, 1)  # [Hkv, seq_len, Dk]
        v_s = values[s, :seq_len].transpose(0, 1)  # [Hkv, seq_len, Dv]
        o = F.scaled_dot_product_attention(q_s[None], k_s[None], v_s[None], attn_mask=mask, is_causal=mask is None,
                                           scale=scale, enable_gqa=True)  # [1, H, q_len, Dv]
        out[start : start + q_len] = o[0].transpose(0, 1)
        start += q_len
    return out


def attend_padded(q, keys, values, meta: AttentionMetadata, g: AttentionGroup, scale, window, sinks=None):
    """q [T_g, H, Dk] against each sequence's gathered context, keys [S, Lc, Hkv, Dk] and values
    [S, Lc, Hkv, Dv] (positions past a sequence's length masked) -> [T_g, H, Dv]. One pair of
    batched matmuls per KV head over strided views of the context (no head-major copy). Softmax
    runs in fp32 and is cast to q's dtype before the value product, as transformers' eager
    attention does (with sinks: in q's dtype, as its GPT-OSS attention does)."""
    S, Qmax, Lc = g.seq_lens.shape[0], g.max_query_len, keys.shape[1]
    _, H, Dk = q.shape
    Hkv, Dv = keys.shape[2], values.shape[-1]
    G = H // Hkv

    if g.uniform_query:
        q_pad = q.view(S, Qmax, H, Dk)
    else:
        q_pad = q.new_zeros(S, Qmax, H, Dk)
        q_pad[g.token_seq, g.token_index] = q
    blocked = g.blocked(window, Lc)[:, None]  # [S, 1, Qmax, Lc]
    out = q.new_empty(S, Qmax, H, Dv)
    for h in range(Hkv):
        heads = slice(h * G, (h + 1) * G)
        q_h = q_pad[:, :, heads].transpose(1, 2).reshape(S, G * Qmax, Dk)  # rows (g, query)
        scores = torch.bmm(q_h, keys[:, :, h].transpose(1, 2)) * scale  # [S, G*Qmax, Lc]
        scores = scores.view(S, G, Qmax, Lc).masked_fill_(blocked, torch.finfo(scores.dtype).min)
        if sinks is None:
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        else:  # as transformers' GPT-OSS: shift by the max and softmax in the scores' dtype
            sink = sinks[heads].to(scores.dtype).view(1, G, 1, 1).expand(S, G, Qmax, 1)  # [S, G, Qmax, 1]
            combined = torch.cat([scores, sink], dim=-1)  # [S, G, Qmax, Lc + 1]
            combined = combined - combined.max(dim=-1, keepdim=True).values
            probs = torch.softmax(combined, dim=-1, dtype=combined.dtype)[..., :Lc].to(q.dtype)
        o = torch.bmm(probs.reshape(S, G * Qmax, Lc), values[:, :, h])  # [S, G*Qmax, Dv]
        out[:, :, heads] = o.view(S, G, Qmax, Dv).transpose(1, 2)
    if g.uniform_query:
        return out.view(S * Qmax, H, Dv)
    return out[g.token_seq, g.token_index]  # [T_g, H, Dv]


ATTENTION_BACKENDS = ("torch", "triton", "cpu")


def get_attention_backend(name: str):
    """The paged-attention function of a backend; all share paged_attention's signature."""
    if name == "torch":
        return paged_attention
    if name == "triton":
        from moeserve.kernels.paged_attention import paged_attention_triton

        return paged_attention_triton
    if name == "cpu":
        from moeserve.kernels.cpu_attention import paged_attention_cpu

        return paged_attention_cpu
    raise ValueError(f"unknown attention backend {name!r}; available: {', '.join(ATTENTION_BACKENDS)}")


class Attention(nn.Module):
    """q/k/v projections, optional q/k RMSNorm ('head': per head, Qwen3; 'full': over the whole
    projection, OLMoE), optional clamp, RoPE, cache write, paged attention (with sinks for
    GPT-OSS), output projection."""

    def __init__(self, config: ModelConfig, layer_id: int, backend: str = "torch"):
        super().__init__()
        self.backend = backend
        self.attend = get_attention_backend(backend)
        D, H, Hkv, Dh = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = H, Hkv, Dh
        self.scale = config.attention_scale or Dh**-0.5
        self.window = config.sliding_windows[layer_id]
        self.sinks = nn.Parameter(torch.empty(H), requires_grad=False) if config.attention_sinks else None
        self.clip_qkv = config.clip_qkv
        self.qk_norm = config.qk_norm
        self.q_proj = Linear(D, H * Dh, bias=config.qkv_bias)
        self.k_proj = Linear(D, Hkv * Dh, bias=config.qkv_bias)
        self.v_proj = Linear(D, Hkv * Dh, bias=config.qkv_bias)
        self.o_proj = Linear(H * Dh, D, bias=config.o_bias)
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
        out = self.attend(q, key_cache, value_cache, meta, self.scale, self.window, self.sinks)  # [T, H, Dh]
        return self.o_proj(out.reshape(T, self.num_heads * self.head_dim))  # [T, D]
