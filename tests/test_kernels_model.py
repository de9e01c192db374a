"""The whole model through the triton backends agrees with the torch backends (equality rule).

On the CPU the kernels run in Triton's interpreter (tests/conftest.py), so prompts are few and
continuations short; the model is fp32, as the rule asks. Also: how backends are chosen.
"""

from __future__ import annotations

import pytest
import torch

from moeserve import load_model
from moeserve.checkpoint import resolve_backends
from moeserve.model.moe.experts import default_expert_backend
from moeserve.model_config import ExpertActivation
from moeserve.testing.checkpoints import NEW_ARCHS, SWA_ARCHS, TINY_ARCHS
from moeserve.testing.equality import greedy_divergence
from moeserve.testing.runner import ReferenceRunner

pytest.importorskip("triton")

DECODE_STEPS = 4


@pytest.mark.parametrize("arch", TINY_ARCHS + SWA_ARCHS[:1] + NEW_ARCHS)
def test_triton_backends_agree_with_torch_backends(arch, checkpoints, prompts, device):
    """DeepSeek: MLA's absorbed decode and the grouped router run in the kernels. GPT-OSS: the
    attention kernels with sinks and windows; its clamped, biased experts stay on torch."""
    picked = [prompts[0], prompts[3], prompts[-1]]  # 1 token, mid-length, the longest
    reference = load_model(checkpoints(arch), device=device, expert_backend="torch", attention_backend="torch")
    experts = "torch" if arch == "gpt_oss" else "triton"
    kernels = load_model(checkpoints(arch), device=device, expert_backend=experts, attention_backend="triton")
    assert kernels.model.layers[0].self_attn.backend == "triton"
    expected = ReferenceRunner(reference).greedy(picked, DECODE_STEPS)
    got = ReferenceRunner(kernels).greedy(picked, DECODE_STEPS)
    for prompt, a, b in zip(picked, expected, got):
        assert greedy_divergence(a, b) is None, (len(prompt), greedy_divergence(a, b))


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_grouped_mm_backend_agrees_with_torch_backend(arch, checkpoints, prompts):
    """GPT-OSS: grouped_mm computes its biased, clamped experts too."""
    reference = load_model(checkpoints(arch), expert_backend="torch")
    grouped = load_model(checkpoints(arch), expert_backend="grouped_mm")
    expected = ReferenceRunner(reference).greedy(prompts, DECODE_STEPS)
    got = ReferenceRunner(grouped).greedy(prompts, DECODE_STEPS)
    for a, b in zip(expected, got):
        assert greedy_divergence(a, b) is None, greedy_divergence(a, b)


def test_gpt_oss_experts_on_the_triton_kernels_are_refused_by_name(checkpoints):
    with pytest.raises(ValueError, match="triton moe backend cannot compute GptOssForCausalLM's experts"):
        load_model(checkpoints("gpt_oss"), expert_backend="triton")


def test_backend_choice_follows_the_device(monkeypatch):
    assert resolve_backends("auto", "auto", "cpu") == ("torch", "torch")
    assert resolve_backends("grouped_mm", "torch", "cpu") == ("grouped_mm", "torch")
    if torch.cuda.is_available():
        assert resolve_backends("auto", "auto", "cuda") == ("triton", "triton")
    with pytest.raises(ValueError, match="grouped_mm moe backend takes bfloat16 on CUDA"):
        resolve_backends("grouped_mm", "torch", "cuda", torch.float32)
    # GPT-OSS's experts (clamped SwiGLU, biases) have no triton kernel: auto picks torch even on CUDA.
    assert default_expert_backend("cuda", ExpertActivation("clamped_swiglu"), True) == "torch"
    with pytest.raises(ValueError, match="unknown moe backend 'cutlass'"):
        resolve_backends("cutlass", "auto", "cpu")
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_backends("torch", "flash", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="triton moe backend needs"):
            resolve_backends("triton", "torch", "cpu")
