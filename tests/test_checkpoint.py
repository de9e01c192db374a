"""Checkpoint loading: layouts, dtypes, config variants, and clear errors for bad checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moeserve import CheckpointError, GenerationDefaults, ModelConfig, load_model
from moeserve.testing.checkpoints import make_tiny_checkpoint
from moeserve.testing.runner import ReferenceRunner


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (path / "config.json").write_text(json.dumps(cfg))


def _rewrite_weights(path: Path, edit) -> None:
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture
def qwen2(checkpoints, tmp_path):
    return _copy(checkpoints("qwen2_moe"), tmp_path / "qwen2")


def test_unknown_architecture(qwen2):
    _edit_config(qwen2, architectures=["JambaForCausalLM"], model_type="jamba")
    with pytest.raises(CheckpointError, match="unsupported architecture.*JambaForCausalLM"):
        load_model(qwen2)


def test_missing_tensor(qwen2):
    _rewrite_weights(qwen2, lambda t: t.pop("model.layers.2.mlp.experts.5.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor.*model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight"):
        load_model(qwen2)


def test_missing_dense_tensor(qwen2):
    _rewrite_weights(qwen2, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))  # layer 1 is dense
    with pytest.raises(CheckpointError, match=r"missing tensor.*model\.layers\.1\.mlp\.down_proj\.weight"):
        load_model(qwen2)


def test_wrong_shape(qwen2):
    def edit(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:-1]

    _rewrite_weights(qwen2, edit)
    with pytest.raises(CheckpointError, match=r"k_proj\.weight has shape \[31, 64\], expected \[32, 64\]"):
        load_model(qwen2)


def test_unexpected_tensor(qwen2):
    def edit(t):
        t["model.layers.0.mlp.experts.8.up_proj.weight"] = t["model.layers.0.mlp.experts.7.up_proj.weight"].clone()

    _rewrite_weights(qwen2, edit)
    with pytest.raises(CheckpointError, match=r"unexpected tensor model\.layers\.0\.mlp\.experts\.8"):
        load_model(qwen2)


def test_unsupported_rope_type(qwen2):
    _edit_config(qwen2, rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0})
    with pytest.raises(CheckpointError, match="unsupported rope_type 'longrope'"):
        load_model(qwen2)


def test_sliding_window_switched_on_without_a_size(qwen2):
    _edit_config(qwen2, use_sliding_window=True, sliding_window=0)
    with pytest.raises(CheckpointError, match="use_sliding_window is true but sliding_window=0"):
        load_model(qwen2)


def test_qwen2_sliding_window_zero_when_off_means_no_window(qwen2):
    # Qwen2-MoE writes sliding_window: 0 when the window is off; a window of 0 would mask everything.
    _edit_config(qwen2, use_sliding_window=False, sliding_window=0)
    assert ModelConfig.from_pretrained(qwen2).sliding_windows == (None,) * 4


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path)


def test_index_naming_a_missing_shard(checkpoints, tmp_path):
    path = _copy(checkpoints("mixtral"), tmp_path / "mixtral")
    next(path.glob("model-00002-of-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-.*missing"):
        load_model(path)


def test_no_weights(qwen2):
    (qwen2 / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors"):
        load_model(qwen2)


def test_unsupported_activation(qwen2):
    _edit_config(qwen2, hidden_act="gelu")
    with pytest.raises(CheckpointError, match="unsupported hidden_act 'gelu'"):
        load_model(qwen2)


def test_hub_style_rope_keys_give_the_same_model(checkpoints, tmp_path, prompts):
    """Hub configs carry top-level rope_theta and rope_scaling {type: yarn, ...}."""
    path = _copy(checkpoints("qwen3_moe"), tmp_path / "qwen3")
    params = json.loads((path / "config.json").read_text())["rope_parameters"]
    _edit_config(
        path,
        rope_parameters=None,
        rope_theta=params["rope_theta"],
        rope_scaling={"type": "yarn", "factor": params["factor"],
                      "original_max_position_embeddings": params["original_max_position_embeddings"]},
    )
    cfg = ModelConfig.from_pretrained(path)
    assert cfg.rope.rope_type == "yarn" and cfg.rope.factor == 4.0
    a = ReferenceRunner(load_model(checkpoints("qwen3_moe"))).step({0: prompts[7]})[0]
    b = ReferenceRunner(load_model(path)).step({0: prompts[7]})[0]
    assert torch.equal(a, b)


def test_yarn_matches_transformers_frequencies(checkpoints):
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    path = checkpoints("qwen3_moe")
    inv_freq, scale = ModelConfig.from_pretrained(path).rope.inv_freq_and_scale()
    hf_inv_freq, hf_scale = ROPE_INIT_FUNCTIONS["yarn"](AutoConfig.from_pretrained(path), "cpu")
    assert torch.equal(inv_freq, hf_inv_freq) and scale == hf_scale and scale > 1.0


def test_dtype_auto_follows_the_checkpoint(tmp_path):
    path = make_tiny_checkpoint("olmoe", tmp_path / "olmoe-bf16", dtype=torch.bfloat16)
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    model = load_model(path)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert load_model(path, dtype="float32").lm_head.weight.dtype == torch.float32
    with pytest.raises(CheckpointError, match="unsupported dtype 'int8'"):
        load_model(path, dtype="int8")


def test_tied_embeddings_share_one_tensor(checkpoints):
    model = load_model(checkpoints("qwen2_moe"))
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_config_fields_per_family(checkpoints):
    mixtral = ModelConfig.from_pretrained(checkpoints("mixtral"))
    assert (mixtral.top_k, mixtral.renormalize, mixtral.router_weights_fp32) == (3, True, True)
    qwen2 = ModelConfig.from_pretrained(checkpoints("qwen2_moe"))
    assert qwen2.moe_layers == (True, False, True, True) and qwen2.moe_layer_ids == (0, 2, 3)
    assert (qwen2.qkv_bias, qwen2.o_bias, qwen2.shared_expert_intermediate_size) == (True, False, 80)
    qwen3 = ModelConfig.from_pretrained(checkpoints("qwen3_moe"))
    assert (qwen3.head_dim, qwen3.qk_norm, qwen3.o_bias) == (24, "head", True)
    olmoe = ModelConfig.from_pretrained(checkpoints("olmoe"))
    assert (olmoe.qk_norm, olmoe.clip_qkv, olmoe.renormalize) == ("full", 1.5, False)
    swa = ModelConfig.from_pretrained(checkpoints("qwen2_moe_swa"))
    assert swa.sliding_windows == (10, None, 10, None)  # even layers below max_window_layers


def test_generation_defaults_list_every_eos(checkpoints):
    path = checkpoints("qwen2_moe")
    defaults = GenerationDefaults.from_pretrained(path, ModelConfig.from_pretrained(path))
    assert defaults.eos_token_ids == (2, 0)
    assert defaults.temperature is None and defaults.top_p is None


def test_generation_defaults_sampling_values(qwen2):
    (qwen2 / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [7, 8, 9], "do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20})
    )
    defaults = GenerationDefaults.from_pretrained(qwen2, ModelConfig.from_pretrained(qwen2))
    assert (defaults.eos_token_ids, defaults.temperature, defaults.top_p, defaults.top_k) == ((7, 8, 9), 0.7, 0.8, 20)
    (qwen2 / "generation_config.json").unlink()  # falls back to config.json's eos_token_id
    assert GenerationDefaults.from_pretrained(qwen2, ModelConfig.from_pretrained(qwen2)).eos_token_ids == (2, 0)


def test_quantized_checkpoint_is_refused_by_name(qwen2):
    _edit_config(qwen2, quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]})
    with pytest.raises(CheckpointError, match=r"quantized checkpoints are not supported \(quantization_config: fp8\)"):
        load_model(qwen2)


def test_integer_tensor_is_refused(qwen2):
    def edit(t):
        name = "model.layers.0.self_attn.o_proj.weight"
        t[name] = t[name].to(torch.int8)

    _rewrite_weights(qwen2, edit)
    with pytest.raises(CheckpointError, match=r"o_proj\.weight has dtype torch\.int8"):
        load_model(qwen2)


def test_corrupt_files_are_checkpoint_errors(checkpoints, tmp_path, qwen2):
    sharded = _copy(checkpoints("mixtral"), tmp_path / "mixtral")
    (sharded / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid index"):
        load_model(sharded)
    weights = qwen2 / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(qwen2)
    (qwen2 / "generation_config.json").write_text("{")
    with pytest.raises(CheckpointError, match="generation_config.json: not valid JSON"):
        GenerationDefaults.from_pretrained(qwen2, ModelConfig.from_pretrained(qwen2))


@pytest.mark.parametrize("hub", ["model.layers.0.block_sparse_moe.experts.0.w1.weight",
                                 "model.layers.1.block_sparse_moe.gate.weight"])
def test_mixtral_tensor_under_both_names_is_refused(hub, checkpoints, tmp_path):
    """Mixtral's block_sparse_moe.* and mlp.* name the same tensor: both present is an error,
    not a silent overwrite."""
    path = _copy(checkpoints("mixtral"), tmp_path / "mixtral")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shard = path / index["weight_map"][hub]
    tensors = load_file(shard)
    tensors[hub.replace(".block_sparse_moe.", ".mlp.")] = tensors[hub].clone()
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="appears twice"):
        load_model(path)


def test_layer_types_of_the_wrong_length(qwen2):
    _edit_config(qwen2, use_sliding_window=True, sliding_window=8, layer_types=["full_attention"] * 3)
    with pytest.raises(CheckpointError, match="layer_types must list 4 entries"):
        load_model(qwen2)


def test_a_bf16_checkpoint_loads_without_an_fp32_copy():
    """Parameters are allocated in the target dtype (no fp32 stage that doubles the device
    memory a load needs), and buffers that must be fp32 or integer keep their dtypes."""
    from moeserve.cli import _default_model
    from moeserve.testing.memory import peak_cpu_allocation

    model, peak = peak_cpu_allocation(lambda: load_model(_default_model()[0]))
    params = {id(p): p for p in model.parameters()}.values()
    weights = sum(p.numel() * p.element_size() for p in params)
    assert {p.dtype for p in params} == {torch.bfloat16}
    assert peak <= 1.1 * weights, f"loading peaked at {peak / weights:.2f}x the bf16 weights"
    assert model.load.entropy.dtype == torch.float32
    assert model.top_k.dtype == torch.int64 and model.moe_layers[0].placement.log2phy.dtype == torch.int64
    assert model.lm_head.weight is model.model.embed_tokens.weight
