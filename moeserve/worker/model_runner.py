"""ModelRunner: SchedulerOutput -> flat batch tensors -> model -> ModelRunnerOutput.

It keeps its own copy of each running request's tokens and block table, built from the first
NewRequestData and kept current from the diffs (new blocks) and its own samples, so per step
only the diffs cross from the scheduler. A request is sampled when its scheduled tokens reach
the end of its known tokens; a prefill chunk that stops short produces nothing.

Under expert parallelism every worker gets the whole SchedulerOutput and runs the requests of
its own rank; a worker with none still joins the step's MoE collectives (`forward_idle`). When
the step carries a micro-batch cut, the rank's batch runs as two micro-batches whose
all-to-alls overlap each other's compute (model/overlap.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from moeserve.engine.faults import FaultInjector
from moeserve.engine.messages import ExpertLoadStats
from moeserve.engine.scheduler import SchedulerOutput
from moeserve.kernels import cpu_attention
from moeserve.model.attention import AttentionMetadata, PagedKVCache, Workspace
from moeserve.model.decoder import MoEForCausalLM, TokenTopK
from moeserve.model.overlap import MicroBatch, OverlapTrace, cut_sequences
from moeserve.sampling_params import SamplingParams
from moeserve.worker.cuda_graph import DecodeGraphs, DecodeRow
from moeserve.worker.sampler import PenaltyState, Sampler, SamplingRow


@dataclass(frozen=True)
class ModelRunnerOutput:
    """What one step produced: a token (and its logprobs) for each request whose scheduled
    tokens reached the end of its known tokens, in batch order, and the step's routing counts."""

    req_ids: list[str]
    sampled_token_ids: list[int]
    logprobs: list[dict[int, float] | None]
    expert_load: ExpertLoadStats | None = None

    @classmethod
    def empty(cls) -> ModelRunnerOutput:
        return cls([], [], [])


@dataclass
class _RunnerRequest:
    token_ids: list[int]
    num_prompt_tokens: int
    block_table: list[int]
    num_computed_tokens: int
    params: SamplingParams
    eos_token_ids: frozenset[int]
    penalty: PenaltyState | None = None  # made at its first sample when the request is penalised


class ModelRunner:
    def __init__(self, model: MoEForCausalLM, kv_cache: PagedKVCache, sampler: Sampler,
                 faults: FaultInjector | None = None, rank: int = 0, decode_graphs: DecodeGraphs | None = None):
        self.model = model
        self.rank = rank
        self.faults = faults or FaultInjector()
        self.kv_cache = kv_cache
        self.sampler = sampler
        self.device = next(model.parameters()).device
        self.requests: dict[str, _RunnerRequest] = {}
        self.workspace = Workspace()  # the torch attention path's context buffers, kept across steps
        # Decodes on the torch path cost the padded context they read: cut them into length
        # buckets (the cpu backend's kernel reads no padding; what it does not take is torch's).
        self.split_decodes = model.attention_backend == "torch" or (
            model.attention_backend == "cpu" and not cpu_attention.takes_decodes(model.config, next(model.parameters()).dtype))
        # With decode graphs: each request's persistent row of their block tables (its diffs
        # flushed to the device every step, graph or not) and the free rows.
        self.decode_graphs = decode_graphs
        self.rows: dict[str, int] = {}
        self.free_rows = list(range(decode_graphs.inputs.padding_row))[::-1] if decode_graphs else []

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        for req_id in out.finished_request_ids:
            self.requests.pop(req_id, None)
            if req_id in self.rows:
                self.free_rows.append(self.rows.pop(req_id))
        if self.model.ep is not None:
            out = _for_rank(out, self.rank)
        for new in out.new_requests:
            self.requests[new.request_id] = _RunnerRequest(
                list(new.token_ids), new.num_prompt_tokens, list(new.block_table), new.num_computed_tokens,
                new.sampling_params, new.eos_token_ids,
            )
            if self.decode_graphs is not None:
                row = self.rows.get(new.request_id)
                if row is None:
                    row = self.rows[new.request_id] = self.free_rows.pop()
                self.decode_graphs.inputs.set_blocks(row, 0, list(new.block_table))
        for diff in out.cached_requests:
            state = self.requests[diff.request_id]
            if self.decode_graphs is not None and diff.new_block_ids:
                self.decode_graphs.inputs.set_blocks(self.rows[diff.request_id], len(state.block_table),
                                                     list(diff.new_block_ids))
            state.block_table.extend(diff.new_block_ids)
            assert state.num_computed_tokens == diff.num_computed_tokens, "runner and scheduler disagree"
        if self._graph_step(out):
            return self._decode_from_graphs(out)
        if self.decode_graphs is not None:
            self.decode_graphs.inputs.flush()
        if not out.num_scheduled_tokens:
            if self.model.ep is not None and out.runs:
                self.faults.check("forward")
                self.model.forward_idle()
                return ModelRunnerOutput([], [], [], self._expert_load())
            return ModelRunnerOutput.empty()

        ids: list[int] = []
        query_lens, seq_lens, tables, sample_at, sample_ids = [], [], [], [], []
        for req_id, n in out.num_scheduled_tokens.items():
            state = self.requests[req_id]
            start = state.num_computed_tokens
            ids.extend(state.token_ids[start : start + n])
            query_lens.append(n)
            seq_lens.append(start + n)
            tables.append(state.block_table)
            if start + n == len(state.token_ids):
                sample_at.append(len(ids) - 1)
                sample_ids.append(req_id)
        input_ids = torch.tensor(ids, dtype=torch.int64, device=self.device)
        token_top_k = self._token_top_k(out)
        cut = out.micro_batch_cut[self.rank] if out.micro_batch_cut is not None else None
        self.faults.check("forward")
        if cut is None:
            meta = AttentionMetadata.build(query_lens, seq_lens, tables, self.kv_cache.block_size, self.device,
                                           self.workspace, self.split_decodes)
            hidden = self.model(input_ids, meta, self.kv_cache, token_top_k)  # [T, D]
        else:
            batches = self._micro_batches(input_ids, query_lens, seq_lens, tables, token_top_k, cut)
            trace = None
            if self.faults.armed("split"):
                trace = OverlapTrace(hook=lambda event, mb, layer: self.faults.check("split")
                                     if (event, mb, layer) == ("attention", 1, 0) else None)
            hidden = self.model.forward_micro_batches(batches, self.kv_cache, trace)  # [T, D]

        for req_id, n in out.num_scheduled_tokens.items():
            self.requests[req_id].num_computed_tokens += n
        load = self._expert_load()
        if not sample_ids:
            return ModelRunnerOutput([], [], [], load)
        logits = self.model.compute_logits(hidden[torch.tensor(sample_at, device=self.device)])  # [N, V]
        return self._sample(logits, sample_ids, load)

    def _graph_step(self, out: SchedulerOutput) -> bool:
        """Whether this step runs on the decode graphs: every scheduled request decodes one token
        that is then sampled, no micro-batch split, and the batch fits the largest bucket."""
        graphs = self.decode_graphs
        if graphs is None or out.micro_batch_cut is not None or not out.num_scheduled_tokens \
                or len(out.num_scheduled_tokens) > graphs.max_batch:
            return False
        return all(n == 1 and self.requests[r].num_computed_tokens + 1 == len(self.requests[r].token_ids)
                   for r, n in out.num_scheduled_tokens.items())

    def _decode_from_graphs(self, out: SchedulerOutput) -> ModelRunnerOutput:
        K, B = self.model.config.top_k, self.kv_cache.block_size
        rows = []
        for req_id in out.num_scheduled_tokens:
            s = self.requests[req_id]
            pos = s.num_computed_tokens
            asked, runs = out.top_k.get(req_id, (K, K))
            rows.append(DecodeRow(s.token_ids[pos], pos, s.block_table[pos // B] * B + pos % B, self.rows[req_id],
                                  asked, runs))
        self.faults.check("forward")
        logits = self.decode_graphs.run(rows)  # [N, V]
        sample_ids = list(out.num_scheduled_tokens)
        for req_id in sample_ids:
            self.requests[req_id].num_computed_tokens += 1
        load = self._expert_load()
        return self._sample(logits, sample_ids, load)

    def _sample(self, logits: torch.Tensor, sample_ids: list[str], load: ExpertLoadStats | None) -> ModelRunnerOutput:
        rows = []
        for req_id in sample_ids:
            s = self.requests[req_id]
            if s.penalty is None and s.params.penalised:
                s.penalty = PenaltyState.build(s.token_ids, s.num_prompt_tokens, logits.shape[1], logits.device)
            rows.append(SamplingRow(s.params, s.token_ids, s.num_prompt_tokens, s.eos_token_ids, s.penalty))
        sampled = self.sampler(logits, rows)
        for req_id, (token, _) in zip(sample_ids, sampled):
            s = self.requests[req_id]
            s.token_ids.append(token)
            if s.penalty is not None:
                s.penalty.add(token)
        return ModelRunnerOutput(sample_ids, [t for t, _ in sampled], [lp for _, lp in sampled], load)

    def _micro_batches(self, input_ids: torch.Tensor, query_lens: list[int], seq_lens: list[int],
                       tables: list[list[int]], token_top_k: TokenTopK | None, cut: int) -> list[MicroBatch]:
        """Split the flat batch after its first `cut` tokens (0 < cut < T): overlap.cut_sequences."""
        T = input_ids.shape[0]
        assert 0 < cut < T, f"micro-batch cut {cut} outside a batch of {T} tokens"
        parts = cut_sequences(query_lens, seq_lens, tables, cut)
        batches = []
        for side, lo, hi in ((0, 0, cut), (1, cut, T)):
            meta = AttentionMetadata.build(*parts[side], self.kv_cache.block_size, self.device, self.workspace,
                                           self.split_decodes)
            tk = None if token_top_k is None else TokenTopK(token_top_k.requested[lo:hi], token_top_k.degraded[lo:hi])
            batches.append(MicroBatch(input_ids[lo:hi], meta, tk))
        return batches

    def _token_top_k(self, out: SchedulerOutput) -> TokenTopK | None:
        """Each token's (requested, running) K, in batch order; None when every token runs at the
        model's K (the common case costs nothing)."""
        K = self.model.config.top_k
        if all(config == (K, K) for config in out.top_k.values()):
            return None
        requested, running = [], []
        for req_id, n in out.num_scheduled_tokens.items():
            asked, runs = out.top_k.get(req_id, (K, K))
            requested += [asked] * n
            running += [runs] * n
        return TokenTopK(torch.tensor(requested, dtype=torch.int64, device=self.device),
                         torch.tensor(running, dtype=torch.int64, device=self.device))

    def _expert_load(self) -> ExpertLoadStats | None:
        """The step's counts on the host: one copy of [L_moe, E] after the forward."""
        if not self.model.load.enabled:
            return None
        load = self.model.expert_load()
        return ExpertLoadStats(load.logical.tolist(), load.gate_entropy.tolist(), load.num_tokens,
                               load.overflow.tolist())


def _for_rank(out: SchedulerOutput, rank: int) -> SchedulerOutput:
    """The part of a step that runs on `rank`; `active` keeps saying whether the step runs at all."""
    mine = {r for r in out.num_scheduled_tokens if out.rank_of(r) == rank}
    return dataclasses.replace(
        out,
        new_requests=tuple(n for n in out.new_requests if n.request_id in mine),
        cached_requests=tuple(c for c in out.cached_requests if c.request_id in mine),
        num_scheduled_tokens={r: n for r, n in out.num_scheduled_tokens.items() if r in mine},
        top_k={r: k for r, k in out.top_k.items() if r in mine},
        ranks={}, active=bool(out.num_scheduled_tokens),
    )
