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
