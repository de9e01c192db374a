"""Tiny random checkpoints in Hub layout, made with transformers' own model classes.

Shapes are chosen to catch shortcuts: GQA everywhere, head_dim != hidden/heads (Qwen3-MoE), top-3
routing (Mixtral), a dense layer among MoE layers and a shared expert (Qwen2-MoE), YaRN RoPE
(Qwen3-MoE), clip_qkv that actually clips (OLMoE), tied embeddings (Qwen2-MoE), a sharded
checkpoint with an index (Mixtral), sliding windows shorter than the test prompts (the *_swa
variants and GPT-OSS's sliding layers); for DeepSeek, rope dim != nope dim != value dim, 12
experts in 4 groups of 3, a dense first layer, YaRN with mscale_all_dim (V3), no q LoRA (V2)
and an MTP layer past num_hidden_layers in the files (V3); for GPT-OSS a swiglu_limit low enough
to clamp, random sinks and expert biases. Weights are drawn wider than transformers' default init, norms and biases are
randomised (a zero bias or unit norm would hide a missing one), so logits and router scores are
far from ties. A byte-level BPE tokenizer trained with `tokenizers` on generated text, a ChatML
chat template and a generation_config.json go beside the weights.

transformers is a dev dependency: import this module only from tests and tools.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
VOCAB_SIZE = 512
INIT_STD = 0.08

TINY_ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
# Beyond the llama-style block: MLA and grouped routing (DeepSeek), sinks and biased clamped
# experts (GPT-OSS).
NEW_ARCHS = ("deepseek_v2", "deepseek_v3", "gpt_oss")
SWA_ARCHS = ("mixtral_swa", "qwen2_moe_swa")

_WORDS = (
    "the expert router sends each token to a few experts and the batch runs as grouped matrix products "
    "def return import class self yield lambda async await None True False print range len dict list "
    "caché naïve façade smörgåsbord Ærø über straße 東京 日本語 中文 한국어 emoji 🙂 🚀 ∑ ∫ √ π ≈ ≠ → "
    "mixture of experts serving latency throughput cache block prefill decode scheduler kernel"
).split()


def corpus_lines(n: int = 1500, seed: int = 0) -> list[str]:
    """Deterministic generated text: words, code-like lines, digits and multi-byte characters."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        if i % 3 == 0:
            lines.append(f"def f_{i}(x, y={rng.randint(0, 99)}):\n    return {' + '.join(words[:3])}")
        else:
            lines.append(" ".join(words) + rng.choice([".", "!", "?", ",", ";"]))
    return lines


def train_tokenizer(vocab_size: int = VOCAB_SIZE, seed: int = 0):
    """A byte-level BPE `tokenizers.Tokenizer` with SPECIAL_TOKENS at ids 0, 1, 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_lines(seed=seed), trainer)
    return tok


def tiny_hf_config(arch: str, **overrides: Any):
    """transformers config of a tiny model of `arch` (one of TINY_ARCHS or SWA_ARCHS)."""
    from transformers import (DeepseekV2Config, DeepseekV3Config, GptOssConfig, MixtralConfig, OlmoeConfig,
                              Qwen2MoeConfig, Qwen3MoeConfig)

    eos = 2  # <|im_end|>
    common: dict[str, Any] = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        initializer_range=INIT_STD,
        bos_token_id=None,
        eos_token_id=eos,
        pad_token_id=0,
    )
    default_rope = {"rope_type": "default", "rope_theta": 10000.0}
    if arch in ("mixtral", "mixtral_swa"):
        cfg = MixtralConfig(
            **common,
            intermediate_size=96,
            num_local_experts=8,
            num_experts_per_tok=3,
            rope_parameters=default_rope,
            sliding_window=10 if arch == "mixtral_swa" else None,
        )
    elif arch in ("qwen2_moe", "qwen2_moe_swa"):
        cfg = Qwen2MoeConfig(
            **{**common, "num_hidden_layers": 4, "eos_token_id": [eos, 0]},
            intermediate_size=128,
            moe_intermediate_size=48,
            shared_expert_intermediate_size=80,
            num_experts=8,
            num_experts_per_tok=2,
            mlp_only_layers=[1],
            qkv_bias=True,
            norm_topk_prob=False,
            tie_word_embeddings=True,
            rope_parameters=default_rope,
            use_sliding_window=arch == "qwen2_moe_swa",
            sliding_window=10,
            max_window_layers=3,
        )
    elif arch == "qwen3_moe":
        cfg = Qwen3MoeConfig(
            **{**common, "eos_token_id": [eos, 0]},
            head_dim=24,
            intermediate_size=128,
            moe_intermediate_size=40,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            attention_bias=True,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        )
    elif arch == "olmoe":
        cfg = OlmoeConfig(
            **common,
            intermediate_size=48,
            num_experts=8,
            num_experts_per_tok=2,
            clip_qkv=1.5,
            norm_topk_prob=False,
            rope_parameters=default_rope,
        )
    elif arch in ("deepseek_v2", "deepseek_v3"):
        v3 = arch == "deepseek_v3"
        mla = dict(
            **{**common, "num_key_value_heads": 4},
            intermediate_size=96,
            moe_intermediate_size=24,
            n_routed_experts=12,
            n_shared_experts=1 if v3 else 2,
            num_experts_per_tok=3 if v3 else 2,
            n_group=4,
            topk_group=2 if v3 else 1,  # V2 groups score their best expert: one group kept makes K=2 bite
            first_k_dense_replace=1,
            kv_lora_rank=20,
            q_lora_rank=24 if v3 else None,
            qk_rope_head_dim=8,
            qk_nope_head_dim=12,
            v_head_dim=10,
            routed_scaling_factor=2.5 if v3 else 1.5,
        )
        if v3:
            cfg = DeepseekV3Config(
                **mla,
                norm_topk_prob=True,
                rope_interleave=True,
                rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                 "original_max_position_embeddings": 64, "beta_fast": 32.0, "beta_slow": 1.0,
                                 "mscale": 1.0, "mscale_all_dim": 1.0},
            )
        else:
            cfg = DeepseekV2Config(**mla, topk_method="group_limited_greedy", rope_parameters=default_rope)
    elif arch == "gpt_oss":
        cfg = GptOssConfig(
            **{**common, "num_hidden_layers": 4},
            head_dim=16,
            intermediate_size=32,  # MXFP4 blocks of 32 run along both expert input dims
            num_local_experts=8,
            num_experts_per_tok=3,
            sliding_window=6,
            layer_types=["sliding_attention", "full_attention"] * 2,
            swiglu_limit=0.6,
            rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0,
                             "original_max_position_embeddings": 64, "beta_fast": 32.0, "beta_slow": 1.0,
                             "truncate": False},
        )
    else:
        raise ValueError(f"unknown tiny arch {arch!r}")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


@torch.no_grad()
def _widen(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed + 1)
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if name.endswith("norm.weight"):
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
        elif name.endswith((".bias", "_proj_bias")):
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))
        elif name.endswith("e_score_correction_bias"):
            p.copy_(0.05 * torch.randn(p.shape, generator=gen))
        elif name.endswith(".sinks"):
            p.copy_(torch.randn(p.shape, generator=gen))


MTP_TENSORS = ("eh_proj.weight", "enorm.weight", "hnorm.weight")


def _add_mtp_layer(path: Path, num_layers: int, hidden: int) -> None:
    """DeepSeek-V3 checkpoints carry a multi-token-prediction layer at index num_hidden_layers."""
    from safetensors.torch import load_file, save_file

    file = path / "model.safetensors"
    tensors = load_file(file)
    for name in MTP_TENSORS:
        shape = (hidden, 2 * hidden) if name.startswith("eh_proj") else (hidden,)
        tensors[f"model.layers.{num_layers}.{name}"] = torch.randn(shape)
    save_file(tensors, file, metadata={"format": "pt"})


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [..., rows, cols] (cols a multiple of 32) -> (blocks [..., rows, cols / 32, 16] uint8,
    scales [..., rows, cols / 32] uint8) by the OCP MX definition: a block's scale is
    2 ** (floor(log2(max |x|)) - 2) (2 = E2M1's largest exponent), each element the nearest FP4
    E2M1 value of x / scale, saturated at +-6; codes packed two per byte, even column low."""
    from moeserve.mxfp4 import BLOCK, SCALE_BIAS

    *lead, rows, cols = w.shape
    x = w.float().reshape(*lead, rows, cols // BLOCK, BLOCK)
    amax = x.abs().amax(dim=-1)  # [..., rows, G]
    exp = torch.where(amax > 0, torch.floor(torch.log2(amax)) - 2, torch.full_like(amax, -SCALE_BIAS))
    exp = exp.clamp(-SCALE_BIAS, SCALE_BIAS)
    scaled = x / torch.exp2(exp)[..., None]
    magnitudes = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    index = (scaled.abs().clamp(max=6.0)[..., None] - magnitudes).abs().argmin(dim=-1)  # [..., G, 32]
    codes = (index | (scaled < 0).long() << 3).to(torch.uint8)
    pairs = codes.reshape(*codes.shape[:-1], BLOCK // 2, 2)
    blocks = pairs[..., 0] | (pairs[..., 1] << 4)
    return blocks, (exp + SCALE_BIAS).to(torch.uint8)


@torch.no_grad()
def _round_experts_to_mxfp4(model: torch.nn.Module) -> None:
    """Make every GPT-OSS expert weight exactly MXFP4-representable (so a dense and an MXFP4
    copy of the checkpoint hold the same model)."""
    from moeserve.mxfp4 import dequantize_mxfp4

    for name, p in model.named_parameters():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            rows = p.transpose(1, 2)  # [E, out, in]: MXFP4 blocks run along the input dim
            p.copy_(dequantize_mxfp4(*quantize_mxfp4(rows)).transpose(1, 2))


def write_mxfp4_copy(dense: Path, path: Path) -> Path:
    """The GPT-OSS checkpoint at `dense` with its expert weights as MXFP4 blocks and scales,
    and quantization_config.quant_method = mxfp4, written to `path`."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(dense, path, dirs_exist_ok=True)
    tensors = load_file(path / "model.safetensors")
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        blocks, scales = quantize_mxfp4(tensors.pop(name).transpose(1, 2))
        tensors[name + "_blocks"], tensors[name + "_scales"] = blocks.contiguous(), scales.contiguous()
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn",
                                                                                       "model.layers.*.mlp.router",
                                                                                       "model.embed_tokens", "lm_head"]}
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path


def make_tiny_checkpoint(
    arch: str,
    path: str | Path,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
    template_in_config: bool = False,
    **config_overrides: Any,
) -> Path:
    """Write a random `arch` checkpoint with tokenizer and chat template to `path`."""
    from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = tiny_hf_config(arch, **config_overrides)
    model = AutoModelForCausalLM.from_config(config)
    _widen(model, seed)
    if arch == "gpt_oss":
        _round_experts_to_mxfp4(model)
    model = model.to(dtype)
    save_kwargs: dict[str, Any] = {}
    if max_shard_size is not None:
        save_kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(path, **save_kwargs)
    if arch == "deepseek_v3" and max_shard_size is None:
        _add_mtp_layer(path, config.num_hidden_layers, config.hidden_size)
    if config.eos_token_id is None:
        config.eos_token_id = 2
    eos_ids = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    GenerationConfig(eos_token_id=eos_ids, pad_token_id=0, do_sample=False).save_pretrained(path)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(seed=seed),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(path)
    if template_in_config:
        _move_template_into_config(path)
    return path


def _move_template_into_config(path: Path) -> None:
    """Older Hub layout: the chat template inside tokenizer_config.json, no chat_template.jinja."""
    import json

    cfg_file = path / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    jinja = path / "chat_template.jinja"
    cfg["chat_template"] = jinja.read_text() if jinja.is_file() else CHATML_TEMPLATE
    jinja.unlink(missing_ok=True)
    cfg_file.write_text(json.dumps(cfg, indent=2))
