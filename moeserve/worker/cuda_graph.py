"""The decode step as CUDA graphs: persistent step inputs, static metadata, capture per bucket.

Shape legend (shared/DESIGN.md) plus: R = max_num_seqs + 1 persistent batch rows (the last is
the padding row), NB = blocks per sequence at max_model_len, Bk a batch-size bucket, D diffs.

    host (pinned on CUDA)                       device (static: the graphs read only these)
    staging [7 * Bk_max + 3 * D_max] int64 --one non-blocking copy--> step [same]
        ids | positions | slots | seq_lens | rows | k_requested | k_degraded | diff rows/cols/blocks
    runner's block-table diffs -----------------(scattered before replay)--> tables [R, NB]

Each running request owns a persistent row of `tables`, written once when the runner first sees
it and then only where the scheduler's diffs add blocks; a step stages O(batch) integers, never a
whole table. Inside the captured region the block tables are gathered from `tables` by `rows`
(a device op), so every tensor the region reads is a model weight, the KV cache or one of these
buffers, and every shape is fixed by the bucket: the attention metadata of a bucket is built once,
at capture, as views of them (max_seq_len is the bound max_model_len, not the step's). Padding
rows run at K = 0 (no expert: no load and no gate entropy counted) and write their key/value into
a scratch block that no request owns. The runner flushes the table diffs on every step, graph or
not, so the device rows never lag the scheduler by more than a step.

`DecodeGraphs(..., capture=False)` runs the same static path eagerly: what the CPU tests check
(no host sync, no tensor from outside the buffers, shapes fixed per bucket), and the fallback
where CUDA graphs cannot run. Graphs need a backend whose decode has no data-dependent shape or
host read: triton attention and the triton or grouped_mm expert backends (the CPU torch expert
loop sizes its matmuls from the routing, so it is refused).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from moeserve.model.attention import AttentionGroup, AttentionMetadata, PagedKVCache, Workspace
from moeserve.model.decoder import MoEForCausalLM, TokenTopK

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
_FIELDS = ("ids", "positions", "slots", "seq_lens", "rows", "k_requested", "k_degraded")


@dataclass(frozen=True)
class DecodeRow:
    """One decode token of the step, as the runner stages it."""

    token_id: int
    position: int
    slot: int
    row: int  # the request's persistent row of `tables`
    k_requested: int
    k_degraded: int


class DecodeInputs:
    """The persistent buffers of the decode path (see the module docstring)."""

    def __init__(self, max_batch: int, max_num_seqs: int, blocks_per_seq: int, max_diffs: int, block_size: int,
                 scratch_block: int, device: torch.device | str):
        self.max_batch, self.max_diffs, self.block_size = max_batch, max_diffs, block_size
        self.scratch_block = scratch_block
        self.padding_row = max_num_seqs
        device = torch.device(device)
        width = len(_FIELDS) * max_batch + 3 * max_diffs
        self.host = torch.zeros(width, dtype=torch.int64, pin_memory=device.type == "cuda")
        self._host_np = self.host.numpy()
        self.step = torch.zeros(width, dtype=torch.int64, device=device)
        self.tables = torch.full((max_num_seqs + 1, blocks_per_seq), scratch_block, dtype=torch.int64,
                                 device=device)  # [R, NB]
        self.arange = torch.arange(max_batch + 1, dtype=torch.int64, device=device)
        self.zeros = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self._pending: dict[tuple[int, int], int] = {}  # (row, column) -> block not yet on the device
        self._copied = torch.cuda.Event() if device.type == "cuda" else None  # the last staging copy is done

    def field(self, name: str, n: int | None = None) -> torch.Tensor:
        """A device field's view, its first n entries."""
        i = _FIELDS.index(name) * self.max_batch
        return self.step[i : i + (self.max_batch if n is None else n)]

    def set_blocks(self, row: int, start: int, blocks: list[int]) -> None:
        """Table row `row` gains `blocks` from column `start` (a new request: start 0); on the
        device from the next `flush` (the last write to a cell wins)."""
        for j, b in enumerate(blocks):
            self._pending[(row, start + j)] = b

    def stage(self, rows: list[DecodeRow], bucket: int) -> None:
        """Fill the host staging buffer for `rows` padded to `bucket` and `flush` it."""
        n, B, h = len(rows), self.max_batch, self._host_np
        self._wait_for_copy()
        pad = bucket - n
        scratch_slot = self.scratch_block * self.block_size
        columns = (
            [r.token_id for r in rows] + [0] * pad,
            [r.position for r in rows] + [0] * pad,
            [r.slot for r in rows] + [scratch_slot] * pad,
            [r.position + 1 for r in rows] + [1] * pad,
            [r.row for r in rows] + [self.padding_row] * pad,
            [r.k_requested for r in rows] + [0] * pad,
            [r.k_degraded for r in rows] + [0] * pad,
        )
        for i, values in enumerate(columns):
            h[i * B : i * B + bucket] = values
        self.flush(always=True)

    def flush(self, always: bool = False) -> None:
        """Move the staging buffer to the device in one non-blocking copy (several when more table
        diffs wait than it holds) and apply its table diffs there, outside any graph. Without
        `always` (a step that does not run the graphs) nothing moves when no diff waits."""
        if not (always or self._pending):
            return
        base, h = len(_FIELDS) * self.max_batch, self._host_np
        while True:
            self._wait_for_copy()
            cells = list(itertools.islice(self._pending.items(), self.max_diffs))
            for cell, _ in cells:
                del self._pending[cell]
            diffs = [(row, col, block) for (row, col), block in cells]
            filler = [(self.padding_row, 0, self.scratch_block)] * (self.max_diffs - len(diffs))
            for j, part in enumerate(zip(*(diffs + filler))):
                h[base + j * self.max_diffs : base + (j + 1) * self.max_diffs] = part
            self.step.copy_(self.host, non_blocking=True)
            if self._copied is not None:
                self._copied.record()
            d = self.step[base:].view(3, self.max_diffs)
            self.tables.index_put_((d[0], d[1]), d[2])
            if not self._pending:
                return

    def _wait_for_copy(self) -> None:
        """The host buffer is rewritten only once the copy that read it last has run."""
        if self._copied is not None:
            self._copied.synchronize()

    def metadata(self, bucket: int, max_model_len: int, workspace: Workspace) -> AttentionMetadata:
        """The bucket's attention metadata: views of the static buffers, valid for every step."""
        positions = self.field("positions", bucket)
        nb = self.tables.shape[1]
        # [Bk, NB]: refilled inside the region from `tables` by `rows` (DecodeGraphs.forward)
        tables = torch.empty(bucket, nb, dtype=torch.int64, device=self.tables.device)
        group = AttentionGroup(
            tokens=self.arange[:bucket], query_start_loc=self.arange[: bucket + 1],
            seq_lens=self.field("seq_lens", bucket), block_tables=tables, token_seq=self.arange[:bucket],
            token_index=self.zeros[:bucket], max_query_len=1, max_seq_len=min(max_model_len, nb * self.block_size),
            context_blocks=tables.view(-1), query_pos=positions.view(bucket, 1), uniform_query=True, static=True,
        )
        return AttentionMetadata(positions=positions, slot_mapping=self.field("slots", bucket),
                                 query_start_loc=self.arange[: bucket + 1], groups=(group,),
                                 block_size=self.block_size, workspace=workspace)


class DecodeGraphs:
    """Decode forward + logits per bucket, replayed from CUDA graphs (`capture=True`) or run
    eagerly over the same static buffers. `run(rows)` returns logits [len(rows), V]."""

    def __init__(self, model: MoEForCausalLM, kv_cache: PagedKVCache, inputs: DecodeInputs, max_model_len: int,
                 buckets: tuple[int, ...] = DEFAULT_BUCKETS, capture: bool = True):
        if model.expert_backend == "torch" or model.ep is not None:
            raise ValueError("decode graphs need the triton or grouped_mm expert backend on one worker: the "
                             "torch expert loop sizes its matmuls from each step's routing")
        if capture and model.attention_backend != "triton":
            raise ValueError("captured decode graphs need the triton attention backend: the torch path would "
                             "gather every row's whole max_model_len context")
        self.model, self.kv_cache, self.inputs = model, kv_cache, inputs
        self.buckets = tuple(sorted(b for b in buckets if b <= inputs.max_batch))
        self.workspace = Workspace()
        self.meta = {b: inputs.metadata(b, max_model_len, self.workspace) for b in self.buckets}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.num_steps = 0  # steps run on this path
        if capture:
            self._capture()

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    @torch.inference_mode()
    def forward(self, bucket: int) -> torch.Tensor:
        """The captured region: static buffers in, logits [Bk, V] out."""
        inputs, meta = self.inputs, self.meta[bucket]
        group = meta.groups[0]
        torch.index_select(inputs.tables, 0, inputs.field("rows", bucket), out=group.block_tables)
        top_k = TokenTopK(inputs.field("k_requested", bucket), inputs.field("k_degraded", bucket))
        hidden = self.model(inputs.field("ids", bucket), meta, self.kv_cache, top_k)  # [Bk, D]
        return self.model.compute_logits(hidden)  # [Bk, V]

    def run(self, rows: list[DecodeRow]) -> torch.Tensor:
        bucket = self.bucket(len(rows))
        self.inputs.stage(rows, bucket)
        if bucket in self.graphs:
            self.graphs[bucket].replay()
            logits = self.outputs[bucket]
        else:
            logits = self.forward(bucket)
        self.model.load.num_tokens = len(rows)  # host bookkeeping the replay does not redo
        self.num_steps += 1
        return logits[: len(rows)]

    def _capture(self) -> None:
        """Warm each bucket up on a side stream, then capture it (largest first, one memory pool)."""
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        for bucket in reversed(self.buckets):
            self.inputs.stage([], bucket)
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self.forward(bucket)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[bucket] = self.forward(bucket)
            self.graphs[bucket] = graph
        torch.cuda.synchronize()
