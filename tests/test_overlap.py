"""Two micro-batches per step (model/overlap.py): the scheduler's split decision, split and
unsplit steps agreeing under the equality rule, and an event trace showing one micro-batch's
compute running while the other's all-to-all is pending. The expert-parallel engine with
overlapped steps is compared in tests/test_expert_parallel.py (Ray)."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from moeserve import SamplingParams
from moeserve.config import SchedulerConfig, engine_config
from moeserve.engine.block_manager import BlockManager
from moeserve.engine.llm_engine import LLMEngine
from moeserve.engine.request import Request
from moeserve.engine.scheduler import Scheduler
from moeserve.testing.equality import GreedyTrace, greedy_divergence
from moeserve.worker.model_runner import ModelRunnerOutput

from ep_driver import Recorder, run_staggered
from netns import Netns, can_make_namespaces

DRIVER = str(Path(__file__).with_name("overlap_driver.py"))


def _scheduler(pools: int = 2, **settings) -> Scheduler:
    return Scheduler(SchedulerConfig(**settings), [BlockManager(64, 4) for _ in range(pools)])


def _add(sched: Scheduler, name: str, prompt_len: int) -> None:
    sched.add_request(Request(name, list(range(3, 3 + prompt_len)), SamplingParams(max_tokens=50), frozenset(), 256))


def _run(sched: Scheduler):
    """One step; every request reaching its end gets token 7."""
    out = sched.schedule()
    done = [r for r, n in out.num_scheduled_tokens.items()
            if sched.requests[r].num_computed_tokens + n == sched.requests[r].num_tokens]
    sched.update_from_output(out, ModelRunnerOutput(done, [7] * len(done), [None] * len(done)))
    return out


def test_each_rank_is_cut_into_token_balanced_halves_inside_a_prefill():
    sched = _scheduler(overlap_threshold_prefill=8)
    _add(sched, "a", 9)  # rank 0
    _add(sched, "b", 12)  # rank 1 (more free blocks)
    _add(sched, "c", 3)  # rank 0 again
    out = _run(sched)
    assert out.ranks == {"a": 0, "b": 1, "c": 0}
    assert out.micro_batch_cut == (6, 6), "12 tokens per rank: 6 + 6; rank 1's one prompt is cut at a token"


def test_one_rank_below_its_threshold_and_no_rank_splits():
    sched = _scheduler(overlap_threshold_prefill=8)
    _add(sched, "a", 20)
    _add(sched, "b", 5)  # rank 1: 5 < 8
    out = _run(sched)
    assert set(out.ranks.values()) == {0, 1} and out.micro_batch_cut is None
    sched = _scheduler(overlap_threshold_prefill=8)
    _add(sched, "a", 20)  # rank 1 has nothing: idle ranks never split either
    out = _run(sched)
    assert out.micro_batch_cut is None


def test_decode_steps_use_the_decode_threshold():
    sched = _scheduler(overlap_threshold_decode=2, overlap_threshold_prefill=100)
    for i in range(4):
        _add(sched, f"r{i}", 3)
    assert _run(sched).micro_batch_cut is None, "6 prefill tokens per rank < 100"
    out = _run(sched)  # every request now decodes one token
    assert out.num_decode_tokens == 4 and out.micro_batch_cut == (1, 1)


def test_a_split_whose_second_micro_batch_would_be_empty_is_cancelled():
    sched = _scheduler(overlap_threshold_decode=1, overlap_threshold_prefill=1)
    _add(sched, "a", 1)
    _add(sched, "b", 1)
    out = _run(sched)  # one token per rank: A would take it, B would be empty
    assert out.num_scheduled_tokens == {"a": 1, "b": 1} and out.micro_batch_cut is None


def test_overlap_is_on_by_default_only_with_more_than_one_worker():
    assert _scheduler(pools=2).overlap and not _scheduler(pools=1).overlap
    assert _scheduler(pools=1, enable_overlap=True).overlap and not _scheduler(pools=2, enable_overlap=False).overlap


def _generate(model: Path, prompts, **settings):
    engine = LLMEngine(engine_config(model, max_model_len=128, block_size=4, **settings))
    recorder = Recorder()
    engine.core.add_controller(recorder)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=5)
    done = run_staggered(engine, prompts, params)
    stats = engine.core.stats()
    engine.core.shutdown()
    traces = [GreedyTrace(done[str(i)].outputs[0].token_ids, done[str(i)].outputs[0].logprobs)
              for i in range(len(prompts))]
    return traces, (recorder.logical, recorder.num_tokens), stats


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_split_steps_equal_unsplit_steps(checkpoints, prompts, arch):
    """On one worker, forced: every step of >= 2 tokens runs as two micro-batches, including the
    first prompt's lone chunked prefill (budget 16, cut inside each chunk) and prefix-cache hits
    (the last prompt repeats the first). Outputs and expert-load counts are unchanged."""
    model = checkpoints(arch)
    work = [prompts[7]] + prompts[:7] + [prompts[7]]
    settings = dict(max_num_batched_tokens=16)
    expected, expected_load, plain = _generate(model, work, enable_overlap=False, **settings)
    # threshold 1: a step of one token would leave B empty, so it is cancelled (and still runs)
    got, load, split = _generate(model, work, enable_overlap=True, overlap_threshold_decode=1,
                                 overlap_threshold_prefill=1, **settings)
    assert plain.num_split_steps == 0 and split.num_split_steps > split.step // 2, "most steps split"
    assert split.prefix_cache_hits > 0
    for i, (a, b) in enumerate(zip(got, expected)):
        assert greedy_divergence(a, b) is None, f"{arch}, prompt {i}"
    assert load == expected_load, "expert-load counts and tokens of both micro-batches add up to the step's"


def test_a_capacity_factor_turns_the_split_off(checkpoints, prompts):
    """Capacity is per step: halves would each get the whole step's capacity."""
    _, _, stats = _generate(checkpoints("mixtral"), prompts[:3], enable_overlap=True, overlap_threshold_decode=1,
                            overlap_threshold_prefill=1, moe_capacity_factor=1.0)
    assert stats.num_split_steps == 0


@pytest.mark.skipif(not can_make_namespaces(), reason="network namespaces need root and iproute2")
def test_micro_batch_b_computes_while_a_dispatch_is_pending(checkpoints):
    """Two workers in a gloo group (in a namespace of this test); rank 1 issues its half of A's
    first dispatch only once rank 0 has begun B's attention, so rank 0's trace can show B's
    compute between A's dispatch and A's wait only if it did not wait for A first (else the
    driver deadlocks and fails)."""
    ns = Netns(f"msov-{uuid.uuid4().hex[:6]}")
    try:
        done = subprocess.run(ns.cmd(sys.executable, DRIVER, str(checkpoints("mixtral"))), capture_output=True,
                              text=True, timeout=120)
    finally:
        ns.delete()
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, f"driver failed ({done.returncode}):\n{done.stderr[-4000:]}"
    for rank, events in enumerate(json.loads(lines[-1][len("RESULT "):])["events"]):
        at = {tuple(e): i for i, e in enumerate(events)}
        layers = sorted({layer for _, _, layer in at})
        assert len(at) == len(events) and layers, "every event once"
        for L in layers:
            a, b = (lambda e: at[(e, 0, L)]), (lambda e: at[(e, 1, L)])
            # B's attention and router run while A's dispatch is in flight ...
            assert a("dispatch_issued") < b("attention") < b("dispatch_issued") < a("dispatch_wait"), (rank, L)
            # ... A's experts while B's dispatch is, B's experts while A's combine is ...
            assert b("dispatch_issued") < a("dispatch_done") < a("combine_issued") < b("dispatch_wait"), (rank, L)
            assert a("combine_issued") < b("dispatch_done") < b("combine_issued") < a("combine_wait"), (rank, L)
            # ... and A's next layer while B's combine is.
            if L + 1 in layers:
                assert b("combine_issued") < at[("attention", 0, L + 1)] < b("combine_wait"), (rank, L)


def test_the_command_line_turns_overlap_on_and_metrics_count_split_steps(checkpoints, tmp_path):
    """`moeserve serve --enable-overlap` with low thresholds: a completion equals offline
    generation, and /metrics counts the split steps."""
    import httpx

    from moeserve import LLM
    from server_utils import start_server

    path = str(checkpoints("olmoe"))
    server = start_server(path, "--max-model-len", "128", "--enable-overlap", "--overlap-threshold-decode", "1",
                          "--overlap-threshold-prefill", "2", log_path=str(tmp_path / "log"))
    try:
        body = {"prompt": "the expert router", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
        text = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
        metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    finally:
        server.stop()
    offline = LLM(path, max_model_len=128).generate("the expert router",
                                                     SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    assert text == offline[0].outputs[0].text
    line = next(x for x in metrics.splitlines() if x.startswith("moeserve:micro_batch_split_steps_total"))
    assert float(line.split()[-1]) == 1.0, "the prompt's prefill split; its one-token decodes could not"
