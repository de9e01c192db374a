"""Sampler: logits of the rows that end a request's scheduled tokens -> one token each.

Shape legend: N rows (one per sampling request this step), V vocabulary.

Order of operations (vLLM's): min_tokens masks EOS/stop ids; repetition, frequency and
presence penalties; greedy rows take the argmax; the others divide by temperature, apply top-k,
top-p and min-p, and draw. A seeded request's draw uses a generator seeded by (seed, number of
tokens it has generated), so its tokens do not depend on which other requests share the batch,
nor on preemption. Logprobs are those of the raw model distribution (before any processing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeserve.sampling_params import SamplingParams


@dataclass(frozen=True)
class SamplingRow:
    """What the sampler needs of one request: its tokens so far (prompt then outputs), shared
    with the runner rather than copied, since only penalties look past their count."""

    params: SamplingParams
    token_ids: list[int]
    num_prompt_tokens: int
    eos_token_ids: frozenset[int]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]


def _seeded_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed((seed * 0x9E3779B1 + step) % (2**63))


class Sampler:
    def __init__(self, seed: int = 0):
        self._seed = seed
        self._step = 0

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> list[tuple[int, dict[int, float] | None]]:
        logits = logits.float()  # [N, V]
        N, V = logits.shape
        device = logits.device
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(r.params.logprobs is not None for r in rows) else None
        logits = logits.clone()

        for i, r in enumerate(rows):
            p = r.params
            if r.num_output_tokens < p.min_tokens:
                banned = [t for t in (*r.eos_token_ids, *p.stop_token_ids) if t < V]
                logits[i, banned] = float("-inf")
            if p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty:
                self._penalise(logits[i], r)

        greedy = torch.argmax(logits, dim=-1)  # [N]
        tokens = greedy.tolist()
        random_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
        if random_rows:
            idx = torch.tensor(random_rows, device=device)
            probs = self._filtered_probs(logits[idx], [rows[i].params for i in random_rows])  # [n, V]
            for j, i in enumerate(random_rows):
                seed = rows[i].params.seed
                gen = (
                    _seeded_generator(seed, rows[i].num_output_tokens, device)
                    if seed is not None
                    else _seeded_generator(self._seed, self._step * 1_000_003 + i, device)
                )
                noise = torch.empty(V, device=device).exponential_(generator=gen)  # [V]
                tokens[i] = int(torch.argmax(probs[j] / noise))
        self._step += 1

        out: list[tuple[int, dict[int, float] | None]] = []
        for i, r in enumerate(rows):
            if r.params.logprobs is None or raw_logprobs is None:
                out.append((tokens[i], None))
                continue
            top = {}
            if r.params.logprobs:
                values, ids = torch.topk(raw_logprobs[i], r.params.logprobs)
                top = dict(zip(ids.tolist(), values.tolist()))
            top[tokens[i]] = float(raw_logprobs[i, tokens[i]])
            out.append((tokens[i], top))
        return out

    @staticmethod
    def _penalise(row: torch.Tensor, r: SamplingRow) -> None:
        """In place on one row [V]."""
        p, V = r.params, row.shape[0]
        out_ids = torch.tensor(r.output_token_ids, dtype=torch.int64, device=row.device)
        counts = torch.zeros(V, device=row.device).index_add_(0, out_ids, torch.ones(len(out_ids), device=row.device))
        if p.repetition_penalty != 1.0:
            seen = counts > 0
            seen[torch.tensor(r.prompt_token_ids, dtype=torch.int64, device=row.device)] = True
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
