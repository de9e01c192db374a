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
