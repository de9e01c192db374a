"""Runs inside a test's network namespace (tests/test_overlap.py): two expert-parallel workers
in a plain torch.distributed gloo group on 127.0.0.1 run one step as two micro-batches and
report each rank's event trace as JSON on stdout.

    python overlap_driver.py MODEL

Rank 1 holds back its first dispatch all-to-all of micro-batch A (after the count exchange,
before the payload is issued) until rank 0 has begun micro-batch B's attention in that layer.
Rank 0's A dispatch cannot complete before rank 1 issues its half, so rank 0 reaches B's
compute only if it does not wait for A first: without overlap the step deadlocks and the
driver fails at the store's timeout.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HOLD_SECONDS = 30


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, model: str, port: int, results) -> None:
    from moeserve.config import engine_config
    from moeserve.model.attention import AttentionMetadata
    from moeserve.model.overlap import MicroBatch, OverlapTrace
    from moeserve.worker.worker import Worker

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=rank == 0,
                          timeout=datetime.timedelta(seconds=HOLD_SECONDS))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=HOLD_SECONDS))
    config = engine_config(model, dtype="float32", expert_parallel_size=2, distributed_executor_backend="mp",
                           num_kv_blocks=16, block_size=4)
    worker = Worker(config, rank=rank, group=dist.group.WORLD)
    worker.load_model()
    worker.initialize_cache(16)
    model_ = worker.model
    first_moe = next(i for i, layer in enumerate(model_.model.layers) if layer.moe_layer is not None)

    def hook(event: str, micro_batch: int, layer: int) -> None:
        if rank == 0 and (event, micro_batch, layer) == ("attention", 1, first_moe):
            store.set("b_computes", "1")
        if rank == 1 and (event, micro_batch, layer) == ("dispatch_ready", 0, first_moe):
            store.wait(["b_computes"])

    trace = OverlapTrace(hook=hook)
    # Two prompts (5 and 7 tokens); micro-batch A takes the first 6 tokens, so the second
    # prompt is cut after its first token and B continues it.
    gen = torch.Generator().manual_seed(rank)
    ids = torch.randint(3, model_.config.vocab_size, (12,), generator=gen)
    a = AttentionMetadata.build([5, 1], [5, 1], [[0, 1], [2, 3]], 4)
    b = AttentionMetadata.build([6], [7], [[2, 3]], 4)
    model_.forward_micro_batches([MicroBatch(ids[:6], a), MicroBatch(ids[6:], b)], worker.runner.kv_cache, trace)
    results[rank] = trace.events
    dist.destroy_process_group()


def main() -> None:
    model = sys.argv[1]
    port = _free_port()
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank_main, args=(model, port, results), nprocs=2)
        print("RESULT " + json.dumps({"events": [list(results[r]) for r in range(2)]}))


if __name__ == "__main__":
    main()
