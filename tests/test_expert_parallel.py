"""Expert parallelism on Ray, for real: a Ray cluster in a network namespace this module creates
(one node; a second module-scoped cluster spans two namespaces joined by a veth pair), workers
as actors in a placement group, the expert all-to-all over gloo. Each check runs
tests/ep_driver.py inside the namespace and compares with the one-process engine here, under the
equality rule. The mp executor (local worker processes, no Ray) gets the same comparison."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

from moeserve import SamplingParams
from moeserve.config import engine_config
from moeserve.engine.faults import ENV_VAR
from moeserve.engine.llm_engine import LLMEngine
from moeserve.testing.checkpoints import make_tiny_checkpoint
from moeserve.testing.equality import GreedyTrace, greedy_divergence

from ep_driver import Recorder, run_staggered
from netns import ray_cluster_fixture

pytestmark = [pytest.mark.ray, pytest.mark.slow]
DRIVER = str(Path(__file__).with_name("ep_driver.py"))
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def cluster():
    yield from ray_cluster_fixture(num_cpus=4)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The four families; Qwen3-MoE with 10 experts, which 4 workers cannot split evenly."""
    root = tmp_path_factory.mktemp("ep")
    return {
        "mixtral": make_tiny_checkpoint("mixtral", root / "mixtral"),
        "qwen2_moe": make_tiny_checkpoint("qwen2_moe", root / "qwen2_moe"),  # with its shared expert
        "qwen3_moe": make_tiny_checkpoint("qwen3_moe", root / "qwen3_moe", num_experts=10),
        "olmoe": make_tiny_checkpoint("olmoe", root / "olmoe"),
        "deepseek_v3": make_tiny_checkpoint("deepseek_v3", root / "deepseek_v3"),  # grouped routing, MLA
        "gpt_oss": make_tiny_checkpoint("gpt_oss", root / "gpt_oss"),  # expert biases travel with their slots
    }


def _driver(cluster, *args: str, timeout: float = 600) -> dict:
    done = cluster.run([sys.executable, DRIVER, *args, "--ray-address", cluster.address], timeout=timeout)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, f"driver failed ({done.returncode}):\n{done.stderr[-6000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def _single(model: Path, prompts: list[list[int]], **settings) -> tuple[list[GreedyTrace], list[list[int]]]:
    """The one-process engine (or, with settings, another executor here) on the driver's
    schedule: traces in prompt order and the expert-load totals."""
    engine = LLMEngine(engine_config(model, max_model_len=128, block_size=4, **settings))
    recorder = Recorder()
    engine.core.add_controller(recorder)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=5)
    done = run_staggered(engine, prompts, params)
    engine.core.shutdown()
    traces = [GreedyTrace(done[str(i)].outputs[0].token_ids, done[str(i)].outputs[0].logprobs)
              for i in range(len(prompts))]
    return traces, recorder.logical


def _traces(result: dict) -> list[GreedyTrace]:
    return [GreedyTrace(tuple(t["tokens"]), tuple({int(k): v for k, v in lp.items()} for lp in t["logprobs"]))
            for t in result["traces"]]


def _expert_bytes_per_slot(model: Path) -> int:
    from moeserve import ModelConfig

    mc = ModelConfig.from_pretrained(model)
    D, I = mc.hidden_size, mc.moe_intermediate_size
    biases = 2 * I + D if mc.expert_bias else 0
    return (3 * D * I + biases) * 4 * mc.num_moe_layers  # fp32


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss"])
def test_two_and_four_workers_equal_one(cluster, models, prompts, tmp_path, arch):
    model = models[arch]
    prompt_file = tmp_path / "prompts.json"
    prompt_file.write_text(json.dumps(prompts))
    expected, expected_load = _single(model, prompts)
    from moeserve import ModelConfig

    E = ModelConfig.from_pretrained(model).num_experts
    for workers in (2, 4):
        got = _driver(cluster, "generate", str(model), str(prompt_file), "--workers", str(workers),
                      "--max-tokens", str(MAX_TOKENS))
        for i, (a, b) in enumerate(zip(_traces(got), expected)):
            assert greedy_divergence(a, b) is None, f"{arch}, {workers} workers, prompt {i}"
        assert got["logical"] == expected_load, "expert-load counts summed over ranks"
        per_rank = got["running_by_rank"]
        assert all(len(r) == workers for r in per_rank)
        assert any(r.count(0) == workers - 1 and sum(r) == 1 for r in per_rank[:3]), "a step with idle ranks"
        assert all(sum(1 for r in per_rank if r[k]) for k in range(workers)), "every rank ran requests"
        shares = [E * (g + 1) // workers - E * g // workers for g in range(workers)]
        assert got["expert_bytes"] == [n * _expert_bytes_per_slot(model) for n in shares]


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss"])
def test_overlapped_micro_batches_equal_one_worker(cluster, models, prompts, tmp_path, arch):
    """Every step with >= 2 tokens on each worker runs as two micro-batches whose all-to-alls
    overlap (the first three steps have an idle worker: those are not split on any rank)."""
    model = models[arch]
    prompt_file = tmp_path / "prompts.json"
    prompt_file.write_text(json.dumps(prompts))
    expected, expected_load = _single(model, prompts)
    expected_tokens = sum(len(p) for p in prompts) + len(prompts) * (MAX_TOKENS - 1)
    for workers in (2, 4) if arch == "qwen3_moe" else (2,):
        got = _driver(cluster, "generate", str(model), str(prompt_file), "--workers", str(workers),
                      "--max-tokens", str(MAX_TOKENS), "--overlap-threshold", "2")
        assert 0 < got["split_steps"] <= got["steps"] - 3, "split steps, but none with an idle worker"
        for i, (a, b) in enumerate(zip(_traces(got), expected)):
            assert greedy_divergence(a, b) is None, f"{arch}, {workers} workers, prompt {i}"
        assert got["logical"] == expected_load, "expert-load counts summed over ranks and micro-batches"
        assert got["num_tokens"] == expected_tokens


def test_replication_across_workers_moves_each_experts_own_weights(cluster, tmp_path):
    """Each expert's weights encode its id; after copies across workers, a retirement and a
    reused slot, every slot holds the code of the expert the maps say it holds."""
    from safetensors.torch import load_file, save_file

    model = make_tiny_checkpoint("mixtral", tmp_path / "coded")
    for f in model.glob("*.safetensors"):
        tensors = load_file(f)
        for name in tensors:
            if ".experts." in name:
                e = int(name.split(".experts.")[1].split(".")[0])
                tensors[name] = torch.full_like(tensors[name], float(e + 1))
        save_file(tensors, f, metadata={"format": "pt"})
    got = _driver(cluster, "move", str(model))
    for layer, (phy2log, groups) in enumerate(got["placement"][0]):
        assert phy2log == got["expected"], f"layer {layer}"
        assert all(p[layer][0] == phy2log for p in got["placement"])  # both workers agree on the map
        for rank, codes in enumerate(got["codes"]):
            for slot, (w13, w2) in codes[layer].items():
                slot = int(slot)
                assert groups[slot] == rank
                if phy2log[slot] >= 0:
                    assert w13 == w2 == phy2log[slot] + 1, f"layer {layer} slot {slot} on worker {rank}"


def test_replication_planner_under_expert_parallelism_keeps_generations_equal(cluster, models, prompts, tmp_path):
    model = models["mixtral"]
    prompt_file = tmp_path / "prompts.json"
    prompt_file.write_text(json.dumps(prompts))
    expected, _ = _single(model, prompts)
    got = _driver(cluster, "generate", str(model), str(prompt_file), "--workers", "2", "--spares", "2",
                  "--replication", "--max-tokens", str(MAX_TOKENS))
    assert got["replications"] >= 1
    for i, (a, b) in enumerate(zip(_traces(got), expected)):
        assert greedy_divergence(a, b) is None, f"prompt {i}"


def test_serve_with_two_workers_end_to_end(cluster, models):
    model = models["mixtral"]
    got = _driver(cluster, "serve", str(model), "--workers", "2", "--prompt", "the expert router")
    from moeserve import LLM

    llm = LLM(str(model), max_model_len=128)
    expected = llm.generate("the expert router", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    assert got["text"] == expected[0].outputs[0].text and got["usage"] == 12
    assert got["streamed"] and got["metrics_has_ranks"]


def test_mp_executor_workers_equal_one(models, prompts):
    """The same engine with worker processes on this host and no Ray."""
    model = models["olmoe"]
    expected, expected_load = _single(model, prompts)
    got, load = _single(model, prompts, expert_parallel_size=3, distributed_executor_backend="mp")
    for i, (a, b) in enumerate(zip(got, expected)):
        assert greedy_divergence(a, b) is None, f"prompt {i}"
    assert load == expected_load


@pytest.fixture(scope="module")
def two_nodes():
    yield from ray_cluster_fixture(two_nodes=True)


def test_spread_places_workers_on_both_nodes(two_nodes, models, prompts, tmp_path):
    model = models["qwen2_moe"]
    prompt_file = tmp_path / "prompts.json"
    prompt_file.write_text(json.dumps(prompts))
    expected, _ = _single(model, prompts)
    got = _driver(two_nodes, "generate", str(model), str(prompt_file), "--workers", "2", "--spread",
                  "--max-tokens", str(MAX_TOKENS))
    assert sorted(got["worker_nodes"]) == two_nodes.ips
    for i, (a, b) in enumerate(zip(_traces(got), expected)):
        assert greedy_divergence(a, b) is None, f"prompt {i}"


def test_vllm_spelling_on_the_command_line(models):
    """`--data-parallel-size 2 --enable-expert-parallel` is `--expert-parallel-size 2`; without
    the switch it is refused in one line."""
    import subprocess

    from moeserve import LLM

    model = str(models["mixtral"])
    run = [sys.executable, "-m", "moeserve.cli", "generate", model, "--prompt", "def f(x):", "--max-tokens", "8",
           "--max-model-len", "64", "--ignore-eos", "--distributed-executor-backend", "mp", "--data-parallel-size", "2"]
    result = subprocess.run([*run, "--enable-expert-parallel"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    expected = LLM(model, max_model_len=64).generate("def f(x):", SamplingParams(temperature=0, max_tokens=8,
                                                                                  ignore_eos=True))
    assert result.stdout == expected[0].outputs[0].text + "\n"
    refused = subprocess.run(run, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "--enable-expert-parallel" in refused.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("how", ["ray_kill", "sigkill", "hang"])
def test_a_lost_worker_fails_its_requests_fast_and_the_server_recovers(cluster, models, how):
    """Four requests in flight on two workers, then worker 1 is killed (ray.kill, or SIGKILL of
    its process) or hangs: every request ends with 503 + Retry-After, /health says 503 naming the
    worker and then 200 again within 60 s, and a greedy completion equals the one-process engine's."""
    from moeserve import LLM

    model = models["mixtral"]
    got = _driver(cluster, "fault", str(model), "--workers", "2", "--how", how, "--prompt", "the expert router",
                  timeout=400)
    assert len(got["workers"]) == 2
    assert [o[0] for o in got["outcomes"]] == [503] * 4, got["outcomes"]
    assert all(o[1] is not None and "worker" in o[2] for o in got["outcomes"])
    from moeserve.executor.multi import grace_seconds

    limit = 10 if how != "hang" else 3 + grace_seconds(3) + 10  # a hang: the group's timeout, then a grace
    assert all(o[3] < limit for o in got["outcomes"]), got["outcomes"]
    codes = [h[1] for h in got["health"]]
    assert 503 in codes and codes[-1] == 200, got["health"]
    down = next(h for h in got["health"] if h[1] == 503)
    named = r"worker(\(s\))? \[?1\b" if how != "sigkill" else r"worker(\(s\))? \[?\d"  # SIGKILL: some worker's process
    assert re.search(named, down[2]), down
    assert got["health"][-1][0] < 60
    assert got["served_after_recovery"] == 200  # serving again
    assert got["grpc_health"] == ["NOT_SERVING", "SERVING"]
    status, retry_after, body = got["new_request_while_down"]
    assert status == 503 and retry_after is not None and "rebuilding" in body
    llm = LLM(str(model), max_model_len=256)
    expected = llm.generate("the expert router", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    assert got["after_text"] == expected[0].outputs[0].text
    metrics = dict(line.rsplit(" ", 1) for line in got["metrics"])
    assert float(next(v for k, v in metrics.items() if k.startswith("moeserve:worker_recoveries_total"))) == 1
    assert got["leftover_actors"] == [] and got["leftover_worker_processes"] == []


def test_bf16_model_with_an_idle_worker():
    """The default model is bf16: its rows and routing weights cross gloo bit-cast to bytes, and
    a worker with no request must send the dtypes the busy one sends (both used to fail the step)."""
    from moeserve import LLM

    model = str(Path(__file__).resolve().parents[1] / "models" / "moeserve-tiny-moe")
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    expected = LLM(model, max_model_len=256).generate(["def f(x):", "the expert"], params)
    llm = LLM(model, max_model_len=256, expert_parallel_size=2, distributed_executor_backend="mp")
    both = llm.generate(["def f(x):", "the expert"], params)
    alone = llm.generate(["def f(x):"], params)  # one request: the other worker idles every step
    llm.engine.core.shutdown()
    assert [o.outputs[0].text for o in both] == [o.outputs[0].text for o in expected]
    assert alone[0].outputs[0].text == expected[0].outputs[0].text


def test_a_cluster_leaves_nothing_behind(models, prompts, tmp_path):
    """A cluster that served an expert-parallel engine, once stopped, leaves no namespace, no
    process, no shared-memory segment and no session files."""
    import os
    import subprocess

    from netns import RayNetnsCluster, can_make_namespaces

    if not can_make_namespaces():
        pytest.skip("network namespaces need root and iproute2")
    shm_before = set(os.listdir("/dev/shm"))
    cluster = RayNetnsCluster(num_cpus=2)
    try:
        prompt_file = tmp_path / "prompts.json"
        prompt_file.write_text(json.dumps(prompts[:2]))
        got = _driver(cluster, "generate", str(models["mixtral"]), str(prompt_file), "--workers", "2",
                      "--max-tokens", "4")
        assert len(got["traces"]) == 2
        names = [ns.name for ns in cluster.namespaces]
    finally:
        cluster.stop()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(name in listed for name in names)
    leftovers = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if cluster.temp_dir.encode() in open(f"/proc/{entry}/cmdline", "rb").read():
                    leftovers.append(int(entry))
            except OSError:
                pass
    assert leftovers == []
    assert set(os.listdir("/dev/shm")) <= shm_before
    assert not os.path.exists(cluster.temp_dir)


def _run_all(engine: LLMEngine, prompts: list[list[int]]) -> tuple[dict, dict]:
    """Every prompt, greedy, to the end: (request id -> GreedyTrace of the finished ones,
    request id -> message of the failed ones)."""
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=5)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), {"prompt_token_ids": p}, params)
    done, failed = {}, {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if hasattr(out, "message"):
                failed[out.request_id] = out.message
            elif out.finished:
                done[out.request_id] = GreedyTrace(out.outputs[0].token_ids, out.outputs[0].logprobs)
    return done, failed


def test_a_worker_lost_while_idle_or_in_a_control_call_is_recovered(models, prompts):
    """Worker processes (mp) die between steps: the next step finds it before sending (its
    requests fail as unavailable, naming the worker) and the engine rebuilds; a control call
    that meets a dead worker says so and the engine rebuilds before the next step. Afterwards
    generations equal one worker's."""
    import os
    import signal
    import time

    model = models["mixtral"]
    expected, _ = _single(model, prompts)
    engine = LLMEngine(engine_config(model, max_model_len=128, block_size=4, expert_parallel_size=2,
                                     distributed_executor_backend="mp", distributed_timeout=3))
    try:
        os.kill(engine.core.executor.worker_pids()[1], signal.SIGKILL)  # idle: no step in flight
        time.sleep(0.5)
        done, failed = _run_all(engine, prompts)
        assert not done and len(failed) == len(prompts) and all("worker 1" in m for m in failed.values())
        assert engine.core.stats().worker_recoveries == 1
        os.kill(engine.core.executor.worker_pids()[0], signal.SIGKILL)
        time.sleep(0.5)
        with pytest.raises(ValueError, match="worker 0"):
            engine.core.call("collective_rpc", "pid")
        done, failed = _run_all(engine, prompts)  # rebuilt first, then served
        assert not failed and engine.core.stats().worker_recoveries == 2
        for i, e in enumerate(expected):
            assert greedy_divergence(done[str(i)], e) is None, f"prompt {i}"
    finally:
        engine.core.shutdown()


def test_a_worker_failing_inside_a_split_step_is_recovered(models, prompts, monkeypatch):
    """Worker 1 raises as micro-batch B begins, with A's dispatch in flight on both ranks (the
    `split` fault site): worker 0's wait times out, the step's requests fail as unavailable,
    the group is rebuilt, and the same requests then run split again and equal one worker's."""
    model = models["qwen2_moe"]
    expected, _ = _single(model, prompts)
    monkeypatch.setenv(ENV_VAR, "split:1@1")  # the worker processes read it
    engine = LLMEngine(engine_config(model, max_model_len=128, block_size=4, expert_parallel_size=2,
                                     distributed_executor_backend="mp", distributed_timeout=3,
                                     overlap_threshold_decode=2, overlap_threshold_prefill=2))

    try:
        done, failed = _run_all(engine, prompts)
        assert failed and not done, "the first split step held every request"
        assert engine.core.stats().worker_recoveries == 1 and engine.core.stats().num_split_steps == 0
        done, failed = _run_all(engine, prompts)
        assert not failed and engine.core.stats().num_split_steps > 0
        for i, e in enumerate(expected):
            assert greedy_divergence(done[str(i)], e) is None, f"prompt {i}"
    finally:
        engine.core.shutdown()
