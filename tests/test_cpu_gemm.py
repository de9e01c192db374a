"""oneDNN-packed CPU GEMMs (model/cpu_gemm.py): when they are used, that they compute what
aten computes, and that a slot whose weights change is packed again."""

from __future__ import annotations

import pytest
import torch

from moeserve.checkpoint import load_model
from moeserve.model.cpu_gemm import onednn_usable, resolve_cpu_gemm
from moeserve.model.layers import Linear
from moeserve.testing.checkpoints import NEW_ARCHS, TINY_ARCHS
from moeserve.testing.runner import ReferenceRunner

pytestmark = pytest.mark.skipif(not onednn_usable(), reason="this torch has no oneDNN")

ARCHS = TINY_ARCHS + NEW_ARCHS


def _packed(model) -> tuple[int, int]:
    """(packed dense Linears, MoE layers with packed slots)."""
    return (sum(m.packed is not None for m in model.modules() if isinstance(m, Linear)),
            sum(moe.packed is not None for moe in model.moe_layers))


def test_which_weights_are_packed(checkpoints, monkeypatch):
    path = checkpoints("mixtral")
    model = load_model(path, dtype="float32", cpu_gemm="onednn")
    linears = sum(isinstance(m, Linear) for m in model.modules())
    assert _packed(model) == (linears, len(model.moe_layers))
    assert _packed(load_model(path, dtype="float32")) == (0, 0)  # auto: every weight here is under 256 x 256
    monkeypatch.setattr("moeserve.checkpoint.MIN_PACKED_ELEMENTS", 64 * 96)  # the tiny experts' size
    big = [m for m in model.modules() if isinstance(m, Linear) and m.weight.numel() >= 64 * 96]
    assert 0 < len(big) < linears
    assert _packed(load_model(path, dtype="float32")) == (len(big), len(model.moe_layers))
    assert _packed(load_model(path, dtype="float32", cpu_gemm="aten")) == (0, 0)
    assert _packed(load_model(path, dtype="bfloat16")) == (0, 0)  # aten's bf16 is transformers' numerics
    with pytest.raises(ValueError, match="fp32 weights on the CPU"):
        resolve_cpu_gemm("onednn", "cpu", torch.bfloat16)


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_logits_match_aten(arch, checkpoints, prompts):
    """Prefill and decode logits of the packed model within 1e-5 of the plain one (only the
    summation order differs), for every family's layer kinds (MLA, biases, shared experts)."""
    path = checkpoints(arch)
    packed = load_model(path, dtype="float32", cpu_gemm="onednn")
    plain = load_model(path, dtype="float32", cpu_gemm="aten")
    assert _packed(packed)[0] > 0
    a, b = ReferenceRunner(packed), ReferenceRunner(plain)
    batch = {i: p for i, p in enumerate(prompts)}
    for _ in range(3):
        got, want = a.step(batch), b.step(batch)
        for i in batch:
            torch.testing.assert_close(got[i], want[i], rtol=0, atol=1e-5)
        batch = {i: [int(want[i][-1].argmax())] for i in batch}


def test_a_replicated_slot_is_packed_again(checkpoints, prompts):
    """After an expert is copied into a spare slot, tokens routed to the copy get that expert's
    output: without repacking, the slot's packed weights would still be the empty slot's."""
    path = checkpoints("mixtral")
    packed = load_model(path, dtype="float32", num_redundant_experts=1, cpu_gemm="onednn")
    plain = load_model(path, dtype="float32", num_redundant_experts=1, cpu_gemm="aten")
    spare = packed.num_slots - 1
    for model in (packed, plain):
        for moe in model.moe_layers:
            moe.w13[spare].fill_(1e3)  # what the spare slot held before: loud if ever used
            moe.repack(spare)
            moe.replicate(0, spare)
    batch = {i: p for i, p in enumerate(prompts)}
    got, want = ReferenceRunner(packed).step(batch), ReferenceRunner(plain).step(batch)
    assert int(packed.expert_load().physical[:, spare].sum()) > 0, "no token reached the replica"
    for i in batch:
        torch.testing.assert_close(got[i], want[i], rtol=0, atol=1e-5)
