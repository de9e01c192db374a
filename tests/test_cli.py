"""The `moeserve` command as a user runs it."""

from __future__ import annotations

import subprocess
import sys


def _run(*args):
    return subprocess.run([sys.executable, "-m", "moeserve.cli", *args], capture_output=True, text=True)


def test_inspect_describes_the_checkpoint(checkpoints):
    result = _run("inspect", str(checkpoints("qwen2_moe")))
    assert result.returncode == 0, result.stderr
    assert "Qwen2MoeForCausalLM" in result.stdout
    assert "4 (3 MoE, 1 dense)" in result.stdout
    assert "shared expert     intermediate 80" in result.stdout


def test_inspect_describes_mla_and_the_grouped_router(checkpoints):
    result = _run("inspect", str(checkpoints("deepseek_v3")))
    assert result.returncode == 0, result.stderr
    assert "MLA: kv_lora_rank 20, q_lora_rank 24, nope/rope/v dims 12/8/10" in result.stdout
    assert "kv cache          28 values per token per layer" in result.stdout
    assert "router            sigmoid, groups group_top2_sum (2 of 4), scale 2.5" in result.stdout


def test_bad_checkpoint_is_one_clear_line(tmp_path):
    result = _run("inspect", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.strip() == f"moeserve: {tmp_path}: no config.json (expected a Hugging Face model directory)"


def test_generate_prints_the_offline_completion(checkpoints):
    from moeserve import LLM, SamplingParams

    path = str(checkpoints("mixtral"))
    result = _run("generate", path, "--prompt", "def f(x):", "--max-tokens", "8", "--max-model-len", "64",
                  "--ignore-eos")
    assert result.returncode == 0, result.stderr
    expected = LLM(path, max_model_len=64).generate("def f(x):", SamplingParams(temperature=0, max_tokens=8,
                                                                                 ignore_eos=True))
    assert result.stdout == expected[0].outputs[0].text + "\n"


def test_generate_bad_input_is_one_line(checkpoints):
    result = _run("generate", str(checkpoints("mixtral")), "--prompt", "x", "--max-tokens", "0")
    assert result.returncode == 1
    assert result.stderr.strip() == "moeserve: invalid sampling parameters: max_tokens must be >= 1"


def test_generate_with_triton_backends_prints_the_same_completion(checkpoints):
    """The flags reach the engine: on the CPU the kernels run in the interpreter (conftest sets
    TRITON_INTERPRET=1, which the subprocess inherits) and greedy text is the torch path's."""
    path = str(checkpoints("qwen3_moe"))
    args = ("generate", path, "--prompt", "def f(x):", "--max-tokens", "6", "--max-model-len", "64", "--ignore-eos",
            "--dtype", "float32")
    torch_run = _run(*args, "--moe-backend", "torch", "--attention-backend", "torch")
    triton_run = _run(*args, "--moe-backend", "triton", "--attention-backend", "triton")
    assert torch_run.returncode == 0 and triton_run.returncode == 0, triton_run.stderr
    assert triton_run.stdout == torch_run.stdout and torch_run.stdout.strip()


def test_impossible_backend_is_one_clear_line(checkpoints):
    """Triton kernels on a CPU device without the interpreter cannot run: refused at start."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "moeserve.cli", "generate", str(checkpoints("mixtral")),
                             "--prompt", "x", "--device", "cpu", "--moe-backend", "triton"],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 1
    assert result.stderr.strip().startswith("moeserve: the triton moe backend needs triton and a CUDA device")


def test_device_defaults_to_auto_which_picks_cuda_when_there_is_one():
    from moeserve.cli import build_parser
    from moeserve.config import LoadConfig, engine_config_from_args
    from moeserve.model_config import resolve_device

    for command in ("serve", "generate"):
        args = build_parser().parse_args([command, "m"] + (["--prompt", "x"] if command == "generate" else []))
        assert engine_config_from_args("m", args).load.device == "auto"
    assert LoadConfig("m").device == "auto"
    assert resolve_device("auto", cuda_available=True) == "cuda"
    assert resolve_device("auto", cuda_available=False) == "cpu"
    assert resolve_device("cuda:1", cuda_available=False) == "cuda:1"


def test_every_config_field_is_a_flag_with_the_fields_default():
    """The serve flags are generated from the config layers: each field has exactly one flag,
    not giving it keeps the field's default, and giving it sets that field alone."""
    from dataclasses import fields

    from moeserve.cli import build_parser
    from moeserve.config import (ENGINE_LAYERS, EngineConfig, LoadConfig, ServerConfig, engine_config_from_args,
                                 from_args)

    parser = build_parser()
    serve = next(a for a in parser._subparsers._group_actions[0].choices.items() if a[0] == "serve")[1]
    dests = {a.dest for a in serve._actions}
    for cls in (*ENGINE_LAYERS.values(), ServerConfig):
        for f in fields(cls):
            assert f.name in dests or (cls is LoadConfig and f.name == "model"), f"{cls.__name__}.{f.name} has no flag"
    args = parser.parse_args(["serve", "m"])
    assert engine_config_from_args("m", args) == EngineConfig(LoadConfig("m"))
    assert from_args(ServerConfig, args) == ServerConfig()
    args = parser.parse_args(["serve", "m", "--moe-backend", "torch", "--no-enable-prefix-caching", "--api-key", "a",
                              "--api-key", "b", "--gpu-memory-utilization", "0.5", "--expert-metrics", "off"])
    config = engine_config_from_args("m", args)
    assert config.load.expert_backend == "torch" and not config.cache.enable_prefix_caching
    assert config.cache.gpu_memory_utilization == 0.5 and config.control.expert_metrics == "off"
    assert from_args(ServerConfig, args).api_key == ("a", "b")
