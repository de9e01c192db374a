"""DeepSeek-V2/V3 and GPT-OSS beyond the logits comparison of test_model_vs_transformers: the
latent cache and its two attention paths, the routers against transformers' own router modules,
MXFP4, runtime K, load counts and placement, and guards showing that each family feature under
test actually changes the result on the tiny checkpoints."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from moeserve import load_model
from moeserve.errors import CheckpointError
from moeserve.model.attention import PagedKVCache
from moeserve.model.moe.router import select_experts_torch
from moeserve.model_config import ModelConfig
from moeserve.mxfp4 import dequantize_mxfp4
from moeserve.testing.checkpoints import MTP_TENSORS, NEW_ARCHS, quantize_mxfp4, write_mxfp4_copy
from moeserve.testing.oracle import hf_logits, load_hf_model
from moeserve.testing.runner import ReferenceRunner
from moeserve.worker.kv_sizing import kv_block_bytes

LOGIT_ATOL = 1e-4
# The two MLA paths reassociate fp32 products (W_UK folded into q instead of into k): rounding only.
PATHS_ATOL = 1e-5


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def _set_mla_mode(model, mode: str) -> None:
    for layer in model.model.layers:
        layer.self_attn.mode = mode


# --- MLA -------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["deepseek_v2", "deepseek_v3"])
def test_latent_cache_holds_one_entry_of_rank_plus_rope_dim(arch, checkpoints):
    model = load_model(checkpoints(arch))
    m = model.config.mla
    cache = PagedKVCache.for_model(model.config, num_blocks=10, block_size=4, dtype=torch.float32)
    assert cache.key[0].shape == (10, 4, 1, m.kv_lora_rank + m.qk_rope_head_dim)
    # The value is the latent: a view into the same storage, no second tensor.
    assert cache.value[0].shape == (10, 4, 1, m.kv_lora_rank)
    assert cache.value[0].data_ptr() == cache.key[0].data_ptr()
    per_token = model.config.num_layers * (m.kv_lora_rank + m.qk_rope_head_dim) * 4
    assert cache.nbytes == 10 * 4 * per_token
    assert kv_block_bytes(model.config, 4, torch.float32) == 4 * per_token
    # What decompressed K/V would cost: H * (Dn + Dr + Dv) per token per layer.
    assert per_token < model.config.num_layers * model.config.num_heads * (m.qk_head_dim + m.v_head_dim) * 4


@pytest.mark.parametrize("arch", ["deepseek_v2", "deepseek_v3"])
def test_absorbed_attention_equals_decompressed_attention(arch, checkpoints, prompts):
    """The same prefill and decode steps through each path alone, and through 'auto' (absorbed
    decodes, decompressed prefills in one batch)."""
    path = checkpoints(arch)
    runs = {}
    for mode in ("decompressed", "absorbed", "auto"):
        model = load_model(path)
        _set_mla_mode(model, mode)
        runner = ReferenceRunner(model)
        out = [runner.step({i: p for i, p in enumerate(prompts)})]
        for _ in range(4):  # decode steps, plus a prefill joining in the last two
            step = {s: [int(torch.argmax(logits[-1]))] for s, logits in out[-1].items() if s < len(prompts)}
            if len(out) >= 3:
                step[len(prompts)] = prompts[7] if len(out) == 3 else [5]
            out.append(runner.step(step))
        runs[mode] = out
    for mode in ("absorbed", "auto"):
        for step, (a, b) in enumerate(zip(runs[mode], runs["decompressed"])):
            for s in a:
                assert _max_abs(a[s], b[s]) < PATHS_ATOL, f"{mode} step {step} sequence {s}"
    # The paths are really different computations: the absorbed one never calls kv_b_proj.
    model = load_model(path)
    _set_mla_mode(model, "absorbed")
    calls = []
    model.model.layers[0].self_attn.kv_b_proj.register_forward_hook(lambda *a: calls.append(1))
    ReferenceRunner(model).step({0: prompts[3]})
    assert calls == []


# --- routers -----------------------------------------------------------------------------------


def _hf_router(arch: str, top_k: int | None = None, **overrides):
    from moeserve.testing.checkpoints import tiny_hf_config

    cfg = tiny_hf_config(arch, **overrides)
    if top_k is not None:
        cfg.num_experts_per_tok = top_k
    if arch == "deepseek_v3":
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter as R
    elif arch == "deepseek_v2":
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter as R
    else:
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter as R
    router = R(cfg)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=gen))
        if hasattr(router, "e_score_correction_bias"):
            router.e_score_correction_bias.copy_(0.3 * torch.randn(router.weight.shape[0], generator=gen))
        if getattr(router, "bias", None) is not None:
            router.bias.copy_(torch.randn(router.weight.shape[0], generator=gen))
    return cfg, router


@pytest.mark.parametrize("arch,method", [("deepseek_v3", None), ("deepseek_v2", "group_limited_greedy"),
                                         ("deepseek_v2", "greedy"), ("gpt_oss", None)])
def test_router_equals_transformers_router_module(arch, method):
    overrides = {"topk_method": method} if method else {}
    cfg, router = _hf_router(arch, **overrides)
    config = ModelConfig.from_hf_dict(cfg.to_dict())
    x = torch.randn(64, cfg.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _, hf_w, hf_ids = router(x)
    spec = config.router
    logits = torch.nn.functional.linear(x, router.weight, getattr(router, "bias", None) if spec.bias else None)
    correction = getattr(router, "e_score_correction_bias", None) if spec.correction_bias else None
    K = config.top_k
    w, ids = select_experts_torch(logits, K, torch.tensor(K), config.renormalize, spec, correction)
    # transformers takes an unsorted top-K: compare each token's (expert, weight) set.
    for t in range(x.shape[0]):
        ours = sorted(zip(ids[t].tolist(), w[t].tolist()))
        theirs = sorted(zip(hf_ids[t].tolist(), hf_w[t].float().tolist()))
        assert [e for e, _ in ours] == [e for e, _ in theirs], f"token {t}"
        assert max(abs(a - b) for (_, a), (_, b) in zip(ours, theirs)) < 1e-6
    if spec.group_select != "none":  # the group limit must have excluded some token's plain top-K
        plain = torch.topk(torch.sigmoid(logits) + correction if correction is not None
                           else torch.softmax(logits, -1), K).indices
        assert any(set(plain[t].tolist()) != set(ids[t].tolist()) for t in range(x.shape[0]))


@pytest.mark.parametrize("arch", NEW_ARCHS)
def test_runtime_k_equals_transformers_saved_with_that_k(arch, checkpoints, prompts):
    """Every k below the model's K (V3 renormalises over k, GPT-OSS softmaxes k logits, V2
    keeps raw scaled scores), then back to K, without reloading."""
    path = checkpoints(arch)
    model = load_model(path)
    K = model.config.top_k
    for k in range(1, K):
        hf_k = load_hf_model(path, num_experts_per_tok=k)
        model.set_top_k(k)
        for p in (prompts[7], prompts[4]):
            assert _max_abs(ReferenceRunner(model).step({0: p})[0], hf_logits(hf_k, p)) < LOGIT_ATOL, f"k={k}"
        assert int(model.expert_load().logical.sum()) == model.config.num_moe_layers * k * len(prompts[4])
    model.set_top_k(K)
    hf_full = load_hf_model(path)
    assert _max_abs(ReferenceRunner(model).step({0: prompts[7]})[0], hf_logits(hf_full, prompts[7])) < LOGIT_ATOL


@pytest.mark.parametrize("arch", NEW_ARCHS)
def test_load_counts_equal_transformers_router_choices(arch, checkpoints, prompts):
    """Counted from transformers' own router module run on the inputs our routers saw."""
    path = checkpoints(arch)
    model, hf = load_model(path), load_hf_model(path)
    inputs = [[] for _ in model.moe_layers]
    for i, moe in enumerate(model.moe_layers):
        moe.gate.register_forward_pre_hook(lambda m, args, i=i: inputs[i].append(args[0]))
    ReferenceRunner(model).step({i: p for i, p in enumerate(prompts)})
    load = model.expert_load()
    E = model.config.num_experts
    for i, layer in enumerate(model.config.moe_layer_ids):
        mlp = hf.model.layers[layer].mlp
        hf_router = mlp.router if arch == "gpt_oss" else mlp.gate
        with torch.no_grad():
            ids = hf_router(inputs[i][-1])[2]
        direct = Counter(ids.reshape(-1).tolist())
        assert load.logical[i].tolist() == [direct[e] for e in range(E)], f"MoE layer {i}"
    assert torch.equal(load.physical, load.logical)


@pytest.mark.parametrize("arch", NEW_ARCHS)
def test_spare_slots_and_replicas_give_the_same_outputs(arch, checkpoints, prompts):
    """Replicas copy every per-slot tensor (GPT-OSS's expert biases too) and split the load."""
    path = checkpoints(arch)
    identity, spares = load_model(path), load_model(path, num_redundant_experts=2)
    E = identity.config.num_experts
    batch = {i: p for i, p in enumerate(prompts)}
    expected = ReferenceRunner(identity).step(batch)
    hot = identity.expert_load().logical.argmax(dim=1).tolist()
    for moe, expert in zip(spares.moe_layers, hot):
        moe.replicate(expert, E + 1)
    got = ReferenceRunner(spares).step(batch)
    assert all(_max_abs(got[s], expected[s]) < 1e-5 for s in batch)
    load = spares.expert_load()
    for layer, expert in enumerate(hot):
        assert load.physical[layer, expert] > 0 and load.physical[layer, E + 1] > 0
        assert load.physical[layer, expert] + load.physical[layer, E + 1] == load.logical[layer, expert]
    if arch == "gpt_oss":  # a copy without its biases would move the outputs: check it is there
        moe = spares.moe_layers[0]
        assert torch.equal(moe.b13[E + 1], moe.b13[moe.placement.log2phy[hot[0], 0]])


# --- GPT-OSS -------------------------------------------------------------------------------------


def test_mxfp4_dequantiser_inverts_the_format_definition():
    """A tensor quantised by the OCP MX definition (quantize_mxfp4) dequantises to the nearest
    FP4 value times each block's power of two, in transformers' layout too."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    w = torch.randn(3, 40, 96, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 2, 96)
    blocks, scales = quantize_mxfp4(w)
    assert blocks.shape == (3, 40, 3, 16) and scales.shape == (3, 40, 3)
    deq = dequantize_mxfp4(blocks, scales)
    assert deq.shape == w.shape
    # Each element is one of FP4's magnitudes times its block's scale, the nearest one to w.
    block_scale = torch.exp2(scales.float() - 127).repeat_interleave(32, dim=-1)
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    mags = deq.abs() / block_scale
    assert torch.isin(mags, grid).all()
    nearest = (w.abs() / block_scale).clamp(max=6.0)
    assert ((mags - nearest).abs() <= (grid[None, :] - nearest.reshape(-1, 1)).abs().min(1).values.view_as(mags)
            + 1e-6).all()
    assert torch.equal(torch.sign(deq[deq != 0]), torch.sign(w[deq != 0]))
    # An already-representable tensor round-trips exactly.
    assert torch.equal(dequantize_mxfp4(*quantize_mxfp4(deq)), deq)
    # transformers' converter reads the same bytes as the transposed weight.
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    assert torch.equal(theirs, deq.transpose(1, 2))


def test_mxfp4_checkpoint_loads_the_same_model_as_its_dense_copy(checkpoints, prompts, tmp_path):
    dense = checkpoints("gpt_oss")
    quantized = write_mxfp4_copy(dense, tmp_path / "mxfp4")
    from safetensors import safe_open

    with safe_open(str(quantized / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.layers.0.mlp.experts.gate_up_proj_blocks" in names and not any(n.endswith("_proj") for n in names
                                                                                if ".experts." in n)
    a, b = load_model(dense), load_model(quantized)
    assert b.config.quantization == "mxfp4"
    for x, y in zip(a.moe_layers, b.moe_layers):
        assert all(torch.equal(s, t) for s, t in zip(x.slot_tensors(), y.slot_tensors()))
    batch = {i: p for i, p in enumerate(prompts)}
    got, expected = ReferenceRunner(b).step(batch), ReferenceRunner(a).step(batch)
    assert all(torch.equal(got[s], expected[s]) for s in batch)
    # A checkpoint quantised in another way is refused by name.
    cfg = json.loads((quantized / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8"}
    (quantized / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="fp8"):
        load_model(quantized)


def test_read_expert_returns_the_loaded_slot_tensors(checkpoints, tmp_path):
    """What a restarted expert-parallel worker reads for one expert equals what the loader put
    in its slot, from the stacked dense tensors and from MXFP4 blocks."""
    from moeserve.checkpoint import read_expert

    dense = checkpoints("gpt_oss")
    for path in (dense, write_mxfp4_copy(dense, tmp_path / "mxfp4")):
        model = load_model(path)
        config = model.config
        for moe_layer, expert in ((0, 5), (2, 0)):
            values = read_expert(path, config, config.moe_layer_ids[moe_layer], expert)
            moe = model.moe_layers[moe_layer]
            assert len(values) == 4
            for tensor, value in zip(moe.slot_tensors(), values):
                assert torch.equal(tensor[expert], value.to(tensor.dtype))


def test_bad_stacked_expert_tensors_are_refused_by_name(checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    dense = checkpoints("gpt_oss")
    quantized = write_mxfp4_copy(dense, tmp_path / "q")
    file = quantized / "model.safetensors"
    original = load_file(file)
    name = "model.layers.1.mlp.experts.gate_up_proj"
    for change, message in (
        (lambda t: t.pop(name + "_scales"), f"missing tensor.*{name}_scales"),
        (lambda t: t.__setitem__(name + "_blocks", t[name + "_blocks"][:-1].clone()), "expected 8 experts"),
        (lambda t: t.__setitem__(name + "_scales", t[name + "_scales"].float()), "MXFP4 needs uint8"),
        (lambda t: t.__setitem__("model.layers.1.mlp.experts.up_proj", t["model.layers.0.mlp.router.bias"].clone()),
         "unexpected tensor model.layers.1.mlp.experts.up_proj"),
    ):
        tensors = dict(original)
        change(tensors)
        save_file(tensors, file, metadata={"format": "pt"})
        with pytest.raises(CheckpointError, match=message):
            load_model(quantized)


def test_capacity_rerouting_is_refused_for_group_limited_routing(checkpoints):
    model = load_model(checkpoints("deepseek_v3"))
    with pytest.raises(ValueError, match="group-limited"):
        model.set_capacity(1.25, "reroute")
    model.set_capacity(1.25, "drop")  # dropping chooses no new expert: allowed


def test_profile_step_covers_mla_decompression_at_full_context(checkpoints):
    """The profile's second run: one chunk of the step budget at max_model_len context."""
    from moeserve.worker.kv_sizing import profile_step

    model = load_model(checkpoints("deepseek_v3"))
    seen = []
    model.model.layers[0].self_attn.kv_b_proj.register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    scratch = profile_step(model, num_tokens=16, max_num_seqs=4, max_model_len=96, block_size=8)
    assert seen[-1][:2] == (1, 96)  # the whole 96-token context decompressed for a 16-token chunk
    assert scratch == kv_block_bytes(model.config, 8, torch.float32) * 12
    assert int(model.expert_load().logical.sum()) == 0  # no state left behind


def test_gpt_oss_sinks_clamp_and_window_each_change_the_result(checkpoints, prompts):
    """Guards for the GPT-OSS comparison: without each feature the same weights give other logits."""
    path = checkpoints("gpt_oss")
    long_prompt = prompts[7]
    base = ReferenceRunner(load_model(path)).step({0: long_prompt})[0]
    assert len(long_prompt) > load_model(path).config.sliding_windows[0]

    def without(edit) -> torch.Tensor:
        model = load_model(path)
        edit(model)
        return ReferenceRunner(model).step({0: long_prompt})[0]

    def no_sinks(model):
        for layer in model.model.layers:
            layer.self_attn.sinks = None

    def no_window(model):
        for layer in model.model.layers:
            layer.self_attn.window = None

    def no_clamp(model):
        import dataclasses

        for moe in model.moe_layers:
            moe.act = dataclasses.replace(moe.act, limit=1e9)

    for name, edit in (("sinks", no_sinks), ("window", no_window), ("clamp", no_clamp)):
        assert _max_abs(without(edit), base) > 1e-2, name


def test_deepseek_v3_correction_bias_and_mtp_layer(checkpoints, prompts):
    path = checkpoints("deepseek_v3")
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert {f"model.layers.3.{n}" for n in MTP_TENSORS} <= set(f.keys())  # the MTP layer is on disk
    model = load_model(path)
    bias = model.moe_layers[0].gate.e_score_correction_bias
    assert bias.dtype == torch.float32 and bias.abs().sum() > 0
    base = ReferenceRunner(model).step({0: prompts[7]})[0]
    model_bf16 = load_model(path, dtype=torch.bfloat16)
    assert model_bf16.moe_layers[0].gate.e_score_correction_bias.dtype == torch.float32
    for moe in model.moe_layers:
        moe.gate.e_score_correction_bias.zero_()
    assert _max_abs(ReferenceRunner(model).step({0: prompts[7]})[0], base) > 1e-3


def test_unsupported_deepseek_configs_are_refused_by_name(checkpoints):
    raw = json.loads((checkpoints("deepseek_v3") / "config.json").read_text())
    for change, message in (({"n_group": 5}, "n_group=5"), ({"num_key_value_heads": 2}, "num_key_value_heads"),
                            ({"moe_layer_freq": 2}, "moe_layer_freq"), ({"topk_group": 1, "num_experts_per_tok": 4},
                                                                         "fewer than")):
        with pytest.raises(CheckpointError, match=message):
            ModelConfig.from_hf_dict({**raw, **change})
    v2 = {**raw, "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "topk_method": "noaux_tc"}
    with pytest.raises(CheckpointError, match="topk_method"):
        ModelConfig.from_hf_dict(v2)



# --- serving -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_moeserve_serve_serves_a_tiny_deepseek_v3_to_the_openai_client(checkpoints, tmp_path):
    """Greedy text through the openai client equals transformers' greedy continuation; the expert
    series name only the MoE layers (layer 0 is dense)."""
    import httpx
    from openai import OpenAI
    from prometheus_client.parser import text_string_to_metric_families

    from moeserve import Tokenizer
    from moeserve.testing.oracle import hf_greedy
    from server_utils import start_server

    path = checkpoints("deepseek_v3")
    tok = Tokenizer(path)
    prompt = "def f_7(x, y=3):\n    return"
    expected = tok.decode(list(hf_greedy(load_hf_model(path), tok.encode(prompt), 12).tokens))
    server = start_server(str(path), "--max-model-len", "128", "--expert-metrics", "expert",
                          "--served-model-name", "tiny-dsv3", log_path=str(tmp_path / "log"))
    try:
        client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
        out = client.completions.create(model="tiny-dsv3", prompt=prompt, max_tokens=12, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert out.choices[0].text == expected
        stream = client.chat.completions.create(model="tiny-dsv3", messages=[{"role": "user", "content": "the expert"}],
                                                max_tokens=6, temperature=0, stream=True,
                                                extra_body={"ignore_eos": True})
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        metrics = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text)}
        layers = {s.labels["layer"] for s in metrics["moeserve:expert_routed_tokens"].samples}
        assert layers == {"1", "2"}
    finally:
        assert server.stop() == 0, (tmp_path / "log").read_text()
