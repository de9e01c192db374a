"""moeserve's Ray Serve application on a real Ray cluster in a network namespace (one node;
a second cluster spans two namespaces joined by a veth pair). tests/serve_driver.py deploys it
and drives it over HTTP inside the namespace; the checks here read its report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from moeserve.testing.checkpoints import make_tiny_checkpoint

from netns import ray_cluster_fixture

pytestmark = [pytest.mark.ray, pytest.mark.slow]
DRIVER = str(Path(__file__).with_name("serve_driver.py"))
PROMPTS = ["def f_7(x, y=3):\n    return", "the expert router", "caché naïve 日本語"]


@pytest.fixture(scope="module")
def cluster():
    yield from ray_cluster_fixture(num_cpus=4)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_checkpoint("mixtral", tmp_path_factory.mktemp("serve") / "mixtral")


def _driver(cluster, *args: str, timeout: float = 600) -> dict:
    done = cluster.run([sys.executable, DRIVER, *args, "--ray-address", cluster.address], timeout=timeout)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, f"driver failed ({done.returncode}):\n{done.stderr[-6000:]}"
    return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def expected(model, tmp_path_factory):
    """The one-process engine's greedy text for PROMPTS, as a file the driver reads."""
    from moeserve import LLM, SamplingParams

    offline = LLM(str(model), max_model_len=256)
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    path = tmp_path_factory.mktemp("expected") / "expected.json"
    path.write_text(json.dumps({p: offline.generate(p, greedy)[0].outputs[0].text for p in PROMPTS}))
    return path


def test_two_replicas_serve_correct_text_share_load_and_free_aborted_blocks(cluster, model, expected):
    from prometheus_client.parser import text_string_to_metric_families

    got = _driver(cluster, "basic", str(model), str(expected))
    expected = json.loads(expected.read_text())

    assert got["texts"] == expected  # the openai client's greedy text, through Ray Serve
    assert len(got["served"]) == 2 and all(n > 0 for n in got["served"].values()), got["served"]
    assert sum(got["served"].values()) == 12
    # The abandoned stream held blocks on exactly one replica, which got them all back.
    assert len(got["busy_mid_stream"]) == 1
    busy = got["busy_mid_stream"][0]
    free, total = got["blocks_mid_stream"][busy]
    assert free < total
    assert got["freed"], got["after"]
    assert got["health"] == 200
    # Per-replica series and their sum.
    families = {f.name: f for f in text_string_to_metric_families(got["metrics"])}
    success = [s for s in families["moeserve:request_success"].samples if s.name.endswith("_total")]
    per_replica = [s for s in success if s.labels["replica"] != "all"]
    total_series = [s for s in success if s.labels["replica"] == "all"]
    assert {s.labels["replica"] for s in per_replica} == set(got["served"])
    # 3 + 12 requests finished; the abandoned stream was aborted in its replica, not finished.
    assert sum(s.value for s in total_series) == sum(s.value for s in per_replica) == 15


def test_a_killed_replica_fails_its_requests_cleanly_and_is_replaced(cluster, model):
    got = _driver(cluster, "kill", str(model))
    stream = got["stream"]
    assert stream["joined"] and stream["seconds"] < 60, stream  # no hang
    assert stream["num_events"] < 241  # cut short: 240 tokens were asked for
    # ... with an error event naming the 503 (the client may retry), then [DONE].
    assert '"code": 503' in stream["last_events"][0] and stream["last_events"][-1] == "[DONE]", stream
    # Traffic continued on the other replica while Ray Serve replaced the dead one.
    assert all(codes[-1] == 200 for codes in got["during"]), got["during"]
    assert all(c in (200, 503) for codes in got["during"] for c in codes)
    assert got["back_to_two"], got
    assert got["replaced"] == [got["victim"]] and len(got["new"]) == 1


def test_ray_serves_full_queue_is_a_503_with_retry_after(cluster, model):
    """Streamed or not, a request Ray Serve cannot queue is answered 503 before any body."""
    got = _driver(cluster, "backpressure", str(model))
    codes = sorted(code for code, *_ in got["results"])
    assert codes.count(200) >= 2 and 503 in codes, got["results"]
    assert any(stream and code == 503 for code, _, _, _, stream in got["results"]), got["results"]
    for code, retry_after, seconds, body, stream in got["results"]:
        if code == 503:
            assert retry_after == "1" and "every replica is busy" in body and seconds < 5, (code, retry_after, body)
        else:
            assert '"error"' not in body  # a stream that started ran to its end
    assert got["after"] == 200


def test_autoscaling_goes_from_one_replica_to_two_and_back(cluster, model):
    got = _driver(cluster, "autoscale", str(model))
    counts = [n for _, n in got["timeline"]]
    assert counts[0] == 1 and got["up"] and got["down"], got["timeline"]
    assert max(counts) == 2 and counts[-1] == 1


def test_a_replica_can_be_a_gang_of_expert_parallel_workers(cluster, model, expected):
    got = _driver(cluster, "ep", str(model), str(expected))
    assert got["replicas"] == 1 and got["texts"] == json.loads(expected.read_text())


@pytest.fixture(scope="module")
def two_nodes():
    yield from ray_cluster_fixture(two_nodes=True)


def test_replicas_spread_over_two_namespace_hosts(two_nodes, model):
    got = _driver(two_nodes, "nodes", str(model))
    assert got["status"] == 200
    assert got["node_ips"] == two_nodes.ips


def test_moeserve_serve_replicas_is_the_one_machine_shortcut(model, tmp_path):
    """`moeserve serve MODEL --replicas 2` starts Ray itself (in the namespace it runs in), serves
    the same application on --port, and stops everything on SIGTERM."""
    import os
    import signal
    import subprocess
    import time
    import uuid

    from moeserve import LLM, SamplingParams
    from netns import RAY_ENV, Netns, can_make_namespaces

    if not can_make_namespaces():
        pytest.skip("network namespaces need root and iproute2")
    expected = LLM(str(model), max_model_len=128).generate(
        PROMPTS[0], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0].outputs[0].text
    ns = Netns(f"msr-{uuid.uuid4().hex[:6]}-cli")
    env = {**os.environ, **RAY_ENV}
    log = open(tmp_path / "serve.log", "w")
    try:
        proc = subprocess.Popen(ns.cmd(sys.executable, "-m", "moeserve.cli", "serve", str(model), "--replicas", "2",
                                       "--port", "8125", "--max-model-len", "128", "--served-model-name", "tiny"),
                                stdout=log, stderr=subprocess.STDOUT, env=env)
        probe = ("import httpx, json, sys\n"
                 "r = httpx.post('http://127.0.0.1:8125/v1/completions', timeout=30, json={'model': 'tiny', "
                 f"'prompt': {PROMPTS[0]!r}, 'max_tokens': 8, 'temperature': 0, 'ignore_eos': True}})\n"
                 "print(json.dumps([r.status_code, r.json()]))")
        deadline, answer = time.monotonic() + 180, None
        while time.monotonic() < deadline and proc.poll() is None:
            done = subprocess.run(ns.cmd(sys.executable, "-c", probe), capture_output=True, text=True, env=env)
            if done.returncode == 0:
                answer = json.loads(done.stdout)
                break
            time.sleep(2)
        assert answer is not None, (tmp_path / "serve.log").read_text()[-4000:]
        assert answer[0] == 200 and answer[1]["choices"][0]["text"] == expected
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, (tmp_path / "serve.log").read_text()[-4000:]
    finally:
        ns.delete()
