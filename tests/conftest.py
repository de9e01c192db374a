"""Shared fixtures: tiny Hub-layout checkpoints, made once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter. Triton reads this when a kernel
# module is imported, so it is set before any test module imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from moeserve.testing.checkpoints import make_tiny_checkpoint

# Mixtral is written sharded (with model.safetensors.index.json); OLMoE keeps its chat template
# inside tokenizer_config.json, the older Hub layout. The others use the defaults.
_VARIANTS = {
    "mixtral": dict(max_shard_size="100KB"),
    "olmoe": dict(template_in_config=True),
}


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def device() -> str:
    """Where kernel tests put their tensors: the GPU when there is one, else the interpreter's CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """checkpoints(arch) -> path of that tiny checkpoint, made on first use."""
    made: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("checkpoints")

    def get(arch: str) -> Path:
        if arch not in made:
            made[arch] = make_tiny_checkpoint(arch, root / arch, **_VARIANTS.get(arch, {}))
        return made[arch]

    return get


@pytest.fixture(scope="session")
def prompts(checkpoints):
    """Eight token prompts of different lengths (1 to 40 tokens), from the tiny tokenizer."""
    from moeserve import Tokenizer

    tok = Tokenizer(checkpoints("mixtral"))
    texts = [
        "def",
        "the expert router",
        "def f_7(x, y=3):\n    return x",
        "caché naïve 日本語 🙂 and the batch runs",
        "mixture of experts serving latency throughput cache block prefill decode scheduler kernel",
        "print(range(len(dict)))",
        "über straße → π ≈ 3.14159; the scheduler sends each token to a few experts",
        "async def serve(self):\n    await the kernel; yield None if True else False; return lambda x: x",
    ]
    out = [tok.encode(t) for t in texts]
    assert sorted(len(p) for p in out)[0] == 1 and max(len(p) for p in out) >= 30
    return out
