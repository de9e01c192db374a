"""Benchmarks run at smoke size only, to keep them working; speed is not asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moeserve.kernels import cpu_attention

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
    prefill = data["efficiency"]["prefill_attention"]
    assert prefill["sequences"] == 4 and 4 * 4 <= prefill["tokens"] <= 4 * 12  # every smoke prompt fits one step
    assert prefill["speedup"] == prefill["padded_ms"] / prefill["per_sequence_sdpa_ms"]
    decode = data["efficiency"]["decode_attention"]
    assert decode["sequences"] == 4 and decode["torch_ms"] > 0
    if cpu_attention.usable():
        assert decode["speedup"] == decode["torch_ms"] / decode["cpu_kernel_ms"]
        assert data["moeserve"]["attention_backend"] == "cpu"


def test_decode_step_smoke_writes_well_formed_json(tmp_path):
    """The static decode path (eager off CUDA) runs every bucket without a host sync."""
    out = tmp_path / "decode_step.json"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "decode_step.py"), "--smoke", "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["machine"]["cpu_count"] >= 1 and data["command"].endswith("--smoke --out " + str(out))
    assert [r["batch"] for r in data["rows"]] == [1, 4]
    for row in data["rows"]:
        assert row["static_host_syncs"] == [] and row["graphs_captured"] == torch.cuda.is_available()
        assert row["static_speedup"] == row["ordinary_ms_per_step"] / row["static_ms_per_step"]


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


def test_moe_kernels_smoke_writes_well_formed_json(tmp_path):
    out = tmp_path / "moe_kernels.json"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "moe_kernels.py"), "--smoke", "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["ceilings"]["copy_gbs"] > 0 and data["ceilings"]["matmul_tflops"] > 0
    assert [row["M"] for row in data["moe"]] == [1, 16]
    for row in data["moe"]:
        assert {"torch", "triton"} <= set(row["backends"])
        for run in row["backends"].values():
            assert run["ms"] > 0 and run["tflops"] == row["flops"] / run["ms"] / 1e9
        assert row["triton_speedup_vs_loop"] == row["backends"]["torch"]["ms"] / row["backends"]["triton"]["ms"]
    assert len(data["attention"]) == 2 and all(r["backends"]["triton"]["gbs"] > 0 for r in data["attention"])


def test_tune_kernels_smoke_writes_a_table_the_lookup_reads(tmp_path):
    from moeserve.kernels.configs import MoEKernelConfig, load_table

    out = tmp_path / "table.json"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "tune_kernels.py"), "--smoke", "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    table = load_table(out)
    assert list(table) == ["P=4,I=64,D=64,dtype=bfloat16"]
    assert set(table["P=4,I=64,D=64,dtype=bfloat16"]) == {1, 8}
    assert all(isinstance(c, MoEKernelConfig) for c in table["P=4,I=64,D=64,dtype=bfloat16"].values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the full runs are allowed")
def test_kernel_benchmarks_refuse_full_runs_without_a_gpu():
    for script in ("moe_kernels.py", "tune_kernels.py"):
        result = subprocess.run([sys.executable, str(ROOT / "bench" / script)], capture_output=True, text=True)
        assert result.returncode == 2 and "--smoke" in result.stderr


def test_health_under_load_smoke_writes_well_formed_json(tmp_path):
    out = tmp_path / "health.json"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "health_under_load.py"), "--smoke", "--out",
                             str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    h = data["health_ms"]
    assert h["count"] >= 5 and 0 < h["p50"] <= h["p99"] <= h["max"] and data["health_non_200"] == 0
    assert data["flood"]["completed"] > 0 and data["flood"]["failed"] == 0
    assert data["flood_command"].startswith("moeserve bench serve") and data["machine"]["cpu_count"] >= 1


def test_serialization_smoke_compares_both_formats(tmp_path):
    out = tmp_path / "serialization.json"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "serialization.py"), "--smoke", "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())["rows"]
    assert {r["message"] for r in rows} == {"EngineCoreOutputs", "EngineCoreRequest"}
    for r in rows:
        assert r["msgpack_us"] > 0 and r["pickle_us"] > 0 and r["msgpack_bytes"] > 0 and r["pickle_bytes"] > 0
        assert r["speedup_msgpack_over_pickle"] == r["pickle_us"] / r["msgpack_us"]


def test_overload_smoke_compares_admission_off_and_on(tmp_path):
    out = tmp_path / "overload.json"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "overload.py"), "--smoke", "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["saturation_request_rate"] > 0 and data["offered_request_rate"] == 2 * data["saturation_request_rate"]
    # with admission off at twice saturation no request may meet the SLO (a slow spell): inf
    assert data["goodput_ratio"] == (data["goodput_on"] / data["goodput_off"] if data["goodput_off"] else float("inf"))
    for name in ("off", "on"):
        series = data["over_time"][name]
        assert len(series["t"]) == len(series["goodput_per_s"]) == len(series["ttft_p99_ms"]) >= 2
        assert data["summaries"][name]["num_requests"] > 0
    assert data["ttft_prediction_error_ms"]["on"]["count"] > 0  # the server's predictions were recorded
    assert "cumulative_by_ms" in data["server_refusal_ms"]
    assert (tmp_path / "overload.png").stat().st_size > 0
    assert data["commands"]["on"].startswith("moeserve bench serve")


def test_degrade_smoke_reports_quality_speed_and_load(tmp_path):
    out = tmp_path / "degrade.json"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "degrade.py"), "--smoke", "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    q = data["quality"]["embedded"]
    assert data["perplexity_rise"] == q["perplexity_k1_renormalized"] / q["perplexity_k"] - 1
    assert 0 <= data["top1_agreement"] <= 1 and q["positions"] > 0
    layer = data["speed"]["embedded"]["moe_layer"]
    assert data["moe_speedup"] == layer["speedup"] > 0 and set(layer["by_batch_tokens"]) == {"8", "32"}
    assert data["e2e_speedup"] == data["speed"]["embedded"]["e2e"]["speedup"] > 0
    load = data["under_load"]
    assert data["goodput_ratio_degradation_only"] == load["goodput_ratio"]
    assert load["degradation"]["num_requests"] > 0 and "--degradation" in load["server_flags"]


def test_replication_smoke_reports_balance_before_and_after(tmp_path):
    out = tmp_path / "replication.json"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "replication.py"), "--smoke", "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    zipf = data["zipf64"]
    assert data["balancedness_before"] == zipf["balancedness_before"] and data["max_stall_ms"] == zipf["max_stall_ms"]
    assert data["extra_slot_fraction"] == zipf["num_redundant_experts"] / zipf["num_experts"]
    assert zipf["replications"] >= 1 and zipf["max_stall_ms"] > 0
    assert zipf["balancedness_after"] > zipf["balancedness_before"]  # the planner improved a skewed load
    assert all(abs(s - 1.2) < 0.5 for s in data["zipf_fit"]["zipf_s_fitted_per_layer"])
    assert zipf["moe_layer_time"]["parallel_speedup"] > 0


def test_ep_smoke_reports_the_all_to_all_share(tmp_path):
    out = tmp_path / "ep.json"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "ep.py"), "--smoke", "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    runs = {r["workers"]: r for r in data["runs"]}
    assert set(runs) == {1, 2, 4}
    assert runs[1]["comm_share"] == 0 and runs[1]["a2a_calls_per_step"] == 0
    for n in (2, 4):  # three all-to-alls per MoE layer per step (2 layers in the smoke model)
        assert runs[n]["a2a_calls_per_step"] == 6 and 0 < runs[n]["comm_share"] < 1
        assert runs[n]["output_tok_s"] > 0


def test_ep_overlap_smoke_reports_the_hidden_share(tmp_path):
    out = tmp_path / "ep_overlap.json"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "ep_overlap.py"), "--smoke", "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert [(r["kind"], r["workers"]) for r in data["runs"]] == [("decode", 2), ("prefill", 2)]
    for r in data["runs"]:
        assert r["step_ms_unsplit"] > 0 and r["step_ms_split"] > 0 and r["a2a_ms"] > 0
        expected = (r["step_ms_unsplit"] - r["step_ms_split"]) / r["a2a_ms"]
        assert abs(r["hidden_share"] - expected) <= 1e-9 * max(1.0, abs(expected))  # ms vs s rounding


def test_router_smoke_compares_four_policies(tmp_path):
    out = tmp_path / "router.json"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "router.py"), "--smoke", "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    policies = json.loads(out.read_text())["policies"]
    assert set(policies) == {"always-cheap", "always-full", "rules-only", "bandit"}
    assert policies["always-cheap"]["served_by"]["full"] == 0 and policies["always-full"]["served_by"]["cheap"] == 0
    assert policies["always-cheap"]["cost"] < policies["always-full"]["cost"]
    assert all(0 <= p["pass_rate"] <= 1 for p in policies.values())


def test_ep_faults_smoke_measures_detection_and_recovery(tmp_path):
    out = tmp_path / "ep_faults.json"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "ep_faults.py"), "--smoke", "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert 0 <= data["detect_s"] < data["recover_s"] < 60
    assert 0 < data["requests_failed"] < data["requests_total"]  # the lost worker's requests, not all of them
    # 503 before the stream started, or an error event inside a stream already answered 200
    assert set(data["errors_by_status"]) <= {"200", "503"}, data["errors_by_status"]
    assert data["harness_command"].startswith("moeserve bench serve")


@pytest.mark.ray
def test_replicas_smoke_compares_one_and_two_replicas_and_both_routers(tmp_path):
    from netns import can_make_namespaces

    if not can_make_namespaces():
        pytest.skip("the benchmark runs Ray in a network namespace: needs root and iproute2")
    out = tmp_path / "replicas.json"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "replicas.py"), "--smoke", "--out", str(out)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    data = json.loads(out.read_text())
    assert [(v["replicas"], v["router"]) for v in data["variants"]] == [(1, "pow2"), (2, "pow2"),
                                                                         (2, "outstanding_tokens")]
    for v in data["variants"]:
        assert v["summary"]["completed"] == 8 and v["summary"]["failed"] == 0
        assert len(v["tokens_by_replica"]) == v["replicas"] and v["imbalance"] >= 1.0
    one, two = data["variants"][0]["summary"], data["variants"][1]["summary"]
    assert data["ratios"]["output_throughput_2_vs_1"] == two["output_throughput"] / one["output_throughput"]


@pytest.mark.slow
def test_compile_smoke_writes_well_formed_json(tmp_path):
    out = tmp_path / "compile.json"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "compile.py"), "--smoke", "--out", str(out)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    for name in ("parts", "whole_aten"):
        run = data[name]
        assert run["compile_s"] > 0 and run["output_tokens"] > 0
        for side in ("eager", "compiled"):
            assert run[side]["output_tokens_per_s"] == run["output_tokens"] / run[side]["best_elapsed_s"]
    assert data["parts"]["speedup"] == data["parts"]["eager"]["best_elapsed_s"] / data["parts"]["compiled"]["best_elapsed_s"]
    assert data["pays"]["parts"] == (data["parts"]["median_pair_ratio"] > 1 and data["parts"]["speedup"] > 1)
