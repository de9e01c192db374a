"""Block sizes for the fused MoE kernel, per layer shape and batch size.

A table per GPU lives in kernels/configs/<device name>.json (written by bench/tune_kernels.py on
that GPU):

    {"device": "NVIDIA H100 80GB HBM3",
     "shapes": {"P=8,I=14336,D=4096,dtype=bfloat16": {"1": {"block_m": 16, ...}, "64": {...}}}}

A lookup takes the entry for the smallest tabulated M >= the batch's M (the largest when M is
beyond them). Shapes or devices not in a table fall back to `default_moe_config`, which follows
the usual split: small M is weight-bandwidth bound (small BLOCK_M, wide BLOCK_K), large M is
compute bound (square-ish tiles, grouped ordering for L2 reuse).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch

from moeserve.kernels import interpreting

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass(frozen=True)
class MoEKernelConfig:
    block_m: int
    block_n: int
    block_k: int
    group_m: int = 1
    num_warps: int = 4
    num_stages: int = 3

    def to_json(self) -> dict:
        return asdict(self)


def shape_key(num_slots: int, intermediate: int, hidden: int, dtype: torch.dtype) -> str:
    return f"P={num_slots},I={intermediate},D={hidden},dtype={str(dtype).removeprefix('torch.')}"


def device_file(device_name: str) -> Path:
    return CONFIG_DIR / (re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_") + ".json")


@lru_cache(maxsize=16)
def load_table(path: Path) -> dict[str, dict[int, MoEKernelConfig]]:
    """Parsed table (read once per file); an absent file is an empty table."""
    if not path.exists():
        return {}
    raw = json.loads(path.read_text())
    return {key: {int(m): MoEKernelConfig(**cfg) for m, cfg in by_m.items()} for key, by_m in raw["shapes"].items()}


@lru_cache(maxsize=8)
def _current_device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def default_moe_config(num_slots: int, num_tokens: int) -> MoEKernelConfig:
    if interpreting():
        # The interpreter pays per program and per op, not per element: few, large blocks.
        return MoEKernelConfig(block_m=16, block_n=64, block_k=64)
    tokens_per_slot = num_tokens / max(num_slots, 1)
    if num_tokens <= num_slots or tokens_per_slot <= 16:
        return MoEKernelConfig(block_m=16, block_n=64, block_k=128, group_m=1, num_warps=4, num_stages=4)
    if tokens_per_slot <= 64:
        return MoEKernelConfig(block_m=64, block_n=64, block_k=64, group_m=8, num_warps=4, num_stages=4)
    return MoEKernelConfig(block_m=128, block_n=128, block_k=64, group_m=8, num_warps=8, num_stages=3)


def get_moe_config(
    num_slots: int, intermediate: int, hidden: int, num_tokens: int, dtype: torch.dtype, device_name: str | None = None
) -> MoEKernelConfig:
    """Config for a layer with P slots, I, D, at M = num_tokens token rows (T, not T*K)."""
    if device_name is None and torch.cuda.is_available() and not interpreting():
        device_name = _current_device_name(torch.cuda.current_device())
    if device_name is not None:
        by_m = load_table(device_file(device_name)).get(shape_key(num_slots, intermediate, hidden, dtype))
        if by_m:
            fits = [m for m in by_m if m >= num_tokens]
            return by_m[min(fits) if fits else max(by_m)]
    return default_moe_config(num_slots, num_tokens)
