"""MoE kernels (alignment, fused grouped GEMM, router) and the grouped_mm backend against torch.

On the CPU these run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), on a GPU
compiled. fp32 results must agree to fp32 rounding of a different summation order. Half-precision
results are held to the torch backend's own accuracy: both are compared with an fp64 evaluation
of the same formula, and the kernel's error may be at most twice torch's plus one unit of the
dtype's resolution at the output's scale. A wrong row, block or weight is off by O(1) and fails.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moeserve.model.moe.experts import GroupedMMExpertBackend, TorchExpertBackend
from moeserve.model.moe.router import select_experts_torch
from moeserve.model_config import RouterConfig

triton = pytest.importorskip("triton")

from moeserve.kernels.configs import MoEKernelConfig, default_moe_config, get_moe_config  # noqa: E402
from moeserve.kernels.fused_moe import fused_experts  # noqa: E402
from moeserve.kernels.moe_align import moe_align_block_size  # noqa: E402
from moeserve.kernels.router import fused_topk  # noqa: E402

HALF = (torch.bfloat16, torch.float16)
# Small blocks on purpose: several row and column blocks per slot, and a reduction with a tail.
SMALL = MoEKernelConfig(block_m=16, block_n=32, block_k=32)


def _problem(T, K, P, D, I, dtype, device, seed=0, empty_slots=(), inactive=0.0):
    """Random x, slots (never in `empty_slots`; a fraction `inactive` of choices set to P),
    weights, w13, w2. Each token's K slots are distinct, as top-K's are."""
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([s for s in range(P) if s not in empty_slots])
    # Uneven load: slot popularity drawn from a skewed distribution.
    popularity = torch.rand(len(allowed), generator=g) ** 3 + 0.01
    slots = torch.stack([allowed[torch.multinomial(popularity, K, replacement=False, generator=g)] for _ in range(T)])
    if inactive:
        slots[torch.rand(T, K, generator=g) < inactive] = P
    weights = torch.rand(T, K, generator=g)
    weights = weights / weights.sum(-1, keepdim=True)
    x = torch.randn(T, D, generator=g)
    w13 = torch.randn(P, 2 * I, D, generator=g) / D**0.5
    w2 = torch.randn(P, D, I, generator=g) / I**0.5
    return tuple(t.to(device) for t in (x.to(dtype), slots, weights, w13.to(dtype), w2.to(dtype)))


def _fp64_reference(x, slots, weights, w13, w2):
    x, w13, w2, weights = x.double(), w13.double(), w2.double(), weights.double()
    P = w13.shape[0]
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k, s in enumerate(slots[t].tolist()):
            if s < P:
                gate, up = (w13[s] @ x[t]).chunk(2)
                out[t] += weights[t, k] * (w2[s] @ (F.silu(gate) * up))
    return out


def _assert_agrees(got, expected, inputs):
    assert got.dtype == expected.dtype and got.shape == expected.shape
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        return
    exact = _fp64_reference(*(t.cpu() for t in inputs))
    err_got = (got.cpu().double() - exact).abs().max().item()
    err_ref = (expected.cpu().double() - exact).abs().max().item()
    resolution = torch.finfo(got.dtype).eps * exact.abs().max().item()
    assert err_got <= 2 * err_ref + resolution, (err_got, err_ref, resolution)


@pytest.mark.parametrize("T,K,P,block_m", [(1, 1, 4, 16), (5, 2, 6, 4), (40, 2, 8, 16), (13, 3, 5, 8),
                                           (1, 2, 64, 32)])  # N < P: M_max = N * BM
def test_alignment_groups_every_token_slot_once_in_padded_blocks(T, K, P, block_m, device):
    _, slots, *_ = _problem(T, K, P, 8, 8, torch.float32, device, empty_slots=(1,), inactive=0.2)
    a = moe_align_block_size(slots, P, block_m)
    ids, blocks = a.sorted_token_ids.cpu(), a.block_slot.cpu()
    flat = slots.reshape(-1).cpu()
    N = flat.numel()
    M_pad = int(a.num_tokens_padded)
    counts = torch.bincount(flat, minlength=P + 1)[:P]
    assert M_pad == int(((counts + block_m - 1) // block_m * block_m).sum())
    assert ids.numel() % block_m == 0 and ids.numel() >= M_pad and blocks.numel() == ids.numel() // block_m
    assert (ids[M_pad:] == N).all() and (blocks[M_pad // block_m :] == -1).all()
    active = sorted(i for i in range(N) if flat[i] < P)
    assert sorted(i for i in ids[:M_pad].tolist() if i < N) == active  # each active token-slot once
    for b in range(M_pad // block_m):
        members = [i for i in ids[b * block_m : (b + 1) * block_m].tolist() if i < N]
        assert members and all(int(flat[i]) == int(blocks[b]) for i in members)
        assert members == sorted(members)  # stable: token order kept within a slot


def test_alignment_bound_is_tight_when_every_token_slot_has_its_own_slot(device):
    """N = 2 token-slots in 2 of 64 slots: each fills a 32-row block alone, so M_pad = M_max = 64
    (a bound counting every slot's padding would give 2 + 64 * 31 rows)."""
    a = moe_align_block_size(torch.tensor([[5, 40]], device=device), 64, 32)
    assert int(a.num_tokens_padded) == a.sorted_token_ids.numel() == 64
    assert a.block_slot.tolist() == [5, 40]
    assert a.sorted_token_ids.tolist() == [0] + [2] * 31 + [1] + [2] * 31


def test_alignment_skips_blocks_of_slots_on_other_ranks(device):
    _, slots, *_ = _problem(20, 2, 6, 8, 8, torch.float32, device)
    local = torch.tensor([0, -1, 1, -1, 2, -1], device=device)  # this rank holds slots 0, 2, 4
    a = moe_align_block_size(slots, 6, 8, local_slot=local)
    plain = moe_align_block_size(slots, 6, 8)
    expect = torch.where(plain.block_slot >= 0, local.to(torch.int32)[plain.block_slot.clamp(min=0).long()], -1)
    assert torch.equal(a.block_slot, expect)


@pytest.mark.parametrize("T,K,P,block_m,local", [(1, 2, 8, 16, False), (7, 2, 6, 4, True), (64, 8, 128, 16, False),
                                                  (300, 2, 8, 64, True)])
def test_alignment_kernel_and_torch_ops_build_the_same_layout(T, K, P, block_m, local, device):
    from moeserve.kernels import moe_align

    _, slots, *_ = _problem(T, K, P, 8, 8, torch.float32, device, empty_slots=(1,), inactive=0.1)
    local_slot = torch.randperm(P, device=device) - P // 3 if local else None  # some slots remote (< 0)
    if local_slot is not None:
        local_slot = local_slot.clamp(min=-1)
    flat = slots.reshape(-1)
    m_max = moe_align.max_padded_slots(flat.numel(), P, block_m)
    nb = m_max // block_m
    a = moe_align._align_kernel(flat, P, block_m, m_max, nb, triton.next_power_of_2(P + 1),
                                triton.next_power_of_2(nb), local_slot)
    b = moe_align._align_torch(flat, P, block_m, m_max, local_slot)
    assert torch.equal(a.num_tokens_padded, b.num_tokens_padded)
    assert torch.equal(a.sorted_token_ids, b.sorted_token_ids)
    assert torch.equal(a.block_slot, b.block_slot)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "T,K,P,D,I,empty,inactive",
    [
        (1, 1, 4, 64, 32, (), 0.0),  # one decode token, T < BLOCK_M
        (3, 2, 8, 48, 40, (2, 5), 0.0),  # reductions with tails, experts with zero tokens
        (37, 2, 8, 64, 48, (0,), 0.25),  # uneven load, inactive choices (K lowered for some)
        (24, 1, 6, 32, 64, (), 0.0),  # K = 1
    ],
)
def test_fused_experts_match_torch_backend(T, K, P, D, I, empty, inactive, dtype, device):
    inputs = _problem(T, K, P, D, I, dtype, device, empty_slots=empty, inactive=inactive)
    expected = TorchExpertBackend()(*inputs)
    got = fused_experts(*inputs, config=SMALL)
    _assert_agrees(got, expected, inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_experts_grouped_program_order(dtype, device):
    """GROUP_M > 1 with a row-block count it does not divide: the short last group must still
    cover every (row block, column block) pair once, and its spare programs must write nothing."""
    inputs = _problem(37, 2, 8, 48, 48, dtype, device, inactive=0.1)
    config = MoEKernelConfig(block_m=16, block_n=16, block_k=32, group_m=4)
    aligned = moe_align_block_size(inputs[1], 8, 16)
    assert (int(aligned.num_tokens_padded) // 16) % 4 != 0
    _assert_agrees(fused_experts(*inputs, config=config), TorchExpertBackend()(*inputs), inputs)


def test_fused_experts_with_default_config_and_large_blocks(device):
    inputs = _problem(9, 2, 4, 64, 64, torch.bfloat16, device)
    got = fused_experts(*inputs)  # default config: one block covers everything
    _assert_agrees(got, TorchExpertBackend()(*inputs), inputs)


def test_fused_experts_expert_parallel_computes_only_local_slots(device):
    x, slots, weights, w13, w2 = _problem(16, 2, 6, 32, 32, torch.float32, device)
    mine = [0, 2, 4]
    local = torch.tensor([0, -1, 1, -1, 2, -1], device=device)
    got = fused_experts(x, slots, weights, w13[mine], w2[mine], local_slot=local, config=SMALL)
    remote_dropped = torch.where(local[slots.clamp(max=5)] >= 0, slots, 6)
    expected = TorchExpertBackend()(x, remote_dropped, weights, w13, w2)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_fused_experts_rejects_mismatched_shapes(device):
    x, slots, weights, w13, w2 = _problem(4, 2, 4, 32, 16, torch.float32, device)
    with pytest.raises(ValueError, match="bad shapes"):
        fused_experts(x, slots, weights, w13[:, :-1], w2)
    with pytest.raises(ValueError, match="dtype"):
        fused_experts(x.half(), slots, weights, w13, w2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,E,K,k,renorm", [(1, 8, 2, 2, True), (7, 12, 2, 1, True), (70, 8, 4, 3, False),
                                            (5, 16, 1, 1, False), (33, 60, 4, 4, True)])
def test_router_kernel_matches_torch_topk(T, E, K, k, renorm, dtype, device):
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(T * E)).to(dtype).to(device)
    k_t = torch.tensor(k, device=device)
    w_ref, ids_ref = select_experts_torch(logits, K, k_t, renorm)
    w, ids = fused_topk(logits, K, k_t, renorm)
    assert torch.equal(ids, ids_ref)
    assert (ids[:, k:] == E).all() and (w[:, k:] == 0).all()
    torch.testing.assert_close(w, w_ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_router_kernel_breaks_ties_by_the_lowest_expert_id(dtype, device):
    """Row 0: all logits zero. Row 1: bf16 rounds 1.0 and 1.001 together (in fp32 they differ,
    so value decides). Row 2: a tie below the top. The torch path follows torch.topk on ties
    (as transformers does), so only the weights, which ties cannot change, are compared to it."""
    logits = torch.tensor([[0.0] * 8, [0.5, 1.0, 0.2, 1.001, 1.0, 0.0, 0.3, 1.0],
                           [3.0, 1.0, 0.0, 1.0, 1.0, 2.0, 0.0, 0.0]]).to(dtype).to(device)
    k_t = torch.tensor(3, device=device)
    w, ids = fused_topk(logits, 3, k_t, True)
    assert ids[0].tolist() == [0, 1, 2] and ids[2].tolist() == [0, 5, 1]
    assert ids[1].tolist() == ([1, 3, 4] if dtype == torch.bfloat16 else [3, 1, 4])
    w_ref, _ = select_experts_torch(logits, 3, k_t, True)
    torch.testing.assert_close(w, w_ref, rtol=1e-6, atol=1e-7)


def test_router_kernel_sigmoid_scoring(device):
    logits = torch.randn(9, 16, generator=torch.Generator().manual_seed(1)).to(device)
    w, ids = fused_topk(logits, 4, torch.tensor(4), renormalize=True, scoring="sigmoid")
    top, top_ids = torch.topk(torch.sigmoid(logits), 4, dim=-1)
    assert torch.equal(ids, top_ids)
    torch.testing.assert_close(w, top / top.sum(-1, keepdim=True), rtol=1e-6, atol=1e-7)


def test_router_kernel_rejects_bad_arguments(device):
    with pytest.raises(ValueError, match="top_k"):
        fused_topk(torch.randn(3, 4, device=device), 5, torch.tensor(1), True)
    with pytest.raises(ValueError, match="scoring"):
        fused_topk(torch.randn(3, 4, device=device), 2, torch.tensor(1), True, scoring="relu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_backend_matches_torch_backend(dtype, device):
    inputs = _problem(29, 2, 8, 64, 32, dtype, device, empty_slots=(3,), inactive=0.2)
    _assert_agrees(GroupedMMExpertBackend()(*inputs), TorchExpertBackend()(*inputs), inputs)


def test_config_table_lookup_picks_smallest_tabulated_m_at_least_the_batch(tmp_path, monkeypatch):
    from moeserve.kernels import configs

    table = {"device": "Test GPU", "shapes": {configs.shape_key(8, 64, 32, torch.bfloat16): {
        "16": MoEKernelConfig(16, 32, 64).to_json(), "256": MoEKernelConfig(64, 64, 32, group_m=8).to_json()}}}
    import json

    monkeypatch.setattr(configs, "CONFIG_DIR", tmp_path)
    configs.device_file("Test GPU").write_text(json.dumps(table))
    get = lambda m: get_moe_config(8, 64, 32, m, torch.bfloat16, device_name="Test GPU")  # noqa: E731
    assert get(1) == get(16) == MoEKernelConfig(16, 32, 64)
    assert get(17) == get(4096) == MoEKernelConfig(64, 64, 32, group_m=8)
    assert get_moe_config(8, 64, 64, 1, torch.bfloat16, device_name="Test GPU") == default_moe_config(8, 1)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 64, 1024])
def test_fused_experts_compiled_at_serving_shapes(M):
    """Compiled on the GPU with the tuned or default configs, at a Mixtral-like width, under the
    same rule as in the interpreter (max error at most twice torch's, against fp64)."""
    inputs = _problem(M, 2, 8, 1024, 3584, torch.bfloat16, "cuda", inactive=0.05)
    expected = TorchExpertBackend()(*inputs)
    got = fused_experts(*inputs)
    assert torch.isfinite(got).all()
    _assert_agrees(got, expected, inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_router_kernel_takes_a_k_per_token(dtype, device):
    """Requests of different K share a batch: each row is masked to its own K."""
    T, E, K = 37, 8, 4
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(5)).to(dtype).to(device)
    k_t = torch.tensor([1, 2, 3, 4] * 9 + [2], device=device)
    w_ref, ids_ref = select_experts_torch(logits, K, k_t, True)
    w, ids = fused_topk(logits, K, k_t, True)
    assert torch.equal(ids, ids_ref)
    for row, k in enumerate(k_t.tolist()):
        assert (ids[row, k:] == E).all() and (w[row, k:] == 0).all() and (ids[row, :k] < E).all()
    torch.testing.assert_close(w, w_ref, rtol=1e-6, atol=1e-7)
    assert torch.allclose(w.sum(dim=1), torch.ones(T, device=device))


@pytest.mark.parametrize("name,spec,renorm", [
    ("deepseek_v3", RouterConfig("sigmoid", "group_top2_sum", 4, 2, 2.5, correction_bias=True), True),
    ("deepseek_v2", RouterConfig("softmax", "group_max", 4, 1, 1.5), False),
    ("gpt_oss", RouterConfig("topk_softmax", bias=True), True),
])
@pytest.mark.parametrize("k", [3, 1])
def test_grouped_and_topk_softmax_router_kernel_matches_torch(name, spec, renorm, k, device):
    """The DeepSeek group-limited routers and GPT-OSS's top-K softmax, at the model's K and at a
    lowered K, against select_experts_torch (random fp32 logits: no ties)."""
    T, E, K = 37, 12, 3
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(T, E, generator=gen).to(device)
    correction = (0.3 * torch.randn(E, generator=gen)).to(device) if spec.correction_bias else None
    k_t = torch.tensor(k, device=device)
    w_ref, ids_ref = select_experts_torch(logits, K, k_t, renorm, spec, correction)
    w, ids = fused_topk(logits, K, k_t, renorm, spec=spec, correction_bias=correction)
    assert torch.equal(ids, ids_ref), name
    assert (ids[:, k:] == E).all() and (w[:, k:] == 0).all()
    torch.testing.assert_close(w, w_ref, rtol=1e-6, atol=1e-6)
    if spec.group_select != "none" and k == K:  # the group limit changed some token's choice
        plain = torch.topk(logits, K).indices
        assert any(set(plain[t, :k].tolist()) != set(ids[t, :k].tolist()) for t in range(T))
