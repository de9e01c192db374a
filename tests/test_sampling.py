"""Sampler, detokenizer and the sampling behaviour seen through the offline API."""

from __future__ import annotations

import pytest
import torch

from moeserve import LLM, SamplingParams
from moeserve.engine.detokenizer import IncrementalDetokenizer
from moeserve.worker.sampler import Sampler, SamplingRow
from moeserve.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def llm(checkpoints):
    return LLM(checkpoints("mixtral"), max_model_len=128, block_size=4)


def _row(params: SamplingParams, outputs=(), prompt=(), eos=frozenset({2})) -> SamplingRow:
    return SamplingRow(params, list(prompt) + list(outputs), len(prompt), eos)


# ---- the sampler on hand-made logits ----

def _draw(logits: list[float], params: SamplingParams, n: int = 300) -> set[int]:
    sampler = Sampler(seed=0)
    row = torch.tensor([logits])
    return {sampler(row, [_row(params)])[0][0] for _ in range(n)}


def test_filters_restrict_the_draw():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05])).tolist()
    assert _draw(logits, SamplingParams()) == {0, 1, 2, 3}
    assert _draw(logits, SamplingParams(top_k=2)) == {0, 1}
    assert _draw(logits, SamplingParams(top_p=0.6)) == {0, 1}
    assert _draw(logits, SamplingParams(min_p=0.5)) == {0, 1}  # p >= 0.25
    assert _draw(logits, SamplingParams(temperature=0.05)) == {0}
    assert _draw(logits, SamplingParams(temperature=0)) == {0}


def _expected(probs: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The distribution the documented filters define, written independently of the sampler:
    temperature, then top-k, then top-p (keep a token while the mass strictly above it is below
    top_p), then min-p (relative to the most likely token after top-k)."""
    q = probs ** (1 / p.temperature)
    q = q / q.sum()
    order = sorted(range(len(q)), key=lambda i: -float(q[i]))
    keep = set(order[: p.top_k or len(q)])
    mass = sum(float(q[i]) for i in keep)
    above, kept_p = 0.0, set()
    for i in order:
        if i in keep and above < p.top_p:
            kept_p.add(i)
        if i in keep:
            above += float(q[i]) / mass
    top = max(float(q[i]) for i in keep)
    final = [i for i in kept_p if float(q[i]) >= p.min_p * top]
    out = torch.zeros_like(q)
    out[final] = q[final]
    return out / out.sum()


def _chi_square_p(counts: torch.Tensor, expected: torch.Tensor) -> float:
    """p-value of Pearson's chi-square; 0 if a token with zero expected probability was drawn."""
    n = counts.sum()
    support = expected > 0
    if counts[~support].sum() > 0:
        return 0.0
    e = expected[support] * n
    stat = ((counts[support] - e) ** 2 / e).sum()
    dof = int(support.sum()) - 1
    if dof == 0:
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat.double() / 2))


FREQUENCY_CASES = [
    SamplingParams(),
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.6),
    SamplingParams(top_k=3),
    SamplingParams(top_p=0.8),
    SamplingParams(min_p=0.2),
    SamplingParams(temperature=0.8, top_k=5, top_p=0.9, min_p=0.1),
]


@pytest.mark.parametrize("params", FREQUENCY_CASES, ids=lambda p: f"t{p.temperature}-k{p.top_k}-p{p.top_p}-m{p.min_p}")
def test_draw_frequencies_match_the_filtered_distribution(params):
    """20k draws (one batch of seeded rows) against the distribution the filters define:
    Pearson's chi-square p > 1e-3. The same draws must reject a subtly wrong distribution
    (temperature ignored, or one token more or fewer kept), so the test has the power to
    catch a sampler bug, not just to pass."""
    probs = torch.tensor([0.30, 0.22, 0.16, 0.12, 0.09, 0.06, 0.03, 0.02])
    n = 20_000
    logits = torch.log(probs).expand(n, -1)
    rows = [_row(SamplingParams(**{**params.__dict__, "seed": i})) for i in range(n)]
    drawn = torch.tensor([t for t, _ in Sampler()(logits, rows)])
    counts = torch.bincount(drawn, minlength=len(probs)).double()
    expected = _expected(probs, params)
    assert _chi_square_p(counts, expected) > 1e-3, (counts / n, expected)
    wrong = [_expected(probs, SamplingParams(**{**params.__dict__, "temperature": 1.0}))] if params.temperature != 1 \
        else []
    kept = int((expected > 0).sum())
    for k in (kept - 1, kept + 1):
        if 1 <= k <= len(probs):
            w = torch.zeros_like(probs)
            top = torch.argsort(-probs)[:k]
            w[top] = probs[top] ** (1 / params.temperature)
            wrong.append(w / w.sum())
    for w in wrong:
        assert _chi_square_p(counts, w) < 1e-3


def test_penalties_and_min_tokens():
    sampler = Sampler()
    logits = torch.tensor([[2.0, 1.9, 0.0, -1.0]])
    greedy = SamplingParams(temperature=0)
    assert sampler(logits, [_row(greedy, outputs=[0])])[0][0] == 0
    rep = SamplingParams(temperature=0, repetition_penalty=1.2)
    assert sampler(logits, [_row(rep, outputs=[0])])[0][0] == 1  # 2.0 / 1.2 < 1.9
    assert sampler(logits, [_row(rep, prompt=[0])])[0][0] == 1  # prompt tokens count as seen
    freq = SamplingParams(temperature=0, frequency_penalty=0.06)
    assert sampler(logits, [_row(freq, outputs=[0])])[0][0] == 0  # 2.0 - 0.06 > 1.9
    assert sampler(logits, [_row(freq, outputs=[0, 0])])[0][0] == 1  # 2.0 - 0.12 < 1.9
    pres = SamplingParams(temperature=0, presence_penalty=0.2)
    assert sampler(logits, [_row(pres, outputs=[0])])[0][0] == 1
    eos_first = torch.tensor([[0.0, 0.0, 5.0, 1.0]])  # EOS (2) is the argmax
    assert sampler(eos_first, [_row(SamplingParams(temperature=0, min_tokens=3), outputs=[1])])[0][0] == 3
    assert sampler(eos_first, [_row(SamplingParams(temperature=0, min_tokens=1), outputs=[1])])[0][0] == 2


def test_logprobs_are_the_raw_distribution():
    sampler = Sampler()
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    token, top = sampler(logits, [_row(SamplingParams(temperature=0, logprobs=2, repetition_penalty=1.5))])[0]
    expected = torch.log_softmax(logits[0], -1)
    assert token == 1 and set(top) == {1, 2}
    assert top[2] == pytest.approx(expected[2].item())
    token, top = sampler(logits, [_row(SamplingParams(temperature=0, logprobs=0), outputs=[])])[0]
    assert top == {1: pytest.approx(expected[1].item())}  # logprobs=0: the sampled token only


# ---- detokenizer ----

def test_multibyte_characters_come_out_whole(checkpoints):
    tok = Tokenizer(checkpoints("mixtral"))
    text = "日本語 🙂🚀 über ∑"
    ids = tok.encode(text, add_special_tokens=False)
    pieces = [tok.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in pieces), "the test needs a character split across tokens"
    detok = IncrementalDetokenizer(tok, [], SamplingParams())
    deltas = []
    for i in ids:
        detok.add_token(i)
        assert "\ufffd" not in detok.text
        deltas.append(detok.take_delta(finished=False))
    assert detok.text == text and "".join(deltas) == text


def test_stop_string_across_tokens_is_cut_and_held_back(checkpoints):
    tok = Tokenizer(checkpoints("mixtral"))
    text = "def f_12(x, y=3):\n    return the kernel"
    ids = tok.encode(text, add_special_tokens=False)
    # A stop string that starts inside one token and ends inside a later one.
    pieces = [tok.decode([i]) for i in ids]
    k = next(k for k in range(len(pieces) - 1) if len(pieces[k]) >= 2 and len(pieces[k + 1]) >= 2)
    start = len("".join(pieces[:k])) + 1
    stop = text[start : start + len(pieces[k]) + 1]
    detok = IncrementalDetokenizer(tok, [], SamplingParams(stop=[stop]))
    streamed, found = "", None
    for i in ids:
        found = detok.add_token(i)
        streamed += detok.take_delta(finished=found is not None)
        assert stop not in streamed
        if found:
            break
    assert found == stop
    assert detok.text == text[:start] == streamed


# ---- through the offline API ----

def test_seeded_requests_repeat_in_any_batch_composition(llm, prompts):
    target = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=24, ignore_eos=True)
    alone = llm.generate({"prompt_token_ids": prompts[3]}, target)[0].outputs[0].token_ids
    noisy = SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True)
    batch = [{"prompt_token_ids": p} for p in prompts]
    outs = llm.generate(batch[:3] + [batch[3]] + batch[4:], [noisy] * 3 + [target] + [noisy] * 4)
    assert outs[3].outputs[0].token_ids == alone
    other_seed = llm.generate({"prompt_token_ids": prompts[3]}, SamplingParams(**{**target.__dict__, "seed": 99}))
    assert other_seed[0].outputs[0].token_ids != alone


def test_seeded_request_survives_preemption(checkpoints, prompts):
    target = SamplingParams(temperature=0.9, seed=7, max_tokens=30, ignore_eos=True)
    roomy = LLM(checkpoints("mixtral"), max_model_len=64)
    expected = roomy.generate({"prompt_token_ids": prompts[6]}, target)[0].outputs[0].token_ids
    tight = LLM(checkpoints("mixtral"), max_model_len=64, block_size=4, num_kv_blocks=18)
    batch = [{"prompt_token_ids": p} for p in prompts]
    params = [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)] * len(batch)
    params[6] = target
    outs = tight.generate(batch, params)
    assert tight.engine.core.scheduler.num_preemptions > 0
    assert outs[6].outputs[0].token_ids == expected


def test_n_samples_share_the_prompt_blocks(llm, prompts):
    engine = llm.engine
    prompt = (prompts[7] + prompts[6])[::-1]  # 58 tokens no other test uses: 14 full blocks of 4
    hits = engine.core.block_manager.stats.hits
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=6))[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert engine.core.block_manager.stats.hits - hits == 2 * ((len(prompt) - 1) // 4)
    assert len({o.token_ids for o in out.outputs}) > 1  # seeds seed+i: different samples
    assert engine.core.block_manager.num_free_blocks == engine.core.num_kv_blocks


def test_final_text_is_the_plain_decode_of_the_tokens(llm, prompts):
    """The random model emits byte tokens that never complete a character: they must come out
    as U+FFFD, as a one-shot decode gives, and not be held back for ever."""
    tok = llm.get_tokenizer()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    assert any("\ufffd" in o.outputs[0].text for o in outs)
    for o in outs:
        assert o.outputs[0].text == tok.decode(list(o.outputs[0].token_ids))


def test_stop_token_ids_and_eos(llm, prompts):
    free = llm.generate({"prompt_token_ids": prompts[2]}, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    tokens = free[0].outputs[0].token_ids
    stopper = tokens[4]
    out = llm.generate({"prompt_token_ids": prompts[2]},
                       SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stopper]))[0].outputs[0]
    cut = tokens.index(stopper) + 1
    assert out.token_ids == tokens[:cut] and out.finish_reason == "stop" and out.stop_reason == stopper


def test_stop_string_through_the_engine(llm, prompts):
    free = llm.generate({"prompt_token_ids": prompts[1]},
                        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0].outputs[0]
    assert len(free.text) > 10
    stop = free.text[5:8]
    out = llm.generate({"prompt_token_ids": prompts[1]},
                       SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == free.text[: free.text.index(stop)]


def test_generate_accepts_strings_and_chat(llm):
    tok = llm.get_tokenizer()
    out = llm.generate("the expert router", SamplingParams(temperature=0, max_tokens=5))[0]
    assert out.prompt == "the expert router" and list(out.prompt_token_ids) == tok.encode("the expert router")
    messages = [{"role": "user", "content": "hello"}]
    chat = llm.chat(messages, SamplingParams(temperature=0, max_tokens=5))[0]
    rendered = tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)
    assert list(chat.prompt_token_ids) == rendered
    direct = llm.generate({"prompt_token_ids": rendered}, SamplingParams(temperature=0, max_tokens=5))[0]
    assert chat.outputs[0].token_ids == direct.outputs[0].token_ids
    with pytest.raises(TypeError, match="unknown engine setting.*tensor_parallel_size"):
        LLM("unused", tensor_parallel_size=2)


def test_penalty_state_kept_token_by_token_equals_the_history():
    from moeserve.worker.sampler import PenaltyState

    tokens = [1, 2, 3, 4, 4, 5]
    kept = PenaltyState.build(tokens[:4], 3, 8, "cpu")
    kept.add(4)
    kept.add(5)
    rebuilt = PenaltyState.build(tokens, 3, 8, "cpu")
    assert torch.equal(kept.output_counts, rebuilt.output_counts) and torch.equal(kept.prompt_seen, rebuilt.prompt_seen)


def test_engine_penalties_follow_the_whole_history(llm, checkpoints, prompts):
    """The runner's kept statistics give the tokens a full rebuild from the history gives: a
    reference loop recomputes the logits and samples without any kept state."""
    from moeserve.checkpoint import load_model
    from moeserve.testing.runner import ReferenceRunner

    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, repetition_penalty=1.4,
                            frequency_penalty=0.3, presence_penalty=0.2)
    prompt = prompts[4]
    got = llm.generate({"prompt_token_ids": prompt}, params)[0].outputs[0].token_ids
    ref, sampler, tokens = ReferenceRunner(load_model(checkpoints("mixtral"))), Sampler(), list(prompt)
    step = {0: prompt}
    for _ in range(16):
        logits = ref.step(step)[0][-1:]
        token = sampler(logits, [_row(params, outputs=tokens[len(prompt):], prompt=prompt)])[0][0]
        tokens.append(token)
        step = {0: [token]}
    assert list(got) == tokens[len(prompt):]
    assert len(set(got)) > 4  # the penalties bite: greedy alone repeats this model's few favourites


def test_noise_uniforms_stay_inside_the_unit_interval():
    """The extreme bit patterns map strictly inside (0, 1): a uniform of 1.0 would make the noise
    0 and let a filtered-out token (probability 0) win the race as 0 / 0."""
    from moeserve.worker.sampler import exponential_noise, uniform_from_bits

    extremes = uniform_from_bits(torch.tensor([0, -1, 2**62, -(2**63)], dtype=torch.int64))
    assert bool(((extremes > 0) & (extremes < 1)).all()), extremes
    noise = exponential_noise(torch.arange(40, dtype=torch.int64), 5000, rows_per_chunk=7)
    assert bool((noise > 0).all()) and abs(float(noise.mean()) - 1) < 0.01
    assert torch.equal(noise[13], exponential_noise(torch.tensor([13]), 5000)[0])  # a row's noise is its key's
