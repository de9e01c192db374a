"""Frozen configuration read from a Hugging Face checkpoint directory.

`ModelConfig` is the one description of a model that every stage reads. It is built from
config.json by a per-family parser (`_FAMILIES`), so family differences (biases, q/k norms,
router normalisation, dense layers) become plain fields here and the model code has no
`if model_type == ...` branches. Anything moeserve cannot compute exactly is refused by name.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from moeserve.errors import CheckpointError
from moeserve.generation_config import as_id_tuple


QKNorm = Literal["none", "head", "full"]

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        if name not in _DTYPES.values():
            raise CheckpointError(f"unsupported dtype {name}; use float32, bfloat16 or float16")
        return name
    key = str(name).removeprefix("torch.")
    if key not in _DTYPES:
        raise CheckpointError(f"unsupported dtype {name!r}; use auto, float32, bfloat16 or float16")
    return _DTYPES[key]


def resolve_device(name: str, cuda_available: bool | None = None) -> str:
    """'auto' -> 'cuda' when a CUDA device is usable, else 'cpu'; any other name unchanged."""
    if name != "auto":
        return name
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    return "cuda" if cuda_available else "cpu"


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters; `rope_type` is 'default' or 'yarn' (others are refused)."""

    rope_type: str
    theta: float
    rotary_dim: int
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    attention_factor: float | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def inv_freq_and_scale(self) -> tuple[torch.Tensor, float]:
        """Inverse frequencies [rotary_dim / 2] (fp32, on the CPU) and the factor cos/sin are multiplied by."""
        dim = self.rotary_dim
        pos_freqs = self.theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)
        if self.rope_type == "default":
            return 1.0 / pos_freqs, 1.0
        return self._yarn(pos_freqs)

    def _yarn(self, pos_freqs: torch.Tensor) -> tuple[torch.Tensor, float]:
        # YaRN (arXiv 2309.00071): interpolate low frequencies, extrapolate high ones, with a
        # linear ramp between the correction dims; cos/sin are scaled by the attention factor.
        dim, base, factor = self.rotary_dim, self.theta, self.factor
        orig = self.original_max_position_embeddings
        assert orig is not None

        def mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attention_factor = self.attention_factor
        if attention_factor is None:
            if self.mscale and self.mscale_all_dim:
                attention_factor = mscale(factor, self.mscale) / mscale(factor, self.mscale_all_dim)
            else:
                attention_factor = mscale(factor)

        def correction_dim(rotations: float) -> float:
            return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

        low, high = correction_dim(self.beta_fast), correction_dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
        extrapolation_weight = 1 - ramp
        inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_weight) + (
            1.0 / pos_freqs
        ) * extrapolation_weight
        return inv_freq, float(attention_factor)


@dataclass(frozen=True)
class ModelConfig:
    """What the model computes, independent of the family that wrote the checkpoint.

    Invariants: len(moe_layers) == len(sliding_windows) == num_layers; num_heads is a multiple
    of num_kv_heads; 1 <= top_k <= num_experts.
    """

    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool
    # Attention details.
    qkv_bias: bool
    o_bias: bool
    qk_norm: QKNorm
    clip_qkv: float | None
    sliding_windows: tuple[int | None, ...]
    # MLP / MoE.
    moe_layers: tuple[bool, ...]
    intermediate_size: int
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    renormalize: bool
    # Mixtral keeps renormalised routing weights in fp32 into the expert-output multiply;
    # the Qwen family and OLMoE cast them to the model dtype first.
    router_weights_fp32: bool
    shared_expert_intermediate_size: int
    # Checkpoint metadata.
    checkpoint_dtype: str | None
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    raw: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)

    @property
    def num_moe_layers(self) -> int:
        return sum(self.moe_layers)

    @property
    def moe_layer_ids(self) -> tuple[int, ...]:
        """Decoder-layer index of each MoE layer, in MoE-layer order."""
        return tuple(i for i, is_moe in enumerate(self.moe_layers) if is_moe)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        config_path = Path(path) / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{path}: no config.json (expected a Hugging Face model directory)")
        try:
            raw = json.loads(config_path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{config_path}: not valid JSON ({e})") from e
        return cls.from_hf_dict(raw)

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        family = _detect_family(raw)
        return _FAMILIES[family](_Reader(raw, family))


# Values transformers' config classes use when config.json omits the key.
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "mixtral": {"rms_norm_eps": 1e-5, "max_position_embeddings": 131072, "rope_theta": 1e6},
    "qwen2_moe": {"rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "rope_theta": 1e4,
                  "max_window_layers": 28, "shared_expert_intermediate_size": 5632, "qkv_bias": True,
                  "sliding_window": 4096},
    "qwen3_moe": {"rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "rope_theta": 1e4, "sliding_window": 4096},
    "olmoe": {"rms_norm_eps": 1e-5, "max_position_embeddings": 4096, "rope_theta": 1e4},
}


class _Reader:
    """config.json accessor: a missing key takes the family's transformers default; errors name
    the family and the key."""

    def __init__(self, raw: dict[str, Any], family: str):
        self.raw = raw
        self.family = family
        self.defaults = _FAMILY_DEFAULTS[family]

    def req(self, key: str) -> Any:
        if self.raw.get(key) is None:
            raise CheckpointError(f"{self.family} config.json: required key {key!r} is missing")
        return self.raw[key]

    def num_experts(self) -> int:
        # transformers' attribute_map aliases the two names per family, and which one
        # config.json carries differs between transformers versions and Hub uploads.
        value = self.raw.get("num_experts", self.raw.get("num_local_experts"))
        if value is None:
            raise CheckpointError(f"{self.family} config.json: required key 'num_experts' is missing")
        return int(value)

    def get(self, key: str, default: Any = None) -> Any:
        value = self.raw.get(key)
        if value is None:
            value = self.defaults.get(key)
        return default if value is None else value


_ARCHITECTURES = {
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "OlmoeForCausalLM": "olmoe",
}


def _detect_family(raw: dict[str, Any]) -> str:
    archs = raw.get("architectures") or []
    for arch in archs:
        if arch in _ARCHITECTURES:
            return _ARCHITECTURES[arch]
    model_type = raw.get("model_type")
    if not archs and model_type in _ARCHITECTURES.values():
        return model_type
    supported = ", ".join(sorted(_ARCHITECTURES))
    named = archs or model_type
    raise CheckpointError(f"unsupported architecture {named!r}; moeserve supports {supported}")


def _rope(r: _Reader, head_dim: int) -> RopeConfig:
    # transformers >= 5 writes rope_parameters; Hub configs carry rope_theta / rope_scaling.
    # Precedence as in transformers: rope_scaling over rope_parameters; the dict's own
    # rope_theta over the top-level one; a top-level original_max_position_embeddings over the
    # dict's.
    params = dict(r.raw.get("rope_scaling") or r.raw.get("rope_parameters") or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta") or r.get("rope_theta"))
    partial = float(params.get("partial_rotary_factor", r.get("partial_rotary_factor", 1.0)))
    if partial != 1.0:
        raise CheckpointError(f"partial_rotary_factor={partial} is not supported")
    if rope_type == "default":
        return RopeConfig("default", theta, head_dim)
    if rope_type == "yarn":
        max_pos = int(r.get("max_position_embeddings"))
        orig = int(r.raw.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
                   or max_pos)
        factor = params.get("factor")
        return RopeConfig(
            "yarn",
            theta,
            head_dim,
            factor=float(factor) if factor is not None else max_pos / orig,
            original_max_position_embeddings=orig,
            attention_factor=params.get("attention_factor"),
            beta_fast=float(params.get("beta_fast") or 32),
            beta_slow=float(params.get("beta_slow") or 1),
            mscale=params.get("mscale"),
            mscale_all_dim=params.get("mscale_all_dim"),
            truncate=bool(params.get("truncate", True)),
        )
    raise CheckpointError(f"unsupported rope_type {rope_type!r}; moeserve supports 'default' and 'yarn'")


def _common(r: _Reader, *, head_dim: int | None = None) -> dict[str, Any]:
    """Fields every family reads the same way."""
    quant = r.raw.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else quant
        raise CheckpointError(f"quantized checkpoints are not supported (quantization_config: {method})")
    hidden, heads = int(r.req("hidden_size")), int(r.req("num_attention_heads"))
    kv_heads = int(r.get("num_key_value_heads", heads))
    if heads % kv_heads:
        raise CheckpointError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    head_dim = head_dim or hidden // heads
    act = r.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"unsupported hidden_act {act!r}; moeserve supports 'silu'")
    num_experts, top_k = r.num_experts(), int(r.req("num_experts_per_tok"))
    if not 1 <= top_k <= num_experts:
        raise CheckpointError(f"num_experts_per_tok={top_k} must lie in [1, {num_experts}]")
    dtype = r.get("dtype", r.get("torch_dtype"))
    return dict(
        architecture=(r.get("architectures") or [r.family])[0],
        model_type=r.family,
        vocab_size=int(r.req("vocab_size")),
        hidden_size=hidden,
        num_layers=int(r.req("num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(r.get("rms_norm_eps")),
        rope=_rope(r, head_dim),
        max_position_embeddings=int(r.get("max_position_embeddings")),
        tie_word_embeddings=bool(r.get("tie_word_embeddings", False)),
        intermediate_size=int(r.req("intermediate_size")),
        num_experts=num_experts,
        top_k=top_k,
        checkpoint_dtype=str(dtype).removeprefix("torch.") if dtype else None,
        bos_token_id=r.get("bos_token_id"),
        eos_token_ids=as_id_tuple(r.get("eos_token_id")),
        raw=r.raw,
    )


def _qwen_style(r: _Reader, num_layers: int, num_experts: int) -> dict[str, Any]:
    """Router and layer-type fields shared by Qwen2-MoE and Qwen3-MoE: layers in mlp_only_layers
    or off the decoder_sparse_step grid are dense; renormalise iff norm_topk_prob."""
    mlp_only = set(r.get("mlp_only_layers", []))
    step = int(r.get("decoder_sparse_step", 1))
    return dict(
        moe_layers=tuple(i not in mlp_only and num_experts > 0 and (i + 1) % step == 0 for i in range(num_layers)),
        moe_intermediate_size=int(r.req("moe_intermediate_size")),
        renormalize=bool(r.get("norm_topk_prob", False)),
        router_weights_fp32=False,
    )


def _sliding_window_required(r: _Reader) -> int:
    window = r.get("sliding_window")
    if not window or int(window) <= 0:
        raise CheckpointError(f"use_sliding_window is true but sliding_window={window!r} is not a positive size")
    return int(window)


def _parse_mixtral(r: _Reader) -> ModelConfig:
    common = _common(r, head_dim=r.get("head_dim"))
    n = common["num_layers"]
    window = r.get("sliding_window")
    return ModelConfig(
        **common,
        qkv_bias=False,
        o_bias=False,
        qk_norm="none",
        clip_qkv=None,
        sliding_windows=(int(window) if window else None,) * n,
        moe_layers=(True,) * n,
        moe_intermediate_size=common["intermediate_size"],
        renormalize=True,
        router_weights_fp32=True,
        shared_expert_intermediate_size=0,
    )


def _parse_qwen2_moe(r: _Reader) -> ModelConfig:
    common = _common(r, head_dim=r.get("head_dim"))
    n = common["num_layers"]
    # Qwen2-MoE writes sliding_window: 0 when the window is off: only use_sliding_window decides.
    windows: tuple[int | None, ...] = (None,) * n
    if r.get("use_sliding_window", False):
        window = _sliding_window_required(r)
        max_window_layers = int(r.get("max_window_layers"))
        layer_types = r.get("layer_types") or [
            "sliding_attention" if (i + 1) % 2 and i < max_window_layers else "full_attention" for i in range(n)
        ]
        if len(layer_types) != n or not set(layer_types) <= {"sliding_attention", "full_attention"}:
            raise CheckpointError(
                f"layer_types must list {n} entries of 'full_attention' or 'sliding_attention', got {layer_types}"
            )
        windows = tuple(window if t == "sliding_attention" else None for t in layer_types)
    return ModelConfig(
        **common,
        **_qwen_style(r, n, common["num_experts"]),
        qkv_bias=bool(r.get("qkv_bias")),
        o_bias=False,
        qk_norm="none",
        clip_qkv=None,
        sliding_windows=windows,
        shared_expert_intermediate_size=int(r.get("shared_expert_intermediate_size")),
    )


def _parse_qwen3_moe(r: _Reader) -> ModelConfig:
    common = _common(r, head_dim=r.get("head_dim"))
    n = common["num_layers"]
    window = _sliding_window_required(r) if r.get("use_sliding_window", False) else None
    bias = bool(r.get("attention_bias", False))
    return ModelConfig(
        **common,
        **_qwen_style(r, n, common["num_experts"]),
        qkv_bias=bias,
        o_bias=bias,
        qk_norm="head",
        clip_qkv=None,
        sliding_windows=(window,) * n,
        shared_expert_intermediate_size=0,
    )


def _parse_olmoe(r: _Reader) -> ModelConfig:
    # OLMoE's q_norm/k_norm sizes are hidden_size and (hidden/heads)*kv_heads, so its head_dim
    # is always hidden_size // num_attention_heads.
    common = _common(r)
    n = common["num_layers"]
    bias = bool(r.get("attention_bias", False))
    clip = r.get("clip_qkv")
    return ModelConfig(
        **common,
        qkv_bias=bias,
        o_bias=bias,
        qk_norm="full",
        clip_qkv=float(clip) if clip is not None else None,
        sliding_windows=(None,) * n,
        moe_layers=(True,) * n,
        moe_intermediate_size=common["intermediate_size"],
        renormalize=bool(r.get("norm_topk_prob", False)),
        router_weights_fp32=False,
        shared_expert_intermediate_size=0,
    )


_FAMILIES: dict[str, Callable[[_Reader], ModelConfig]] = {
    "mixtral": _parse_mixtral,
    "qwen2_moe": _parse_qwen2_moe,
    "qwen3_moe": _parse_qwen3_moe,
    "olmoe": _parse_olmoe,
}
