"""The engine against transformers: continuous batching, preemption, chunked prefill, prefix
caching; block accounting; bad input. transformers runs one prompt at a time (the oracle)."""

from __future__ import annotations

import pytest

from moeserve import SamplingParams
from moeserve.config import engine_config
from moeserve.engine.llm_engine import LLMEngine
from moeserve.testing.checkpoints import NEW_ARCHS
from moeserve.testing.equality import GreedyTrace, greedy_divergence
from moeserve.testing.oracle import hf_greedy, load_hf_model

MAX_NEW = 16
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=5)


@pytest.fixture(scope="module")
def hf_traces(checkpoints):
    """Greedy transformers traces per (arch, prompt), computed once."""
    cache: dict = {}

    def get(arch: str, prompt: list[int]) -> GreedyTrace:
        key = (arch, tuple(prompt))
        if key not in cache:
            if arch not in cache:
                cache[arch] = load_hf_model(checkpoints(arch))
            cache[key] = hf_greedy(cache[arch], prompt, MAX_NEW)
        return cache[key]

    return get


def _trace(output) -> GreedyTrace:
    completion = output.outputs[0]
    return GreedyTrace(completion.token_ids, completion.logprobs)


def _run(engine: LLMEngine, prompts: list[list[int]], inject_at: dict[int, list[int]] | None = None,
         params: SamplingParams = GREEDY) -> dict[str, object]:
    """Add prompts[i] for i not in inject_at's values at once, the others at their step numbers."""
    inject_at = inject_at or {}
    later = {i for ids in inject_at.values() for i in ids}
    for i, p in enumerate(prompts):
        if i not in later:
            engine.add_request(str(i), {"prompt_token_ids": p}, params)
    done, step = {}, 0
    while engine.has_unfinished_requests() or any(s >= step for s in inject_at):
        for i in inject_at.get(step, []):
            engine.add_request(str(i), {"prompt_token_ids": prompts[i]}, params)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        step += 1
    return done


def _assert_agree(done, prompts, arch, hf_traces):
    assert len(done) == len(prompts)
    for i, p in enumerate(prompts):
        ours = _trace(done[str(i)])
        assert len(ours.tokens) == MAX_NEW and done[str(i)].outputs[0].finish_reason == "length"
        assert greedy_divergence(ours, hf_traces(arch, p)) is None, f"prompt {i}"


def _many_prompts(prompts):
    """12 prompts of different lengths: the 8 shared ones and 4 more built from them."""
    return prompts + [prompts[7][:20], prompts[4][3:], prompts[6] + prompts[1], prompts[2][::-1]]


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_continuous_batching_with_injected_requests(arch, checkpoints, prompts, hf_traces):
    engine = LLMEngine(engine_config(checkpoints(arch), max_model_len=128, max_num_seqs=6))
    many = _many_prompts(prompts)
    done = _run(engine, many, inject_at={2: [8, 9], 5: [10], 9: [11]})
    _assert_agree(done, many, arch, hf_traces)
    assert engine.core.block_manager.num_free_blocks == engine.core.num_kv_blocks


@pytest.mark.parametrize("arch", NEW_ARCHS)
def test_new_families_under_batching_chunking_and_prefix_caching(arch, checkpoints, prompts, hf_traces):
    """DeepSeek (latent cache: absorbed decodes next to decompressed chunks) and GPT-OSS (sinks,
    sliding layers): injected requests, prompts cut into chunks of 16 tokens, then two prompts
    sharing a cached prefix; every continuation equals transformers' and every block returns."""
    engine = LLMEngine(engine_config(checkpoints(arch), max_model_len=128, max_num_seqs=6, block_size=4,
                                    max_num_batched_tokens=16))
    many = _many_prompts(prompts)
    assert max(len(p) for p in many) > 2 * 16
    _assert_agree(_run(engine, many, inject_at={2: [8, 9], 5: [10]}), many, arch, hf_traces)
    shared = prompts[7] + prompts[4]
    pair = [shared + prompts[1], shared + prompts[5]]
    hits_before = engine.core.block_manager.stats.hits
    _assert_agree(_run(engine, pair[:1]), pair[:1], arch, hf_traces)
    done = _run(engine, pair[1:])
    assert done["0"].num_cached_tokens >= (len(shared) // 4) * 4
    assert engine.core.block_manager.stats.hits > hits_before
    _assert_agree(done, pair[1:], arch, hf_traces)
    assert engine.core.block_manager.num_free_blocks == engine.core.num_kv_blocks


def test_preemption_under_a_tiny_kv_cache(checkpoints, prompts, hf_traces):
    engine = LLMEngine(engine_config(checkpoints("mixtral"), max_model_len=64, block_size=4, num_kv_blocks=20,
                                    enable_prefix_caching=False))
    many = _many_prompts(prompts)
    done = _run(engine, many, inject_at={3: [10, 11]})
    assert engine.core.scheduler.num_preemptions > 0
    _assert_agree(done, many, "mixtral", hf_traces)
    assert engine.core.block_manager.num_free_blocks == 20


def test_chunked_prefill_under_a_small_token_budget(checkpoints, prompts, hf_traces):
    engine = LLMEngine(engine_config(checkpoints("qwen2_moe"), max_model_len=128, max_num_batched_tokens=7))
    many = _many_prompts(prompts)
    assert max(len(p) for p in many) > 4 * 7  # the longest prompt needs five chunks
    seen_partial = []
    original = engine.core.scheduler.schedule

    def schedule():
        out = original()
        assert out.total_num_scheduled_tokens <= 7
        seen_partial.extend(
            r.request_id for r in engine.core.scheduler.running
            if 0 < r.num_computed_tokens + out.num_scheduled_tokens.get(r.request_id, 0) < len(r.prompt_token_ids)
        )
        return out

    engine.core.scheduler.schedule = schedule
    done = _run(engine, many, inject_at={4: [9]})
    assert seen_partial, "some prompt must have been run in several chunks"
    _assert_agree(done, many, "qwen2_moe", hf_traces)


def test_prefix_caching_reuses_a_shared_prefix(checkpoints, prompts, hf_traces):
    engine = LLMEngine(engine_config(checkpoints("olmoe"), max_model_len=128, block_size=4))
    shared = prompts[7] + prompts[4]  # 33 + 13 tokens
    first, second = shared + prompts[1], shared + prompts[5]
    done = _run(engine, [first])
    hits_before = engine.core.block_manager.stats.hits
    done2 = _run(engine, [second, first])
    assert engine.core.block_manager.stats.hits - hits_before >= 2 * (len(shared) // 4)
    assert done2["0"].num_cached_tokens >= (len(shared) // 4) * 4
    assert done2["1"].num_cached_tokens == ((len(first) - 1) // 4) * 4
    _assert_agree({"0": done["0"]}, [first], "olmoe", hf_traces)
    _assert_agree(done2, [second, first], "olmoe", hf_traces)
    assert engine.core.block_manager.num_free_blocks == engine.core.num_kv_blocks


def test_every_block_returns_after_aborts(checkpoints, prompts):
    engine = LLMEngine(engine_config(checkpoints("mixtral"), max_model_len=64, block_size=4, num_kv_blocks=30))
    start = engine.core.block_manager.num_free_blocks
    params = SamplingParams(temperature=0.7, seed=1, max_tokens=20, ignore_eos=True)
    for i, p in enumerate(_many_prompts(prompts)):
        engine.add_request(str(i), {"prompt_token_ids": p}, params)
    for step in range(12):
        engine.step()
        if step in (1, 4, 8):
            running = [r.request_id for r in engine.core.scheduler.running]
            waiting = [r.request_id for _, r in engine.core.scheduler.waiting if not r.status.finished]
            for req_id in running[:1] + waiting[:1]:
                engine.abort_request(req_id)
    engine.abort_request("no-such-request")
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.core.block_manager.num_free_blocks == start
    engine.step()  # the runner forgets finished requests at the next step
    assert not engine.core.scheduler.requests and not engine.core.executor.worker.runner.requests


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"prompt_token_ids": list(range(200))}, "max_model_len=64"),
        ({"prompt_token_ids": []}, "prompt is empty"),
        ("", "prompt is empty"),
        ({"prompt_token_ids": [1, 2, 512]}, "token id 512 is outside the vocabulary"),
        ({"prompt_token_ids": [1, -3]}, "token id -3 is outside the vocabulary"),
    ],
)
def test_bad_prompts_fail_alone(bad, message, checkpoints, prompts):
    engine = LLMEngine(engine_config(checkpoints("mixtral"), max_model_len=64))
    engine.add_request("good-0", {"prompt_token_ids": prompts[0]}, SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match=message):
        engine.add_request("bad", bad, SamplingParams(max_tokens=4))
    engine.add_request("good-1", {"prompt_token_ids": prompts[1]}, SamplingParams(max_tokens=4))
    finished = set()
    while engine.has_unfinished_requests():
        finished |= {o.request_id for o in engine.step() if o.finished}
    assert finished == {"good-0", "good-1"}


@pytest.mark.parametrize(
    "params, message",
    [
        ({"max_tokens": 0}, "max_tokens must be >= 1"),
        ({"max_tokens": -5}, "max_tokens must be >= 1"),
        ({"temperature": -1}, "temperature must be >= 0"),
        ({"top_p": 0}, r"top_p must be in \(0, 1\]"),
        ({"best_of": 3}, "unknown sampling field.*best_of"),
        ({"logprobs": 50}, r"logprobs must be in \[0, 20\]"),
    ],
)
def test_bad_sampling_params_fail_alone(params, message, checkpoints, prompts):
    engine = LLMEngine(engine_config(checkpoints("mixtral"), max_model_len=64))
    engine.add_request("good", {"prompt_token_ids": prompts[0]}, SamplingParams(max_tokens=3))
    with pytest.raises(ValueError, match=message):
        engine.add_request("bad", {"prompt_token_ids": prompts[1]}, params)
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert [o.request_id for o in outs if o.finished] == ["good"]


def test_priority_orders_admission(checkpoints, prompts):
    engine = LLMEngine(engine_config(checkpoints("mixtral"), max_model_len=64, max_num_seqs=1))
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    engine.add_request("low-first", {"prompt_token_ids": prompts[1]}, params, priority=5)
    engine.add_request("low-second", {"prompt_token_ids": prompts[2]}, params, priority=5)
    engine.add_request("high", {"prompt_token_ids": prompts[3]}, params, priority=0)
    order = []
    while engine.has_unfinished_requests():
        order += [o.request_id for o in engine.step() if o.finished]
    assert order == ["high", "low-first", "low-second"]  # priority first, then arrival (FCFS)


def test_preemption_takes_the_lowest_priority_first(checkpoints, prompts):
    # Room for ~1.5 sequences: one of the two must be preempted as they grow.
    engine = LLMEngine(engine_config(checkpoints("mixtral"), max_model_len=48, block_size=4, num_kv_blocks=14,
                                    enable_prefix_caching=False))
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    engine.add_request("early-low", {"prompt_token_ids": prompts[4][:6]}, params, priority=1)
    engine.add_request("late-high", {"prompt_token_ids": prompts[5][:6]}, params, priority=0)
    requests = dict(engine.core.scheduler.requests)
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.core.scheduler.num_preemptions > 0
    assert requests["late-high"].num_preemptions == 0 and requests["early-low"].num_preemptions > 0


def test_a_failed_forward_leaves_no_prefix_cache_entries(checkpoints, prompts):
    """The blocks a failed step was to fill were never written: the same prompt again must not
    reuse them, and its output equals a fresh engine's."""
    from moeserve.engine.faults import FaultInjector, FaultPlan

    config = engine_config(checkpoints("mixtral"), max_model_len=128, block_size=4)
    prompt = prompts[7] + prompts[4]  # 46 tokens: 11 full blocks
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=0)
    fresh = _run(LLMEngine(config), [prompt], params=params)["0"]

    engine = LLMEngine(config, faults=FaultInjector(FaultPlan.parse("forward@1")))
    engine.add_request("doomed", {"prompt_token_ids": prompt}, params)
    failures = engine.step()
    assert [type(f).__name__ for f in failures] == ["RequestFailure"] and "injected" in failures[0].message
    assert engine.core.block_manager.num_free_blocks == engine.core.num_kv_blocks
    again = _run(engine, [prompt], params=params)["0"]
    assert again.num_cached_tokens == 0
    assert again.outputs[0].token_ids == fresh.outputs[0].token_ids
    assert again.outputs[0].logprobs == fresh.outputs[0].logprobs


def test_expert_load_off_records_nothing(checkpoints, prompts):
    engine = LLMEngine(engine_config(checkpoints("mixtral"), max_model_len=64, expert_metrics="off"))
    _run(engine, prompts[:2])
    model = engine.core.executor.worker.model
    assert not model.load.enabled and int(model.expert_load().logical.sum()) == 0
    engine.add_request("x", {"prompt_token_ids": prompts[0]}, SamplingParams(max_tokens=2))
    assert engine.core.step().stats.expert_load is None


def test_requests_of_different_k_in_one_batch_each_equal_transformers_at_their_k(checkpoints, prompts):
    """moe_top_k = 1 computes what the checkpoint saved with num_experts_per_tok = 1 computes
    (transformers, the equality rule); requests at K = 1 and at the model's K share batches and
    each equals its own oracle."""
    from moeserve.testing.oracle import hf_greedy, load_hf_model

    for arch in ("mixtral", "qwen3_moe"):
        path = checkpoints(arch)
        engine = LLMEngine(engine_config(path, max_model_len=128, block_size=4))
        K = engine.core.model_config.top_k
        mixed = [SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=5,
                                moe_top_k=1 if i % 2 else None) for i in range(len(prompts))]
        for i, (p, params) in enumerate(zip(prompts, mixed)):
            engine.add_request(str(i), {"prompt_token_ids": p}, params)
        done = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out
        oracles = {1: load_hf_model(path, num_experts_per_tok=1), K: load_hf_model(path)}
        for i, p in enumerate(prompts):
            k = 1 if i % 2 else K
            expected = hf_greedy(oracles[k], p, MAX_NEW)
            problem = greedy_divergence(_trace(done[str(i)]), expected)
            assert problem is None, f"{arch} prompt {i} at K={k}: {problem}"
            assert done[str(i)].outputs[0].num_degraded_tokens == 0  # asked for K = 1: not degraded


def test_kv_computed_at_one_k_is_never_reused_at_another(checkpoints, prompts):
    engine = LLMEngine(engine_config(checkpoints("mixtral"), max_model_len=128, block_size=4))
    prompt = prompts[7] + prompts[4]  # 11 full blocks
    at = {k: SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=5, moe_top_k=k) for k in (1, 3)}
    fresh = {k: _run(LLMEngine(engine_config(checkpoints("mixtral"), max_model_len=128, block_size=4)), [prompt],
                     params=at[k])["0"] for k in (1, 3)}
    first = _run(engine, [prompt], params=at[3])["0"]
    other_k = _run(engine, [prompt], params=at[1])["0"]
    same_k = _run(engine, [prompt], params=at[1])["0"]
    assert first.num_cached_tokens == 0 and other_k.num_cached_tokens == 0  # K = 3 blocks are not K = 1 blocks
    assert same_k.num_cached_tokens == (len(prompt) - 1) // 4 * 4  # two K = 1 requests share
    for out, k in ((first, 3), (other_k, 1)):  # computed whole, as the fresh runs were: bit for bit
        assert out.outputs[0].token_ids == fresh[k].outputs[0].token_ids
        assert out.outputs[0].logprobs == fresh[k].outputs[0].logprobs
    # From cached blocks the last bits of a logprob may move (other matmul shapes): the equality rule.
    assert greedy_divergence(_trace(same_k), _trace(fresh[1])) is None

