"""CUDA-graph safety, checked on the CPU (host syncs: testing/host_sync.py).

`GraphRegionRecorder` is a TorchDispatchMode (every aten op the region runs passes through it)
that records what a captured region would bake in: each op with its output shapes (which must be
the same for every step of a bucket), and every tensor the region reads that it did not make
itself and that is not among the tensors declared persistent (weights, KV cache, static
buffers); such a tensor would be a stale address when the graph is replayed. Tensors made from
host data inside the region (`torch.tensor(list)`) are reported too: a capture would freeze
their values.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten

HOST_DATA_OPS = {aten.lift_fresh, aten.lift_fresh_copy}


def _storage(t: torch.Tensor) -> int | None:
    if t.layout != torch.strided or t.device.type == "meta":
        return None  # opaque (oneDNN-packed) tensors: never made per step
    return t.untyped_storage().data_ptr()


class GraphRegionRecorder(TorchDispatchMode):
    """Run the region inside `with GraphRegionRecorder(persistent) as rec:`; then `rec.ops`
    lists (op, output shapes) in order and `rec.foreign` the ops that read a tensor from outside."""

    def __init__(self, persistent: Iterable[torch.Tensor]):
        super().__init__()
        self.allowed = {_storage(t) for t in persistent} - {None}
        self.made: set[int] = set()
        self.ops: list[tuple[str, tuple]] = []
        self.foreign: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket in HOST_DATA_OPS:
            self.foreign.append(f"{func}: a tensor made from host data")
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, torch.Tensor):
                ptr = _storage(t)
                if ptr is not None and ptr not in self.allowed and ptr not in self.made and t.numel():
                    self.foreign.append(f"{func} reads a {tuple(t.shape)} {t.dtype} tensor from outside the region")
        out = func(*args, **kwargs)
        shapes = []
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                ptr = _storage(t)
                if ptr is not None:
                    self.made.add(ptr)
                shapes.append(tuple(t.shape))
        self.ops.append((str(func), tuple(shapes)))
        return out
