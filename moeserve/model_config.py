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
Scoring = Literal["softmax", "sigmoid", "topk_softmax"]
GroupSelect = Literal["none", "group_max", "group_top2_sum"]

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
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2/V3). Per token and layer the cache holds one
    entry of kv_lora_rank + qk_rope_head_dim values: the normalised latent c (from which
    kv_b_proj decompresses every head's non-rotary key and its value) and the roped key part
    shared by all heads. `rope_interleave`: the rotary pairs are (x0, x1), (x2, x3), ... (V2
    always; V3 by its config), not the two halves. `rope_fp32`: the rotation runs in fp32 and is
    cast back (V2 rotates as complex64 numbers)."""

    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_interleave: bool
    rope_fp32: bool = False

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def cache_dim(self) -> int:
        return self.kv_lora_rank + self.qk_rope_head_dim


@dataclass(frozen=True)
class RouterConfig:
    """How gate logits become K experts and their weights (model/moe/router.py).

    scoring: softmax over all experts; sigmoid per expert (DeepSeek-V3); topk_softmax: top-K of
    the raw logits, softmax over those K (GPT-OSS). group_select limits the choice to the
    `topk_group` best of `n_group` equal expert groups, a group scoring its best expert
    (group_max, DeepSeek-V2 group_limited_greedy) or the sum of its best two (group_top2_sum,
    DeepSeek-V3, on the bias-corrected scores). `correction_bias`: an fp32 per-expert bias added
    for the choice only (V3 e_score_correction_bias). Weights are multiplied by
    routed_scaling_factor last. `bias`: the gate linear has a bias (GPT-OSS). `logits_fp32`: the
    gate matmul runs in fp32 (DeepSeek)."""

    scoring: Scoring = "softmax"
    group_select: GroupSelect = "none"
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    correction_bias: bool = False
    bias: bool = False
    logits_fp32: bool = False


@dataclass(frozen=True)
class ExpertActivation:
    """silu: down(silu(gate) * up). clamped_swiglu (GPT-OSS): gate clamped above at `limit`, up
    to [-limit, limit], down(gate * sigmoid(alpha * gate) * (up + 1))."""

    kind: Literal["silu", "clamped_swiglu"] = "silu"
    alpha: float = 1.702
    limit: float = 7.0


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
    # Families beyond the llama-style block; the defaults describe Mixtral/Qwen/OLMoE.
    mla: MLAConfig | None = None
    attention_scale: float | None = None  # None: head_dim ** -0.5
    attention_sinks: bool = False  # a learned per-head logit in every softmax (GPT-OSS)
    router: RouterConfig = RouterConfig()
    expert_activation: ExpertActivation = ExpertActivation()
    expert_bias: bool = False
    shared_expert_gated: bool = True  # Qwen2-MoE: sigmoid(shared_expert_gate(x)) * shared; DeepSeek: ungated
    norm_scale_fp32: bool = False  # RMSNorm casts after the weight multiply (GPT-OSS)
    quantization: str | None = None  # how expert weights lie on disk ("mxfp4"); dequantised at load
    raw: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)

    @property
    def num_moe_layers(self) -> int:
        return sum(self.moe_layers)

    @property
    def kv_entry(self) -> tuple[int, int, int]:
        """(KV heads, key dim, value dim) of one cached token in one layer. MLA caches one
        latent entry whose first kv_lora_rank values double as the value (no separate value)."""
        if self.mla is not None:
            return 1, self.mla.cache_dim, self.mla.kv_lora_rank
        return self.num_kv_heads, self.head_dim, self.head_dim

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
    "deepseek_v2": {"rms_norm_eps": 1e-6, "max_position_embeddings": 2048, "rope_theta": 1e4,
                    "n_shared_experts": 2, "routed_scaling_factor": 1.0, "topk_method": "greedy",
                    "first_k_dense_replace": 0, "kv_lora_rank": 512, "q_lora_rank": 1536,
                    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128},
    "deepseek_v3": {"rms_norm_eps": 1e-6, "max_position_embeddings": 4096, "rope_theta": 1e4,
                    "n_shared_experts": 1, "routed_scaling_factor": 2.5, "n_group": 8, "topk_group": 4,
                    "first_k_dense_replace": 3, "norm_topk_prob": True, "rope_interleave": True,
                    "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_nope_head_dim": 128,
                    "qk_rope_head_dim": 64, "v_head_dim": 128},
    "gpt_oss": {"rms_norm_eps": 1e-5, "max_position_embeddings": 131072, "rope_theta": 150000.0,
                "swiglu_alpha": 1.702, "swiglu_limit": 7.0, "attention_bias": True, "sliding_window": 128},
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
        value = next((self.raw[k] for k in ("num_experts", "num_local_experts", "n_routed_experts")
                      if self.raw.get(k) is not None), None)
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
    "DeepseekV2ForCausalLM": "deepseek_v2",
    "DeepseekV3ForCausalLM": "deepseek_v3",
    "GptOssForCausalLM": "gpt_oss",
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


def _common(r: _Reader, *, head_dim: int | None = None, rotary_dim: int | None = None,
            quantizations: tuple[str, ...] = ()) -> dict[str, Any]:
    """Fields every family reads the same way."""
    quant = r.raw.get("quantization_config")
    method = None
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else quant
        if method not in quantizations:
            allowed = f" ({r.family} supports {', '.join(quantizations)})" if quantizations else ""
            raise CheckpointError(f"quantized checkpoints are not supported (quantization_config: {method}){allowed}")
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
        rope=_rope(r, rotary_dim or head_dim),
        max_position_embeddings=int(r.get("max_position_embeddings")),
        tie_word_embeddings=bool(r.get("tie_word_embeddings", False)),
        intermediate_size=int(r.req("intermediate_size")),
        num_experts=num_experts,
        top_k=top_k,
        checkpoint_dtype=str(dtype).removeprefix("torch.") if dtype else None,
        bos_token_id=r.get("bos_token_id"),
        eos_token_ids=as_id_tuple(r.get("eos_token_id")),
        quantization=method,
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


def _yarn_mscale(scale: float, mscale: float) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _parse_deepseek(r: _Reader) -> ModelConfig:
    """DeepSeek-V2 and -V3 as transformers computes them: MLA attention, the first
    first_k_dense_replace layers dense, n_shared_experts * moe_intermediate_size of ungated
    shared expert, routing weights fp32 and scaled by routed_scaling_factor. V2 scores with a
    softmax and never renormalises (transformers reads no norm_topk_prob for V2); V3 scores with
    a sigmoid, picks groups on bias-corrected scores and renormalises iff norm_topk_prob. Layers
    past num_hidden_layers (V3's multi-token-prediction module) are ignored on load."""
    v3 = r.family == "deepseek_v3"
    rope_dim, nope_dim = int(r.get("qk_rope_head_dim")), int(r.get("qk_nope_head_dim"))
    q_lora = r.raw["q_lora_rank"] if "q_lora_rank" in r.raw else r.get("q_lora_rank")  # null: no q LoRA
    mla = MLAConfig(
        q_lora_rank=int(q_lora) if q_lora else None,
        kv_lora_rank=int(r.get("kv_lora_rank")),
        qk_nope_head_dim=nope_dim,
        qk_rope_head_dim=rope_dim,
        v_head_dim=int(r.get("v_head_dim")),
        rope_interleave=bool(r.get("rope_interleave", True)) if v3 else True,
        rope_fp32=not v3,
    )
    if rope_dim % 2:
        raise CheckpointError(f"qk_rope_head_dim={rope_dim} must be even")
    common = _common(r, head_dim=mla.qk_head_dim, rotary_dim=rope_dim)
    if common["num_kv_heads"] != common["num_heads"]:
        raise CheckpointError(f"{r.family}: num_key_value_heads={common['num_kv_heads']} must equal "
                              f"num_attention_heads={common['num_heads']} (MLA decompresses every head)")
    if r.get("mlp_bias", False):
        raise CheckpointError(f"{r.family}: mlp_bias=true is not supported")
    if int(r.get("moe_layer_freq", 1)) != 1:
        raise CheckpointError(f"{r.family}: moe_layer_freq={r.get('moe_layer_freq')} is not supported (only 1)")
    n, E = common["num_layers"], common["num_experts"]
    first_dense = int(r.get("first_k_dense_replace"))
    method = "noaux_tc" if v3 else r.get("topk_method")  # V3 always routes noaux_tc in transformers
    if method not in (("noaux_tc",) if v3 else ("greedy", "group_limited_greedy")):
        raise CheckpointError(f"{r.family}: unsupported topk_method {method!r}; "
                              "moeserve supports greedy and group_limited_greedy")
    grouped = method != "greedy"
    n_group, topk_group = (int(r.get("n_group") or 1), int(r.get("topk_group") or 1)) if grouped else (1, 1)
    if grouped:
        if E % n_group or not 1 <= topk_group <= n_group:
            raise CheckpointError(f"{r.family}: {E} experts cannot be split into n_group={n_group} equal groups "
                                  f"with topk_group={topk_group} of them kept")
        if v3 and E // n_group < 2:
            raise CheckpointError(f"{r.family}: each of the n_group={n_group} groups needs >= 2 experts "
                                  "(a group scores the sum of its best two)")
        if topk_group * (E // n_group) < common["top_k"]:
            raise CheckpointError(f"{r.family}: topk_group={topk_group} groups of {E // n_group} experts hold fewer "
                                  f"than num_experts_per_tok={common['top_k']}")
    rope = common["rope"]
    scale = mla.qk_head_dim**-0.5
    if rope.rope_type != "default" and rope.mscale_all_dim:
        mscale = _yarn_mscale(rope.factor, float(rope.mscale_all_dim))
        scale = scale * mscale * mscale  # in transformers' order: the same float
    n_shared = int(r.get("n_shared_experts") or 0)
    moe_intermediate = int(r.req("moe_intermediate_size"))
    return ModelConfig(
        **common,
        # attention_bias: q_a_proj, kv_a_proj_with_mqa and o_proj carry biases.
        qkv_bias=bool(r.get("attention_bias", False)),
        o_bias=bool(r.get("attention_bias", False)),
        qk_norm="none",
        clip_qkv=None,
        sliding_windows=(None,) * n,
        moe_layers=tuple(i >= first_dense and E > 0 for i in range(n)),
        moe_intermediate_size=moe_intermediate,
        renormalize=bool(r.get("norm_topk_prob", False)) if v3 else False,
        router_weights_fp32=True,
        shared_expert_intermediate_size=n_shared * moe_intermediate,
        mla=mla,
        attention_scale=scale,
        router=RouterConfig(
            scoring="sigmoid" if v3 else "softmax",
            group_select=("group_top2_sum" if v3 else "group_max") if grouped else "none",
            n_group=n_group,
            topk_group=topk_group,
            routed_scaling_factor=float(r.get("routed_scaling_factor")),
            correction_bias=v3,
            logits_fp32=True,
        ),
        shared_expert_gated=False,
    )


def _parse_gpt_oss(r: _Reader) -> ModelConfig:
    """GPT-OSS: attention sinks, biases on every attention projection, on the router and on the
    experts, sliding-window and full layers as `layer_types` says, routing weights = softmax of
    the top-K logits (model dtype), the clamped SwiGLU experts. Expert weights may lie on disk
    as MXFP4 (quantization_config.quant_method = mxfp4): dequantised at load."""
    common = _common(r, head_dim=r.get("head_dim"), quantizations=("mxfp4",))
    n = common["num_layers"]
    layer_types = r.get("layer_types") or [
        "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)
    ]
    if len(layer_types) != n or not set(layer_types) <= {"sliding_attention", "full_attention"}:
        raise CheckpointError(
            f"layer_types must list {n} entries of 'full_attention' or 'sliding_attention', got {layer_types}"
        )
    window = _sliding_window_required(r) if "sliding_attention" in layer_types else None
    bias = bool(r.get("attention_bias"))
    return ModelConfig(
        **common,
        qkv_bias=bias,
        o_bias=bias,
        qk_norm="none",
        clip_qkv=None,
        sliding_windows=tuple(window if t == "sliding_attention" else None for t in layer_types),
        moe_layers=(True,) * n,
        moe_intermediate_size=common["intermediate_size"],
        renormalize=True,
        router_weights_fp32=False,
        shared_expert_intermediate_size=0,
        attention_sinks=True,
        router=RouterConfig(scoring="topk_softmax", bias=True),
        expert_activation=ExpertActivation("clamped_swiglu", float(r.get("swiglu_alpha")),
                                           float(r.get("swiglu_limit"))),
        expert_bias=True,
        norm_scale_fp32=True,
    )


_FAMILIES: dict[str, Callable[[_Reader], ModelConfig]] = {
    "mixtral": _parse_mixtral,
    "qwen2_moe": _parse_qwen2_moe,
    "qwen3_moe": _parse_qwen3_moe,
    "olmoe": _parse_olmoe,
    "deepseek_v2": _parse_deepseek,
    "deepseek_v3": _parse_deepseek,
    "gpt_oss": _parse_gpt_oss,
}
