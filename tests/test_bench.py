"""Benchmarks run at smoke size only, to keep them working; speed is not asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_throughput_smoke_writes_well_formed_json(tmp_path):
    out = tmp_path / "throughput.json"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "throughput.py"), "--smoke", "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["machine"]["cpu_count"] >= 1 and data["machine"]["torch"]
    assert data["workload"]["num_requests"] == 4
    for side in ("moeserve", "transformers"):
        run = data[side]
        assert run["elapsed_s"] > 0 and run["output_tokens"] == data["moeserve"]["output_tokens"]
        assert run["output_tokens_per_s"] == run["output_tokens"] / run["elapsed_s"]
    ratio = data["moeserve"]["output_tokens_per_s"] / data["transformers"]["output_tokens_per_s"]
    assert data["ratio_output_tokens_per_s"] == ratio


def test_throughput_rejects_bad_arguments():
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "throughput.py"), "--num-requests", "0"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "must be >= 1" in result.stderr


def test_serve_overhead_smoke_writes_well_formed_json(tmp_path):
    out = tmp_path / "serve.json"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "serve_overhead.py"), "--smoke", "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["offline"]["output_tokens"] == data["http"]["output_tokens"] > 0
    assert data["ratio_http_over_offline"] == data["http"]["output_tokens_per_s"] / data["offline"]["output_tokens_per_s"]
    assert data["machine"]["cpu_count"] >= 1
