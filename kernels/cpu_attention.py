"""The `cpu` attention backend: paged decode attention compiled for this CPU (cpu_attention.cpp),
the torch path for everything else.

The torch path gathers each decode's whole context into a padded workspace and multiplies over
it: three passes over the keys and values (read, write, read again) plus the padding. The
kernel reads each key and value row once, in place in the paged cache, for all G query heads of
its KV head; bench/throughput.py's `decode_attention` records both at a full decode batch.

The kernel runs decode groups in fp32 without sinks (keys and values of one width, contiguous
caches); any other group (prefills, bf16/fp16, GPT-OSS's sinks, MLA's latent) takes the torch
path of model/attention.py. It is built once per machine with torch's C++ extension loader
(g++ and ninja; `-march=native`, so the build directory is named after the source, the CPU's
flags, python and torch) and loaded into each process that resolves the backend. fp32 results differ from the torch path's in
the last bits (summation order), which the equality rule of shared/DESIGN.md absorbs.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import platform
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_attention.cpp")
CFLAGS = ("-O3", "-march=native", "-ffast-math")


def _build_tag() -> str:
    """A digest of what the library is compiled from and for: the source and flags, the CPU's
    flags (`-march=native`), python and torch, so that a build is never loaded by another
    version of the kernel, CPU, python or torch sharing the home directory."""
    flags = f"{platform.machine()} {platform.python_version()} {torch.__version__} {CFLAGS}"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags += line
                break
    except OSError:
        pass
    return hashlib.sha1(flags.encode() + SOURCE.read_bytes()).hexdigest()[:12]


@functools.cache
def load() -> None:
    """Build (first time on this machine: 10-20 s) and load the kernel library into this process.
    Raises when it cannot be built (no compiler, no ninja).

    Builders take an flock on `<build>.lock` (released by the OS when a builder dies), so a
    lock file torch's loader left behind a killed build is known stale and removed: torch's
    loader would otherwise wait on it forever."""
    from torch.utils import cpp_extension

    if hasattr(torch.ops.moeserve_cpu, "decode_attention"):
        return
    name = f"moeserve_cpu_attention_{_build_tag()}"
    build = Path(cpp_extension.get_default_build_root()) / name
    build.mkdir(parents=True, exist_ok=True)
    with open(build.with_suffix(".lock"), "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        try:
            (build / "lock").unlink(missing_ok=True)  # torch's baton: no live builder holds it now
            if not any(build.glob("*.so")):
                log.info("building the cpu attention kernel in %s (once per machine, 10-20 s)", build)
            cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=list(CFLAGS),
                               build_directory=str(build), is_python_module=False, verbose=False)
        finally:
            fcntl.flock(held, fcntl.LOCK_UN)


@functools.cache
def usable() -> bool:
    """Whether the kernel can be loaded here (built if need be); logs why not, once."""
    try:
        load()
    except Exception as exc:  # a missing compiler or ninja: the torch path serves instead
        log.warning("the cpu attention kernel cannot be built (%s); using the torch attention path", exc)
        return False
    return True


def takes_decodes(config, dtype: torch.dtype) -> bool:
    """Whether the kernel computes a model's decode groups on the CPU (what `supports` checks
    per group, from the model's shape): fp32, no sinks, not MLA."""
    return dtype == torch.float32 and not config.attention_sinks and config.mla is None


def supports(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, group, sinks) -> bool:
    """Whether `group` is a decode group the kernel computes: one query per sequence, fp32 on the
    CPU, no sinks, contiguous caches of one shape (not MLA's value view of the key), lengths of
    this step (not a decode graph's static buffers, whose padding rows hold no sequence)."""
    return (group.max_query_len == 1 and group.uniform_query and not group.static and sinks is None
            and q.device.type == "cpu"
            and q.dtype == key_cache.dtype == value_cache.dtype == torch.float32
            and key_cache.shape == value_cache.shape and key_cache.is_contiguous() and value_cache.is_contiguous())


def decode_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, block_tables: torch.Tensor,
                     seq_lens: torch.Tensor, scale: float, window: int | None) -> torch.Tensor:
    """q [S, H, D] (one new token per sequence, at position seq_lens[s] - 1) against caches
    [N, B, Hkv, D] through block_tables [S, W] -> [S, H, D]."""
    load()
    return torch.ops.moeserve_cpu.decode_attention(q.contiguous(), key_cache, value_cache, block_tables, seq_lens,
                                                   float(scale), int(window or 0))


def paged_attention_cpu(q, key_cache, value_cache, meta, scale, window, sinks=None):
    """model/attention.py's paged_attention with the decode groups the kernel supports computed
    by it: q [T, H, Dk] -> [T, H, Dv]."""
    from moeserve.model.attention import attend_group, attend_groups

    def attend(q_g, g):
        if supports(q_g, key_cache, value_cache, g, sinks):
            return decode_attention(q_g, key_cache, value_cache, g.block_tables, g.seq_lens, scale, window)
        return attend_group(q_g, key_cache, value_cache, meta, g, scale, window, sinks)

    return attend_groups(q, value_cache.shape[-1], meta, attend)
