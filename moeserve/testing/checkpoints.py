"""Tiny random checkpoints in Hub layout, made with transformers' own model classes.

Shapes are chosen to catch shortcuts: GQA everywhere, head_dim != hidden/heads (Qwen3-MoE), top-3
routing (Mixtral), a dense layer among MoE layers and a shared expert (Qwen2-MoE), YaRN RoPE
(Qwen3-MoE), clip_qkv that actually clips (OLMoE), tied embeddings (Qwen2-MoE), a sharded
checkpoint with an index (Mixtral), sliding windows shorter than the test prompts (the *_swa
variants). Weights are drawn wider than transformers' default init, norms and biases are
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
    from transformers import MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig

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
    else:
        raise ValueError(f"unknown tiny arch {arch!r}")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


@torch.no_grad()
def _widen(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
        elif name.endswith(".bias"):
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))


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
    model = model.to(dtype)
    save_kwargs: dict[str, Any] = {}
    if max_shard_size is not None:
        save_kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(path, **save_kwargs)
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
