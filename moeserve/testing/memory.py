"""Peak bytes that torch ops allocate on the CPU while a function runs, from the profiler's
allocation events (torch.cuda.max_memory_allocated has no CPU counterpart)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

T = TypeVar("T")


def peak_cpu_allocation(fn: Callable[[], T]) -> tuple[T, int]:
    """(fn(), the most bytes that tensors made by torch ops held at once while fn ran).

    Allocations made inside an aten op count; so do their frees, matched by address. Storage
    made outside any op is left out together with its free: that is how safetensors maps a
    checkpoint file (`UntypedStorage.from_file`), whose pages belong to the page cache, not to
    the process's heap."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events: list[tuple[int, int, int]] = []  # (time, bytes, ptr); bytes < 0 for a free

    def walk(node: Any, in_op: bool) -> None:
        if node.tag == _EventType.Allocation:
            fields = node.extra_fields
            if fields.device.type == "cpu" and (in_op or fields.alloc_size < 0):
                events.append((node.start_time_ns, fields.alloc_size, fields.ptr))
        for child in node.children:
            walk(child, in_op or node.tag == _EventType.TorchOp)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root, False)
    events.sort()
    live: set[int] = set()
    current = peak = 0
    for _, size, ptr in events:
        if size > 0:
            live.add(ptr)
        elif ptr in live:
            live.discard(ptr)
        else:
            continue  # the free of storage made outside any op (or before fn started)
        current += size
        peak = max(peak, current)
    return result, peak
