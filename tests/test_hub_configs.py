"""config.json as the Hub writes it (not as transformers 5 re-saves it), parsed by moeserve and by
transformers' own config and rotary classes: the derived values must be identical."""

from __future__ import annotations

import pytest
import torch

from moeserve import ModelConfig

# The public config.json files of the models named, trimmed to the keys that matter.
MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 4096,
    "intermediate_size": 14336, "max_position_embeddings": 32768, "num_attention_heads": 32,
    "num_experts_per_tok": 2, "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8,
    "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "vocab_size": 32000, "bos_token_id": 1, "eos_token_id": 2,
}
QWEN15_MOE = {
    "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "hidden_size": 2048,
    "intermediate_size": 5632, "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632,
    "num_experts": 60, "num_experts_per_tok": 4, "norm_topk_prob": False, "num_attention_heads": 16,
    "num_key_value_heads": 16, "num_hidden_layers": 24, "max_position_embeddings": 8192,
    "max_window_layers": 21, "use_sliding_window": False, "sliding_window": 32768, "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-06, "decoder_sparse_step": 1, "torch_dtype": "bfloat16", "vocab_size": 151936,
    "eos_token_id": 151643,
}
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048, "head_dim": 128,
    "intermediate_size": 6144, "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
    "norm_topk_prob": True, "num_attention_heads": 32, "num_key_value_heads": 4, "num_hidden_layers": 48,
    "max_position_embeddings": 40960, "rope_scaling": None, "rope_theta": 1000000.0, "rms_norm_eps": 1e-06,
    "sliding_window": None, "use_sliding_window": False, "max_window_layers": 48, "mlp_only_layers": [],
    "decoder_sparse_step": 1, "attention_bias": False, "torch_dtype": "bfloat16", "vocab_size": 151936,
}
OLMOE_1B_7B = {
    "architectures": ["OlmoeForCausalLM"], "model_type": "olmoe", "hidden_size": 2048, "intermediate_size": 1024,
    "num_experts": 64, "num_experts_per_tok": 8, "norm_topk_prob": False, "num_attention_heads": 16,
    "num_key_value_heads": 16, "num_hidden_layers": 16, "max_position_embeddings": 4096, "rope_theta": 10000.0,
    "rms_norm_eps": 1e-05, "clip_qkv": None, "torch_dtype": "bfloat16", "vocab_size": 50304,
    "eos_token_id": 50279,
}


def _variant(base, drop=(), **changes):
    d = {k: v for k, v in base.items() if k not in drop}
    d.update(changes)
    return d


CASES = {
    "mixtral-8x7b": MIXTRAL_8X7B,
    "qwen1.5-moe": QWEN15_MOE,
    "qwen3-30b-a3b": QWEN3_30B_A3B,
    "olmoe-1b-7b": OLMOE_1B_7B,
    "mixtral-bare": _variant(MIXTRAL_8X7B, drop=("rope_theta", "rms_norm_eps", "max_position_embeddings")),
    "mixtral-window": _variant(MIXTRAL_8X7B, sliding_window=4096),
    "olmoe-bare": _variant(OLMOE_1B_7B, drop=("rms_norm_eps", "rope_theta")),
    "qwen1.5-window-32-layers": _variant(QWEN15_MOE, drop=("max_window_layers",), use_sliding_window=True,
                                         num_hidden_layers=32, sliding_window=4096),
    "qwen1.5-no-shared-size": _variant(QWEN15_MOE, drop=("shared_expert_intermediate_size",)),
    "qwen3-yarn-legacy": _variant(QWEN3_30B_A3B, rope_scaling={"type": "yarn", "factor": 4.0,
                                                              "original_max_position_embeddings": 32768}),
    "qwen3-yarn-top-level-orig": _variant(QWEN3_30B_A3B, original_max_position_embeddings=16384,
                                          rope_scaling={"rope_type": "yarn", "factor": 2.0,
                                                        "original_max_position_embeddings": 32768}),
    "qwen3-yarn-mscale": _variant(QWEN3_30B_A3B, rope_scaling={"rope_type": "yarn", "factor": 8.0, "mscale": 0.707,
                                                              "mscale_all_dim": 0.707, "beta_fast": 16}),
    "qwen3-both-rope-keys": _variant(QWEN3_30B_A3B, rope_parameters={"rope_type": "default", "rope_theta": 5e5},
                                     rope_scaling={"rope_type": "yarn", "factor": 2.0}),
    "qwen3-window": _variant(QWEN3_30B_A3B, use_sliding_window=True, sliding_window=2048),
}


def _hf(raw):
    from transformers import CONFIG_MAPPING

    return CONFIG_MAPPING[raw["model_type"]](**{k: v for k, v in raw.items() if k != "model_type"})


def _hf_rotary(hf_config):
    from transformers.models.mixtral.modeling_mixtral import MixtralRotaryEmbedding
    from transformers.models.olmoe.modeling_olmoe import OlmoeRotaryEmbedding
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeRotaryEmbedding
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRotaryEmbedding

    cls = {"mixtral": MixtralRotaryEmbedding, "qwen2_moe": Qwen2MoeRotaryEmbedding,
           "qwen3_moe": Qwen3MoeRotaryEmbedding, "olmoe": OlmoeRotaryEmbedding}[hf_config.model_type]
    rotary = cls(hf_config)
    return rotary.inv_freq, rotary.attention_scaling


def _hf_windows(hf) -> tuple:
    n = hf.num_hidden_layers
    if hf.model_type == "qwen2_moe":
        return tuple(hf.sliding_window if t == "sliding_attention" else None for t in hf.layer_types)
    if hf.model_type == "olmoe":
        return (None,) * n
    return (hf.sliding_window,) * n


@pytest.mark.parametrize("name", list(CASES))
def test_hub_config_parses_as_transformers_reads_it(name):
    raw = CASES[name]
    ours, hf = ModelConfig.from_hf_dict(raw), _hf(raw)
    hf_head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    assert ours.head_dim == hf_head_dim
    assert ours.rms_norm_eps == hf.rms_norm_eps
    assert ours.max_position_embeddings == hf.max_position_embeddings
    assert ours.sliding_windows == _hf_windows(hf)
    assert ours.num_experts == getattr(hf, "num_local_experts", getattr(hf, "num_experts", None))
    assert ours.top_k == hf.num_experts_per_tok
    assert ours.tie_word_embeddings == hf.tie_word_embeddings
    if hf.model_type == "qwen2_moe":
        assert ours.shared_expert_intermediate_size == hf.shared_expert_intermediate_size
        assert ours.qkv_bias == hf.qkv_bias
    if hf.model_type != "mixtral":
        assert ours.renormalize == hf.norm_topk_prob
    inv_freq, scale = ours.rope.inv_freq_and_scale()
    hf_inv_freq, hf_scale = _hf_rotary(hf)
    assert torch.equal(inv_freq, hf_inv_freq.cpu()) and scale == pytest.approx(hf_scale, rel=1e-12)
    assert ours.checkpoint_dtype == "bfloat16"


def test_qwen_window_layers_default_to_28():
    ours = ModelConfig.from_hf_dict(CASES["qwen1.5-window-32-layers"])
    assert ours.sliding_windows[26] == 4096 and ours.sliding_windows[28] is None and ours.sliding_windows[30] is None


# DeepSeek-V2-Lite, DeepSeek-V3 (its bf16 conversion: the official upload is FP8) and gpt-oss-20b.
DEEPSEEK_V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"], "attention_bias": False, "aux_loss_alpha": 0.001,
    "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1, "hidden_act": "silu",
    "hidden_size": 2048, "intermediate_size": 10944, "kv_lora_rank": 512, "max_position_embeddings": 163840,
    "model_type": "deepseek_v2", "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1,
    "n_routed_experts": 64, "n_shared_experts": 2, "norm_topk_prob": False, "num_attention_heads": 16,
    "num_experts_per_tok": 6, "num_hidden_layers": 27, "num_key_value_heads": 16, "q_lora_rank": None,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16",
    "v_head_dim": 128, "vocab_size": 102400,
}
DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "bos_token_id": 0, "eos_token_id": 1,
    "first_k_dense_replace": 3, "hidden_act": "silu", "hidden_size": 7168, "intermediate_size": 18432,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256,
    "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "q_lora_rank": 1536,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "tie_word_embeddings": False,
    "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16", "v_head_dim": 128, "vocab_size": 129280,
}
GPT_OSS_20B = {
    "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0, "eos_token_id": 200002,
    "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880, "initial_context_length": 4096,
    "intermediate_size": 2880, "layer_types": ["sliding_attention", "full_attention"] * 12,
    "max_position_embeddings": 131072, "model_type": "gpt_oss", "num_attention_heads": 64,
    "num_experts_per_tok": 4, "num_hidden_layers": 24, "num_key_value_heads": 8, "num_local_experts": 32,
    "pad_token_id": 199999,
    "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                       "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"},
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                     "rope_type": "yarn", "truncate": False},
    "rope_theta": 150000, "sliding_window": 128, "swiglu_limit": 7.0, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "vocab_size": 201088,
}
NEW_CASES = {"deepseek-v2-lite": DEEPSEEK_V2_LITE, "deepseek-v3": DEEPSEEK_V3, "gpt-oss-20b": GPT_OSS_20B}


@pytest.mark.parametrize("name", list(NEW_CASES))
def test_new_family_hub_config_parses_as_transformers_reads_it(name):
    raw = NEW_CASES[name]
    ours = ModelConfig.from_hf_dict(raw)
    hf = _hf({k: v for k, v in raw.items() if k != "quantization_config"})
    assert ours.num_experts == (hf.n_routed_experts if name.startswith("deepseek") else hf.num_local_experts)
    assert ours.top_k == hf.num_experts_per_tok
    assert ours.rms_norm_eps == hf.rms_norm_eps and ours.max_position_embeddings == hf.max_position_embeddings
    if name.startswith("deepseek"):
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import yarn_apply_mscale

        mod = __import__(f"transformers.models.{hf.model_type}.modeling_{hf.model_type}", fromlist=["x"])
        rotary = getattr(mod, "DeepseekV3RotaryEmbedding" if "v3" in name else "DeepseekV2RotaryEmbedding")(hf)
        m = ours.mla
        assert (m.q_lora_rank, m.kv_lora_rank, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim) == (
            hf.q_lora_rank, hf.kv_lora_rank, hf.qk_nope_head_dim, hf.qk_rope_head_dim, hf.v_head_dim)
        assert ours.attention_scale == yarn_apply_mscale(hf.rope_parameters, hf.qk_head_dim**-0.5)
        assert ours.moe_layers == tuple(i >= hf.first_k_dense_replace for i in range(hf.num_hidden_layers))
        assert ours.shared_expert_intermediate_size == hf.n_shared_experts * hf.moe_intermediate_size
        assert ours.router.routed_scaling_factor == hf.routed_scaling_factor
        assert (ours.router.n_group, ours.router.topk_group) == ((hf.n_group, hf.topk_group) if "v3" in name
                                                                 else (1, 1))
        assert ours.router.scoring == ("sigmoid" if "v3" in name else "softmax")
        assert ours.kv_entry == (1, 512 + 64, 512)
    else:
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding

        rotary = GptOssRotaryEmbedding(hf)
        assert ours.sliding_windows == tuple(128 if t == "sliding_attention" else None for t in hf.layer_types)
        assert ours.quantization == "mxfp4" and ours.expert_bias and ours.attention_sinks
        assert ours.expert_activation.limit == hf.swiglu_limit and ours.expert_activation.alpha == hf.swiglu_alpha
    inv_freq, scale = ours.rope.inv_freq_and_scale()
    assert torch.equal(inv_freq, rotary.inv_freq.cpu()) and scale == pytest.approx(rotary.attention_scaling, rel=1e-12)


def test_fp8_deepseek_v3_upload_is_refused_by_name():
    fp8 = {**DEEPSEEK_V3, "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
                                                  "quant_method": "fp8", "weight_block_size": [128, 128]}}
    with pytest.raises(Exception, match="quantization_config: fp8"):
        ModelConfig.from_hf_dict(fp8)
