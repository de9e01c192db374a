"""Record the operations that make the host wait for the device, while code runs on the CPU.

On CUDA these read a device value back to the host (or size an output by data), so each one
stalls the CPU until the GPU catches up and breaks CUDA-graph capture. On the CPU they cost
nothing, which is why a CPU test has to look for them by name: at the aten level (a dispatch
mode sees every op, including those torch code calls internally) and at the Python level (a
function mode sees `.item()`, `.tolist()`, `bool(t)`, ... before they reach aten).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# aten ops whose result needs device data on the host: a scalar, or an output sized by values.
SYNCING_ATEN = frozenset({
    "aten._local_scalar_dense", "aten.nonzero", "aten.bincount", "aten.unique", "aten._unique",
    "aten._unique2", "aten.unique_consecutive", "aten.unique_dim", "aten.masked_select",
    "aten.repeat_interleave", "aten.is_nonzero", "aten.equal", "aten.histc", "aten.argwhere",
})
# aten ops that, given a boolean mask as an index, turn it into positions (a nonzero).
BOOL_INDEXING_ATEN = frozenset({"aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_"})
# Python-level tensor methods that hand a device value to Python.
SYNCING_METHODS = frozenset({
    "item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__", "__len__",
})


def _bool_index(args: tuple) -> bool:
    indices = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()
    return any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in indices)


class _Dispatch(TorchDispatchMode):
    def __init__(self, seen: list[str], ops: list[str]):
        super().__init__()
        self.seen, self.ops = seen, ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = f"aten.{func.__name__.split('.')[0]}"
        self.ops.append(name)
        if name in SYNCING_ATEN and not (name == "aten.repeat_interleave" and (kwargs or {}).get("output_size")):
            self.seen.append(name)
        elif name in BOOL_INDEXING_ATEN and _bool_index(args):
            self.seen.append(f"{name} (boolean mask)")
        return func(*args, **(kwargs or {}))


class _Function(TorchFunctionMode):
    def __init__(self, seen: list[str]):
        super().__init__()
        self.seen = seen

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNCING_METHODS and args and isinstance(args[0], torch.Tensor):
            self.seen.append(f"Tensor.{name}")
        return func(*args, **(kwargs or {}))


class HostSyncRecorder:
    """`with HostSyncRecorder() as rec: ...` then `rec.seen`: the syncing ops, in call order;
    `rec.ops`: every aten op that ran."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.ops: list[str] = []
        self._modes: list[Any] = []

    def __enter__(self) -> HostSyncRecorder:
        self._modes = [_Function(self.seen), _Dispatch(self.seen, self.ops)]
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
