"""Sampler: logits of the rows that end a request's scheduled tokens -> one token each.

Shape legend: N rows (one per sampling request this step), V vocabulary.

Order of operations (vLLM's): min_tokens masks EOS/stop ids; repetition, frequency and
presence penalties; greedy rows take the argmax; the others divide by temperature, apply top-k,
top-p and min-p, and draw by an exponential race (argmax of p / E, E ~ Exp(1)). A seeded
request's noise is a pure function of (seed, number of tokens it has generated), so its tokens do
not depend on which other requests share the batch, nor on preemption. Logprobs are those of the
raw model distribution (before any processing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeserve.sampling_params import SamplingParams


@dataclass
class PenaltyState:
    """A penalised request's token statistics on the device: `output_counts` counts every token
    it has generated (the runner adds each sampled token), `prompt_seen` marks its prompt's."""

    output_counts: torch.Tensor  # [V] fp32, times each token was generated
    prompt_seen: torch.Tensor  # [V] bool, tokens of the prompt

    @classmethod
    def build(cls, token_ids: list[int], num_prompt_tokens: int, vocab_size: int,
              device: torch.device | str) -> PenaltyState:
        out_ids = torch.tensor(token_ids[num_prompt_tokens:], dtype=torch.int64, device=device)
        counts = torch.zeros(vocab_size, device=device).index_add_(0, out_ids, torch.ones(len(out_ids), device=device))
        seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        seen[torch.tensor(token_ids[:num_prompt_tokens], dtype=torch.int64, device=device)] = True
        return cls(counts, seen)

    def add(self, token: int) -> None:
        self.output_counts[token] += 1


@dataclass(frozen=True)
class SamplingRow:
    """What the sampler needs of one request: its tokens so far (prompt then outputs), shared
    with the runner rather than copied, and, for a penalised request, its kept statistics (built
    here from the tokens when absent)."""

    params: SamplingParams
    token_ids: list[int]
    num_prompt_tokens: int
    eos_token_ids: frozenset[int]
    penalty: PenaltyState | None = None

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]


# splitmix64's constants, as signed int64 (torch has no uint64 arithmetic on every device).
_GOLDEN = 0x9E3779B97F4A7C15 - 2**64
_MIX1 = 0xBF58476D1CE4E5B9 - 2**64
_MIX2 = 0x94D049BB133111EB - 2**64


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (>> on int64 is arithmetic)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (multiplication wraps modulo 2^64)."""
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    return z ^ _shift_right(z, 31)


def stream_key(seed: int, counter: int) -> int:
    """One draw's key from (seed, counter), as a signed int64 (the host half of the RNG)."""
    z = (seed * 0x9E3779B1 + counter * 0x85EBCA77 + 0x632BE5AB) % 2**64
    return z - 2**64 if z >= 2**63 else z


def uniform_from_bits(z: torch.Tensor) -> torch.Tensor:
    """int64 bit patterns -> fp32 uniforms strictly inside (0, 1): the top 23 bits plus a half
    (k + 0.5 is exact in fp32 for k < 2^23, so no value rounds to 0 or 1)."""
    return (_shift_right(z, 41).float() + 0.5) * 2.0**-23


def exponential_noise(keys: torch.Tensor, vocab_size: int, rows_per_chunk: int = 16) -> torch.Tensor:
    """keys [n] int64 -> Exp(1) draws [n, V] fp32, each > 0, a pure function of (key, column): a
    counter-based generator (splitmix64 over key + column * golden), so a row's noise depends on
    nothing but its key and takes no torch.Generator, no host round trip and no per-row launch.
    The int64 intermediates are made `rows_per_chunk` rows at a time ([chunk, V] each)."""
    columns = torch.arange(vocab_size, dtype=torch.int64, device=keys.device) * _GOLDEN  # [V]
    out = torch.empty(keys.shape[0], vocab_size, dtype=torch.float32, device=keys.device)
    for start in range(0, keys.shape[0], rows_per_chunk):
        z = _mix(_mix(keys[start : start + rows_per_chunk, None]) + columns[None, :])  # [chunk, V]
        out[start : start + rows_per_chunk] = -torch.log(uniform_from_bits(z))
    return out


@dataclass(frozen=True)
class SampledTokens:
    """The sampler's device results for N rows: the tokens, and, when any row asked for logprobs,
    each row's top-`num_top` raw logprobs and the chosen token's."""

    tokens: torch.Tensor  # [N] int64
    top_ids: torch.Tensor | None = None  # [N, num_top] int64
    top_logprobs: torch.Tensor | None = None  # [N, num_top] fp32
    chosen_logprobs: torch.Tensor | None = None  # [N] fp32


class Sampler:
    """One batched pass per step: greedy rows take one argmax, random rows one filtered softmax and
    one exponential race whose noise is counter-based (a seeded request's key is (seed, tokens it
    has generated); an unseeded row's is (the sampler's seed, step, row)), logprobs one top-k for
    all rows. `sample` stays on the device (no host sync); `__call__` adds the step's single copy
    to the host."""

    def __init__(self, seed: int = 0):
        self._seed = seed
        self._step = 0

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> list[tuple[int, dict[int, float] | None]]:
        out = self.sample(logits, rows)
        tokens = out.tokens.tolist()
        if out.top_ids is None:
            return [(t, None) for t in tokens]
        top_ids, top_lp, chosen = out.top_ids.tolist(), out.top_logprobs.tolist(), out.chosen_logprobs.tolist()
        results: list[tuple[int, dict[int, float] | None]] = []
        for i, r in enumerate(rows):
            n = r.params.logprobs
            if n is None:
                results.append((tokens[i], None))
                continue
            top = dict(zip(top_ids[i][:n], top_lp[i][:n]))
            top[tokens[i]] = chosen[i]
            results.append((tokens[i], top))
        return results

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SampledTokens:
        """logits [N, V] -> the step's tokens on the logits' device, without reading device data
        on the host (what the rows ask for is host data; every value computed stays put)."""
        logits = logits.float()  # [N, V]
        N, V = logits.shape
        device = logits.device
        num_top = max((r.params.logprobs for r in rows if r.params.logprobs is not None), default=None)
        raw_logprobs = torch.log_softmax(logits, dim=-1) if num_top is not None else None

        edits = [i for i, r in enumerate(rows) if r.num_output_tokens < r.params.min_tokens or r.params.penalised]
        if edits:
            logits = logits.clone()
        for i in edits:
            r, p = rows[i], rows[i].params
            if r.num_output_tokens < p.min_tokens:
                banned = [t for t in (*r.eos_token_ids, *p.stop_token_ids) if t < V]
                logits[i, banned] = float("-inf")
            if p.penalised:
                self._penalise(logits[i], r)

        tokens = torch.argmax(logits, dim=-1)  # [N]
        random_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
        if random_rows:
            idx = torch.tensor(random_rows, device=device)
            probs = self._filtered_probs(logits[idx], [rows[i].params for i in random_rows])  # [n, V]
            keys = [stream_key(rows[i].params.seed, rows[i].num_output_tokens) if rows[i].params.seed is not None
                    else stream_key(self._seed, self._step * 1_000_003 + i) for i in random_rows]
            noise = exponential_noise(torch.tensor(keys, dtype=torch.int64, device=device), V)  # [n, V]
            race = torch.where(probs > 0, probs / noise, -1.0)  # a filtered-out token never wins
            tokens = tokens.index_copy(0, idx, torch.argmax(race, dim=-1))
        self._step += 1
        if raw_logprobs is None:
            return SampledTokens(tokens)
        top_lp, top_ids = torch.topk(raw_logprobs, max(num_top, 1), dim=-1)  # [N, num_top] x2
        chosen = raw_logprobs.gather(1, tokens[:, None])[:, 0]  # [N]
        return SampledTokens(tokens, top_ids, top_lp, chosen)

    @staticmethod
    def _penalise(row: torch.Tensor, r: SamplingRow) -> None:
        """In place on one row [V]."""
        p = r.params
        state = r.penalty or PenaltyState.build(r.token_ids, r.num_prompt_tokens, row.shape[0], row.device)
        counts = state.output_counts  # [V]
        if p.repetition_penalty != 1.0:
            seen = (counts > 0) | state.prompt_seen
            penalised = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
            row.copy_(torch.where(seen, penalised, row))
        row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()

    @staticmethod
    def _filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """Temperature, top-k, top-p, min-p, vectorised over rows: logits [n, V] -> probs [n, V]."""
        n, V = logits.shape
        dev = logits.device
        temperature = torch.tensor([p.temperature for p in params], device=dev)[:, None]
        logits = logits / temperature
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # [n, V]
        top_k = torch.tensor([p.top_k or V for p in params], device=dev).clamp(max=V)
        rank = torch.arange(V, device=dev)[None, :]
        drop = rank >= top_k[:, None]
        probs_sorted = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
        top_p = torch.tensor([p.top_p for p in params], device=dev)[:, None]
        drop |= (torch.cumsum(probs_sorted, dim=-1) - probs_sorted) >= top_p  # keeps at least the top token
        min_p = torch.tensor([p.min_p for p in params], device=dev)[:, None]
        drop |= probs_sorted < min_p * probs_sorted[:, :1]
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        filtered = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
        return torch.softmax(filtered, dim=-1)
