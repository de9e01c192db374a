"""EngineCore: the step loop on its own thread, driven by concurrent callers."""

from __future__ import annotations

import threading

import pytest

from moeserve import LLM, SamplingParams
from moeserve.engine.core import EngineCoreClient
from moeserve.engine.llm_engine import EngineConfig


@pytest.fixture
def client(checkpoints):
    c = EngineCoreClient(EngineConfig(checkpoints("qwen3_moe"), max_model_len=96, block_size=4))
    yield c
    c.shutdown()
    assert not c.is_alive()


def test_concurrent_streams_match_the_offline_api(client, checkpoints, prompts):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    results: dict[int, tuple[str, tuple[int, ...]]] = {}

    def consume(i: int) -> None:
        deltas, tokens = [], ()
        for out in client.add_request(f"r{i}", {"prompt_token_ids": prompts[i]}, params):
            deltas.append(out.outputs[0].delta_text)
            tokens += out.outputs[0].delta_token_ids
            assert out.outputs[0].token_ids == tokens
        results[i] = ("".join(deltas), tokens)

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    offline = LLM(checkpoints("qwen3_moe"), max_model_len=96).generate(
        [{"prompt_token_ids": p} for p in prompts], params
    )
    for i, out in enumerate(offline):
        assert results[i] == (out.outputs[0].text, out.outputs[0].token_ids)


def test_abort_frees_blocks_and_the_loop_goes_on(client, prompts):
    engine = client.engine
    start = engine.block_manager.num_free_blocks
    long = SamplingParams(temperature=0, max_tokens=80, ignore_eos=True)
    stream = client.add_request("long", {"prompt_token_ids": prompts[3]}, long)
    first = stream.get(timeout=60)
    assert not first.finished
    client.abort("long")
    out = client.add_request("after", {"prompt_token_ids": prompts[0]}, SamplingParams(max_tokens=3))
    assert [o.finished for o in out][-1]
    assert engine.block_manager.num_free_blocks == start


def test_bad_request_raises_on_the_callers_thread(client, prompts):
    with pytest.raises(ValueError, match="prompt is empty"):
        client.add_request("bad", {"prompt_token_ids": []})
    ok = list(client.add_request("ok", {"prompt_token_ids": prompts[1]}, SamplingParams(max_tokens=2)))
    assert ok[-1].finished and client.is_alive()
