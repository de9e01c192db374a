"""The EngineCore in its own process behind the front's AsyncEngine, and the core's seams: typed
messages, the executor, and controllers between steps."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import msgspec
import pytest

from moeserve import LLM, RequestOutputKind, SamplingParams
from moeserve.config import engine_config
from moeserve.engine.core import EngineCore
from moeserve.engine.messages import (
    AbortRequests,
    Codec,
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    EngineStats,
    ExpertLoadStats,
    UtilityCall,
)
from moeserve.entrypoints.async_engine import AsyncEngine
from moeserve.errors import EngineDeadError


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 300))


async def _collect(engine: AsyncEngine, request_id: str, prompt, params) -> tuple[str, tuple[int, ...]]:
    deltas, tokens = [], ()
    async for out in engine.generate(request_id, prompt, params):
        deltas.append(out.outputs[0].delta_text)
        tokens += out.outputs[0].delta_token_ids
        assert out.outputs[0].token_ids == tokens
    return "".join(deltas), tokens


def test_concurrent_streams_through_the_engine_process_match_the_offline_api(checkpoints, prompts):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    config = engine_config(checkpoints("qwen3_moe"), max_model_len=96, block_size=4)

    async def run():
        engine = await AsyncEngine.start(config, "tiny")
        try:
            assert engine.info.pid != __import__("os").getpid()  # the core is another process
            return await asyncio.gather(*(_collect(engine, f"r{i}", {"prompt_token_ids": p}, params)
                                          for i, p in enumerate(prompts)))
        finally:
            engine.shutdown()

    results = _run(run())
    offline = LLM(checkpoints("qwen3_moe"), max_model_len=96).generate([{"prompt_token_ids": p} for p in prompts],
                                                                        params)
    for got, out in zip(results, offline):
        assert got == (out.outputs[0].text, out.outputs[0].token_ids)


def test_output_kinds_carry_the_same_completion_and_metrics_count_every_token(checkpoints, prompts):
    """CUMULATIVE, DELTA (read slowly, so that pending deltas merge) and FINAL_ONLY outputs of one
    request put together the same text, tokens and logprobs, equal to the offline API's. A
    FINAL_ONLY request yields exactly one output, yet the front follows it step by step: its
    progress (`AsyncEngine.generated`) is seen part-way, and every token after the first adds an
    inter-token latency. Each runs alone with no prefix cache, so its steps have the offline
    run's shapes and its logprobs are the offline run's bit for bit."""
    base = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
    config = engine_config(checkpoints("qwen3_moe"), max_model_len=96, block_size=4, enable_prefix_caching=False)
    prompt = {"prompt_token_ids": prompts[0]}

    async def read(engine, request_id, kind, pause):
        outs = []
        async for out in engine.generate(request_id, prompt, replace(base, output_kind=kind)):
            outs.append(out.outputs[0])
            await asyncio.sleep(pause)
        return outs

    async def watch(engine, request_id, seen):
        while True:
            seen.add(engine.generated(request_id))
            await asyncio.sleep(0.001)

    def metric(engine, name):
        return engine.metrics.registry.get_sample_value(name, {"model_name": "tiny"}) or 0

    async def run():
        engine = await AsyncEngine.start(config, "tiny")
        try:
            got = [await read(engine, "c", RequestOutputKind.CUMULATIVE, 0),
                   await read(engine, "d", RequestOutputKind.DELTA, 0.2)]
            itl_before = metric(engine, "moeserve:inter_token_latency_seconds_count")
            seen: set[int | None] = set()
            watcher = asyncio.ensure_future(watch(engine, "f", seen))
            got.append(await read(engine, "f", RequestOutputKind.FINAL_ONLY, 0))
            watcher.cancel()
            itl = metric(engine, "moeserve:inter_token_latency_seconds_count") - itl_before
            return got, seen, itl, metric(engine, "moeserve:generation_tokens_total"), \
                metric(engine, "moeserve:time_to_first_token_seconds_count")
        finally:
            engine.shutdown()

    (cumulative, delta, final), seen, itl, counted, first_tokens = _run(run())
    llm = LLM(checkpoints("qwen3_moe"), max_model_len=96)
    offline = llm.generate([prompt], base)[0].outputs[0]
    n = len(offline.token_ids)
    # the offline API runs every request as FINAL_ONLY: whatever kind it is given, it returns the whole completion
    asked_delta = llm.generate([prompt], replace(base, output_kind=RequestOutputKind.DELTA))[0].outputs[0]
    assert (asked_delta.token_ids, asked_delta.text) == (offline.token_ids, offline.text)
    assert cumulative[-1].token_ids == offline.token_ids and cumulative[-1].text == offline.text
    assert cumulative[-1].logprobs == offline.logprobs
    assert len(final) == 1 and final[0].finished
    assert (final[0].text, final[0].token_ids, final[0].logprobs) == (offline.text, offline.token_ids,
                                                                      offline.logprobs)
    assert len(delta) < n  # some outputs merged while the reader slept
    assert all(c.token_ids == c.delta_token_ids and c.text == c.delta_text for c in delta)
    assert sum((c.token_ids for c in delta), ()) == offline.token_ids
    assert "".join(c.text for c in delta) == offline.text
    assert sum((c.logprobs for c in delta), ()) == offline.logprobs
    assert delta[-1].cumulative_logprob == offline.cumulative_logprob
    assert counted == 3 * n and first_tokens == 3
    assert any(g is not None and 0 < g < n for g in seen), seen  # its progress, part-way
    assert itl == n - 1  # one step, one token, one inter-token latency: none lost to the single output


def test_abort_frees_blocks_bad_input_fails_at_once_and_the_engine_goes_on(checkpoints, prompts):
    config = engine_config(checkpoints("qwen3_moe"), max_model_len=96, block_size=4)

    async def run():
        engine = await AsyncEngine.start(config, "tiny")
        try:
            start = engine.latest_stats.num_free_blocks
            long = SamplingParams(temperature=0, max_tokens=80, ignore_eos=True)
            stream = engine.generate("long", {"prompt_token_ids": prompts[3]}, long)
            first = await stream.__anext__()
            assert not first.finished
            await stream.aclose()  # the caller leaves: the request is aborted
            with pytest.raises(ValueError, match="prompt is empty"):
                await engine.generate("bad", {"prompt_token_ids": []}, long).__anext__()
            after = await _collect(engine, "after", {"prompt_token_ids": prompts[0]}, SamplingParams(max_tokens=3))
            assert len(after[1]) == 3
            for _ in range(100):
                if engine.latest_stats.num_free_blocks == start and engine.latest_stats.num_running == 0:
                    break
                await asyncio.sleep(0.02)
            assert engine.latest_stats.num_free_blocks == start and engine.num_in_flight == 0
        finally:
            engine.shutdown()
        with pytest.raises(EngineDeadError):
            await engine.generate("late", {"prompt_token_ids": prompts[0]}, long).__anext__()

    _run(run())


def test_every_message_survives_the_wire_and_a_malformed_one_is_refused():
    codec = Codec()
    stats = EngineStats(step=3, timestamp=1.5, num_running=2, num_waiting=1, num_waiting_tokens=40,
                        waiting_tokens_by_priority={0: 30, 1: 10}, num_blocks=100, num_free_blocks=60, step_time_s=0.01,
                        num_prefill_tokens=7, num_decode_tokens=2, prefill_tokens_per_s=700.0, decode_tokens_per_s=200.0,
                        step_time_base_s=0.004, step_time_per_token_s=1e-4, prefill_tokens_per_step=3.5,
                        num_requests_received=5, num_preemptions=1,
                        prefix_cache_hits=4, top_k=[2, 1], expert_load=ExpertLoadStats([[1, 2], [3, 0]], [0.5, 0.25], 2))
    messages = [
        EngineCoreRequest("r", [1, 2], SamplingParams(temperature=0.5, stop=("x",), seed=3), (2,), -1),
        AbortRequests(["a", "b"]),
        UtilityCall(7, "set_top_k", [1, None]),
        EngineCoreOutputs([EngineCoreOutput("r", [5], [{5: -0.1, 9: -2.5}], "stop", 2, 16, 0.003)], stats),
    ]
    for message in messages:
        assert codec.decode(codec.encode(message)) == message
    assert stats.kv_usage == pytest.approx(0.4)
    bad = msgspec.msgpack.encode({"request_id": "r", "prompt_token_ids": [1], "eos_token_ids": [],
                                  "sampling_params": {"temperature": -1.0}})
    with pytest.raises(msgspec.ValidationError, match="temperature must be >= 0"):
        codec.decode([b"r", bad])


def test_controllers_run_between_steps_and_change_the_next_step(checkpoints, prompts):
    """A controller sees every step's stats and may act through the core; here it lowers K to 1
    after the second step, which the next step's stats and the model both show."""
    core = EngineCore(engine_config(checkpoints("mixtral"), max_model_len=64))
    seen: list[EngineStats] = []

    class LowerK:
        def between_steps(self, core: EngineCore, stats: EngineStats) -> None:
            seen.append(stats)
            if stats.step == 2:
                core.call("set_top_k", 1)

    core.add_controller(LowerK())
    core.add_request(EngineCoreRequest("r", prompts[4], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
                                       (), 0))
    while core.has_work():
        core.step()
    assert [s.step for s in seen] == [1, 2, 3, 4, 5]
    K, layers = core.model_config.top_k, core.model_config.num_moe_layers
    assert K > 1 and [s.top_k for s in seen] == [[K] * layers] * 2 + [[1] * layers] * 3
    assert seen[0].num_prefill_tokens == len(prompts[4]) and seen[1].num_decode_tokens == 1
    # The K in force reached the worker: each later step routed one expert per token.
    assert all(sum(row) == s.expert_load.num_tokens for s in seen[2:] for row in s.expert_load.logical)
    assert core.executor.collective_rpc("device_name") == ["cpu"]
    with pytest.raises(ValueError, match="top_k must lie in"):
        core.call("set_top_k", K + 1)


def test_one_front_holds_two_engines(checkpoints, prompts):
    """Each hosted model is its own engine process behind its own client; nothing is shared."""
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)

    async def run():
        a, b = await asyncio.gather(
            AsyncEngine.start(engine_config(checkpoints("mixtral"), max_model_len=64), "a"),
            AsyncEngine.start(engine_config(checkpoints("olmoe"), max_model_len=64), "b"))
        try:
            assert a.info.pid != b.info.pid and a.info.top_k != b.info.top_k
            got = await asyncio.gather(_collect(a, "x", {"prompt_token_ids": prompts[2]}, params),
                                       _collect(b, "x", {"prompt_token_ids": prompts[2]}, params))
            b.shutdown()
            assert a.is_alive() and not b.is_alive()
            again = await _collect(a, "y", {"prompt_token_ids": prompts[2]}, params)
            return got, again
        finally:
            a.shutdown()
            b.shutdown()

    (on_a, on_b), again = _run(run())
    for arch, got in (("mixtral", on_a), ("olmoe", on_b)):
        offline = LLM(checkpoints(arch), max_model_len=64).generate({"prompt_token_ids": prompts[2]}, params)[0]
        assert got[1] == offline.outputs[0].token_ids
    assert again == on_a
