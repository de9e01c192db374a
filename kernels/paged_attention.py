"""Paged attention: split-KV decode and variable-length causal prefill, reading the cache in place.

Shape legend (shared/DESIGN.md) plus: S sequences, B tokens per KV block, H query heads, Hkv KV
heads, G = H / Hkv, Dh head dim, L a sequence's length (cached prefix + this step's tokens).

Cache layout (moeserve.model.attention): key/value [num_blocks, B, Hkv, Dh]; position p of
sequence s is at block block_tables[s, p // B], offset p % B. A tile of BLOCK_N positions is
gathered through the block table, so any B works and nothing is copied into contiguous tensors.

Visibility, as in the torch path: the query at position p sees key j iff j <= p and
(window is None or j > p - window). Scores and softmax are fp32 (online softmax, flash style);
the output is cast to q's dtype.

    decode  (one new token per sequence)   grid (S, Hkv * head_chunks, SPLITS)
        program = one sequence, the G query heads of one KV head (each K/V tile loaded once for
        all G; for wide MLA entries 16 of them per program), one contiguous range of KV tiles.
        With SPLITS > 1 (few sequences, long context: flash-decoding) each split writes (max,
        sum, acc) to fp32 scratch and `decode_reduce_kernel` merges them.
    prefill (q_len >= 1, after a cached prefix)   grid (ceil(T / BLOCK_Q) + S, Hkv)
        program = BLOCK_Q consecutive queries of one sequence x the G query heads of one KV head,
        packed as BLOCK_M = BLOCK_Q * G_PAD rows of one dot (each K/V tile loaded once for all G;
        the program -> (sequence, query block) table is built on the device, so one long prompt
        among many short ones launches no idle programs); KV tiles above the block's last query
        (causal) or below its first query's window are never loaded.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeserve.kernels import interpreting
from moeserve.kernels.numerics import emulate_bf16, round_to

NEG_BIG = tl.constexpr(-1.0e30)  # running max start: finite, so fully masked tiles give exp(0) * 0, not NaN


@triton.jit
def _dot(a, b, DOT_FP32: tl.constexpr, FP32_IEEE: tl.constexpr):
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    if FP32_IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _kv_tile(k_cache_ptr, v_cache_ptr, block_tables_ptr, s, p, valid, kvh, offs_d, d_mask, offs_dv, dv_mask,
             stride_kb, stride_kt, stride_kh, stride_bt, B: tl.constexpr):
    """Keys [BN, BDK] and values [BN, BDV] of sequence s at positions p (zeros where not valid);
    the value cache shares the key cache's strides (MLA: it is a view of the key entries)."""
    block = tl.load(block_tables_ptr + s * stride_bt + p // B, mask=valid, other=0).to(tl.int64)
    kv_off = block * stride_kb + (p % B) * stride_kt + kvh * stride_kh  # [BN]
    k = tl.load(k_cache_ptr + kv_off[:, None] + offs_d[None, :], mask=valid[:, None] & d_mask[None, :], other=0.0)
    v = tl.load(v_cache_ptr + kv_off[:, None] + offs_dv[None, :], mask=valid[:, None] & dv_mask[None, :], other=0.0)
    return k, v


@triton.jit
def _finish(acc, m_i, l_i, sinks_ptr, heads, head_mask, HAS_SINKS: tl.constexpr):
    """acc / softmax denominator; with a sink logit per head, its exp joins the denominator."""
    if HAS_SINKS:
        sink = tl.load(sinks_ptr + heads, mask=head_mask, other=0.0).to(tl.float32)
        m_all = tl.maximum(m_i, sink)
        alpha = tl.exp(m_i - m_all)
        return acc * alpha[:, None] / (l_i * alpha + tl.exp(sink - m_all))[:, None]
    return acc / l_i[:, None]


@triton.jit
def _softmax_step(q, k, v, visible, m_i, l_i, acc, scale, DOT_FP32: tl.constexpr, FP32_IEEE: tl.constexpr):
    """One online-softmax update of (running max, running sum, acc) with a tile of keys."""
    scores = _dot(q, tl.trans(k), DOT_FP32, FP32_IEEE) * scale  # [rows, BN]
    scores = tl.where(visible, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    alpha = tl.exp(m_i - m_new)
    prob = tl.exp(scores - m_new[:, None])
    l_i = l_i * alpha + tl.sum(prob, axis=1)
    acc = acc * alpha[:, None] + _dot(prob.to(v.dtype), v, DOT_FP32, FP32_IEEE)
    return m_new, l_i, acc


@triton.jit
def decode_kernel(
    # Pointers
    q_ptr,  # [S, H, Dh] one query per sequence
    k_cache_ptr,  # [num_blocks, B, Hkv, Dh]
    v_cache_ptr,  # [num_blocks, B, Hkv, Dv], the key cache's strides
    block_tables_ptr,  # [S, max_blocks]
    seq_lens_ptr,  # [S]
    sinks_ptr,  # [H] (HAS_SINKS)
    out_ptr,  # [S, H, Dv] (SPLITS == 1)
    part_m_ptr,  # [S, H, SPLITS] fp32 (SPLITS > 1)
    part_l_ptr,  # [S, H, SPLITS] fp32
    part_acc_ptr,  # [S, H, SPLITS, Dv] fp32
    # Dimensions and strides
    scale,
    window,  # 0 = no window
    G,
    H,
    Dh,
    Dv,
    tiles_per_split,
    head_chunks,  # programs per KV head along axis 1, each taking BLOCK_G of its G query heads
    stride_qs, stride_qh,
    stride_os, stride_oh,
    stride_kb, stride_kt, stride_kh,
    stride_bt,
    # Meta-parameters
    B: tl.constexpr,
    SPLITS: tl.constexpr,
    BLOCK_G: tl.constexpr,  # >= max(G, 16)
    BLOCK_N: tl.constexpr,  # KV positions per tile
    BLOCK_D: tl.constexpr,  # >= Dh
    BLOCK_DV: tl.constexpr,  # >= Dv
    HAS_SINKS: tl.constexpr,
    DOT_FP32: tl.constexpr,
    FP32_IEEE: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
):
    s = tl.program_id(0)
    kvh = tl.program_id(1) // head_chunks
    chunk = tl.program_id(1) % head_chunks
    split = tl.program_id(2)
    L = tl.load(seq_lens_ptr + s).to(tl.int32)
    pos = L - 1
    offs_g = chunk * BLOCK_G + tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_dv = tl.arange(0, BLOCK_DV)
    heads = kvh * G + offs_g  # [BG]
    g_mask = offs_g < G
    d_mask = offs_d < Dh
    dv_mask = offs_dv < Dv
    q = tl.load(q_ptr + s * stride_qs + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)  # [BG, BD]

    lo = split * tiles_per_split * BLOCK_N
    hi = tl.minimum(lo + tiles_per_split * BLOCK_N, L)
    if window > 0:
        lo = tl.maximum(lo, (tl.maximum(pos - window + 1, 0) // BLOCK_N) * BLOCK_N)
    m_i = tl.full((BLOCK_G,), NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_DV), dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        p = start + offs_n  # [BN] positions
        valid = p < hi
        if window > 0:
            valid = valid & (p > pos - window)
        k, v = _kv_tile(k_cache_ptr, v_cache_ptr, block_tables_ptr, s, p, valid, kvh, offs_d, d_mask, offs_dv,
                        dv_mask, stride_kb, stride_kt, stride_kh, stride_bt, B)  # [BN, BD], [BN, BDV]
        m_i, l_i, acc = _softmax_step(q, k, v, valid[None, :], m_i, l_i, acc, scale, DOT_FP32, FP32_IEEE)

    if SPLITS == 1:
        out = _finish(acc, m_i, l_i, sinks_ptr, heads, g_mask, HAS_SINKS)
        tl.store(out_ptr + s * stride_os + heads[:, None] * stride_oh + offs_dv[None, :],
                 round_to(out, out_ptr.dtype.element_ty, EMULATE_BF16).to(out_ptr.dtype.element_ty),
                 mask=g_mask[:, None] & dv_mask[None, :])
    else:
        row = (s * H + heads) * SPLITS + split  # [BG] index into [S, H, SPLITS]
        tl.store(part_m_ptr + row, m_i, mask=g_mask)
        tl.store(part_l_ptr + row, l_i, mask=g_mask)
        tl.store(part_acc_ptr + row[:, None] * Dv + offs_dv[None, :], acc, mask=g_mask[:, None] & dv_mask[None, :])


@triton.jit
def decode_reduce_kernel(
    part_m_ptr,  # [S, H, SPLITS] fp32
    part_l_ptr,
    part_acc_ptr,  # [S, H, SPLITS, Dv] fp32
    sinks_ptr,  # [H] (HAS_SINKS)
    out_ptr,  # [S, H, Dv]
    H,
    Dh,
    stride_os, stride_oh,
    SPLITS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_SINKS: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
):
    s = tl.program_id(0)
    h = tl.program_id(1)
    offs = tl.arange(0, SPLITS)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < Dh
    row = (s * H + h) * SPLITS + offs  # [SPLITS]
    m = tl.load(part_m_ptr + row)
    l_part = tl.load(part_l_ptr + row)
    acc = tl.load(part_acc_ptr + row[:, None] * Dh + offs_d[None, :], mask=d_mask[None, :], other=0.0)
    m_all = tl.max(m, axis=0)
    denominator_extra = 0.0
    if HAS_SINKS:
        sink = tl.load(sinks_ptr + h).to(tl.float32)
        m_all = tl.maximum(m_all, sink)
        denominator_extra = tl.exp(sink - m_all)
    w = tl.exp(m - m_all)  # [SPLITS]; splits that saw no key have l = 0, acc = 0
    out = tl.sum(acc * w[:, None], axis=0) / (tl.sum(l_part * w, axis=0) + denominator_extra)  # [BD]
    tl.store(out_ptr + s * stride_os + h * stride_oh + offs_d,
             round_to(out, out_ptr.dtype.element_ty, EMULATE_BF16).to(out_ptr.dtype.element_ty), mask=d_mask)


@triton.jit
def prefill_kernel(
    # Pointers
    q_ptr,  # [T_g, H, Dh]
    k_cache_ptr,  # [num_blocks, B, Hkv, Dh]
    v_cache_ptr,
    block_tables_ptr,  # [S, max_blocks]
    seq_lens_ptr,  # [S]
    query_start_ptr,  # [S + 1] offsets into q's rows
    block_seq_ptr,  # [NB] sequence of each program's query block, S = none
    block_q_ptr,  # [NB] index of that block within its sequence
    sinks_ptr,  # [H] (HAS_SINKS)
    out_ptr,  # [T_g, H, Dv]
    # Dimensions and strides
    scale,
    window,  # 0 = no window
    G,
    Dh,
    Dv,
    S,
    stride_qt, stride_qh,
    stride_ot, stride_oh,
    stride_kb, stride_kt, stride_kh,
    stride_bt,
    # Meta-parameters
    B: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows per program: BLOCK_M / G_PAD query positions x G_PAD heads
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    HAS_SINKS: tl.constexpr,
    G_PAD: tl.constexpr,  # G rounded up to a power of two, <= BLOCK_M
    DOT_FP32: tl.constexpr,
    FP32_IEEE: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
):
    s = tl.load(block_seq_ptr + tl.program_id(0)).to(tl.int32)
    if s >= S:
        return
    qb = tl.load(block_q_ptr + tl.program_id(0)).to(tl.int32)
    kvh = tl.program_id(1)
    BLOCK_Q: tl.constexpr = BLOCK_M // G_PAD  # query positions per program
    q_start = tl.load(query_start_ptr + s).to(tl.int32)
    q_len = tl.load(query_start_ptr + s + 1).to(tl.int32) - q_start
    L = tl.load(seq_lens_ptr + s).to(tl.int32)
    r = tl.arange(0, BLOCK_M)
    qi = qb * BLOCK_Q + r // G_PAD  # [BM] query index within the sequence's new tokens
    g = r % G_PAD  # [BM] query head within the KV head's group
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_mask = (qi < q_len) & (g < G)
    d_mask = offs_d < Dh
    dv_mask = offs_dv < Dv
    q_pos = L - q_len + qi  # [BM]
    q_off = (q_start + qi).to(tl.int64) * stride_qt + (kvh * G + g) * stride_qh  # [BM]
    q = tl.load(q_ptr + q_off[:, None] + offs_d[None, :], mask=m_mask[:, None] & d_mask[None, :], other=0.0)

    hi = tl.minimum(L - q_len + (qb + 1) * BLOCK_Q, L)  # past the block's last query
    lo = L * 0
    if window > 0:
        lo = (tl.maximum(L - q_len + qb * BLOCK_Q - window + 1, 0) // BLOCK_N) * BLOCK_N
    m_i = tl.full((BLOCK_M,), NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        p = start + offs_n  # [BN]
        in_seq = p < hi
        k, v = _kv_tile(k_cache_ptr, v_cache_ptr, block_tables_ptr, s, p, in_seq, kvh, offs_d, d_mask, offs_dv,
                        dv_mask, stride_kb, stride_kt, stride_kh, stride_bt, B)  # [BN, BD], [BN, BDV]
        visible = in_seq[None, :] & (p[None, :] <= q_pos[:, None])  # [BM, BN]
        if window > 0:
            visible = visible & (p[None, :] > q_pos[:, None] - window)
        m_i, l_i, acc = _softmax_step(q, k, v, visible, m_i, l_i, acc, scale, DOT_FP32, FP32_IEEE)

    out = _finish(acc, m_i, tl.where(m_mask, l_i, 1.0), sinks_ptr, kvh * G + g, m_mask, HAS_SINKS)
    o_off = (q_start + qi).to(tl.int64) * stride_ot + (kvh * G + g) * stride_oh  # [BM]
    tl.store(out_ptr + o_off[:, None] + offs_dv[None, :],
             round_to(out, out_ptr.dtype.element_ty, EMULATE_BF16).to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None] & dv_mask[None, :])


def decode_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, block_n: int) -> int:
    """Enough programs to fill a GPU (~2 waves of 132 SMs) when S * Hkv alone does not, with at
    least 4 tiles per split; a power of two (the reduce kernel's arange)."""
    programs = num_seqs * num_kv_heads
    if programs >= 264 or interpreting():
        return 1
    want = -(-264 // programs)
    cap = max(1, max_seq_len // (4 * block_n))
    return min(triton.next_power_of_2(min(want, cap)), 64) if cap > 1 else 1


def paged_decode(
    q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, max_seq_len: int, scale: float, window: int | None, num_splits: int | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [S, H, Dh] (each sequence's one new token, at position seq_len - 1) -> [S, H, Dv]."""
    S, H, Dh = q.shape
    _, B, Hkv, _ = key_cache.shape
    Dv = value_cache.shape[-1]
    G = H // Hkv
    block_d = max(16, triton.next_power_of_2(Dh))  # tl.dot needs every dimension >= 16
    block_dv = max(16, triton.next_power_of_2(Dv))
    # Wide entries (MLA's absorbed decode: key 576, value 512, 128 heads on one KV head) take
    # 16 query heads per program and 16-position KV tiles, so that a program's tiles fit in
    # shared memory; otherwise all G heads of a KV head share each tile load. The tile size
    # is fixed before the splits: a split's range is counted in tiles.
    wide = block_d > 256
    block_g = 16 if wide else max(16, triton.next_power_of_2(G))
    block_n = 16 if wide else 32 if interpreting() else 64
    head_chunks = -(-G // block_g)
    splits = num_splits or decode_splits(S, Hkv * head_chunks, max_seq_len, block_n)
    tiles = -(-max_seq_len // block_n)
    tiles_per_split = -(-tiles // splits)
    q = q.contiguous()
    out = q.new_empty(S, H, Dv)
    part_m = part_l = part_acc = out  # unused when splits == 1
    if splits > 1:
        part_m = torch.empty(S, H, splits, dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty(S, H, splits, Dv, dtype=torch.float32, device=q.device)
    fp32 = q.dtype == torch.float32
    sinks_arg = sinks if sinks is not None else out
    decode_kernel[(S, Hkv * head_chunks, splits)](
        q, key_cache, value_cache, block_tables, seq_lens, sinks_arg, out, part_m, part_l, part_acc,
        scale, window or 0, G, H, Dh, Dv, tiles_per_split, head_chunks,
        q.stride(0), q.stride(1),
        out.stride(0), out.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        block_tables.stride(0),
        B=B, SPLITS=splits, BLOCK_G=block_g, BLOCK_N=block_n,
        BLOCK_D=block_d, BLOCK_DV=block_dv, HAS_SINKS=sinks is not None,
        DOT_FP32=interpreting() and not fp32, FP32_IEEE=fp32 and not interpreting(),
        EMULATE_BF16=emulate_bf16(q.dtype),
    )
    if splits > 1:
        decode_reduce_kernel[(S, H)](
            part_m, part_l, part_acc, sinks_arg, out, H, Dv, out.stride(0), out.stride(1),
            SPLITS=splits, BLOCK_D=block_dv, HAS_SINKS=sinks is not None, EMULATE_BF16=emulate_bf16(q.dtype),
        )
    return out


def paged_prefill(
    q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float, window: int | None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [T_g, H, Dh], sequence s owning rows query_start_loc[s]:[s + 1] at its last positions
    -> [T_g, H, Dv]."""
    T, H, Dh = q.shape
    S = seq_lens.shape[0]
    _, B, Hkv, _ = key_cache.shape
    Dv = value_cache.shape[-1]
    G = H // Hkv
    g_pad = triton.next_power_of_2(G)
    block_m, block_n = (16, 32) if interpreting() else (64, 64)
    block_m = max(block_m, g_pad)
    block_q = block_m // g_pad  # query positions per program
    q = q.contiguous()
    out = q.new_empty(T, H, Dv)
    # Program b -> (sequence, query block), with device ops: no host sync, no idle programs but
    # the at most S trailing ones (the grid is sized by T and S, which the host knows).
    num_programs = -(-T // block_q) + S
    blocks = (query_start_loc[1:] - query_start_loc[:-1] + block_q - 1) // block_q  # [S]
    ends = torch.cumsum(blocks, 0)  # [S]
    program = torch.arange(num_programs, device=q.device)
    block_seq = torch.searchsorted(ends, program, right=True)  # [NB] in [0, S]
    block_q_index = program - (ends - blocks)[block_seq.clamp(max=S - 1)]
    fp32 = q.dtype == torch.float32
    prefill_kernel[(num_programs, Hkv)](
        q, key_cache, value_cache, block_tables, seq_lens, query_start_loc, block_seq, block_q_index,
        sinks if sinks is not None else out, out,
        scale, window or 0, G, Dh, Dv, S,
        q.stride(0), q.stride(1),
        out.stride(0), out.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        block_tables.stride(0),
        B=B, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(Dh)),
        BLOCK_DV=max(16, triton.next_power_of_2(Dv)), HAS_SINKS=sinks is not None, G_PAD=g_pad,
        DOT_FP32=interpreting() and not fp32, FP32_IEEE=fp32 and not interpreting(),
        EMULATE_BF16=emulate_bf16(q.dtype),
    )
    return out


def paged_attention_triton(q, key_cache, value_cache, meta, scale: float, window: int | None,
                           sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as moeserve.model.attention.paged_attention: q [T, H, Dh] against the cache
    (already holding this step's keys/values) -> [T, H, Dv]. One decode launch (+ reduce) for
    the decode group, one prefill launch for the rest. The value cache must share the key
    cache's strides (a separate cache of the same shape, or MLA's view of the latent)."""
    if key_cache.stride(3) != 1 or value_cache.stride() != key_cache.stride():
        raise ValueError("key and value caches must share a layout with contiguous head dims")
    Dv = value_cache.shape[-1]
    out = q.new_empty(q.shape[0], q.shape[1], Dv) if len(meta.groups) > 1 else None
    for g in meta.groups:
        q_g = q[g.tokens] if out is not None else q
        if g.max_query_len == 1:
            o = paged_decode(q_g, key_cache, value_cache, g.block_tables, g.seq_lens, g.max_seq_len, scale, window,
                             sinks=sinks)
        else:
            o = paged_prefill(q_g, key_cache, value_cache, g.block_tables, g.seq_lens, g.query_start_loc,
                              scale, window, sinks=sinks)
        if out is None:
            return o
        out[g.tokens] = o
    return out
