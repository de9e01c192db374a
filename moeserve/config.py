"""Engine and server settings: frozen dataclasses in layers, one per concern.

    EngineConfig = LoadConfig      which checkpoint, and how to run it (dtype, device, backends)
                 + CacheConfig     the paged KV cache
                 + SchedulerConfig continuous batching
                 + ParallelConfig  the executor and its workers
                 + ControlConfig   what the engine measures and controls between steps
    ServerConfig                   the HTTP/gRPC front (not the engine's business)

The command line is generated from these fields (`add_flags`, `from_args`): every field but
the model path is a flag named as vLLM names it where vLLM has one, with the field's default,
so a flag and its field cannot drift apart. Values measured at start (the resolved device,
max_model_len when the checkpoint sets it, the number of KV blocks) live in the engine's runtime
state, never written back here. No torch here: the front imports this module.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

EXPERT_BACKENDS = ("auto", "torch", "triton", "grouped_mm")
ATTENTION_BACKENDS = ("auto", "torch", "triton", "cpu")
EXPERT_METRICS = ("off", "layer", "expert")
EXECUTOR_BACKENDS = ("auto", "uni", "mp", "ray")
# (decode, prefill) tokens per worker from which a step is split into two micro-batches:
# vLLM's DBO values on GPUs; on CPUs the sizes from which bench/ep_overlap.py measured the split faster
OVERLAP_THRESHOLDS = {"gpu": (32, 512), "cpu": (512, 2048)}


def _opt(default: Any, help: str, flag: str | None = None, choices: tuple[str, ...] | None = None,
         repeat: bool = False) -> Any:
    """A field with its command-line form: help text, flag name (default --field-name), choices,
    and whether the flag repeats (values collect into a tuple)."""
    return field(default=default, metadata={"help": help, "flag": flag, "choices": choices, "repeat": repeat})


@dataclass(frozen=True)
class LoadConfig:
    model: str  # a checkpoint directory in Hub layout (positional on the command line)
    dtype: str = _opt("auto", "auto (the checkpoint's), float32, bfloat16 or float16")
    device: str = _opt("auto", "torch device: auto (CUDA when available, else cpu), cpu, cuda, cuda:1, ...")
    max_model_len: int | None = _opt(None, "context length (default: the checkpoint's)")
    expert_backend: str = _opt("auto", "expert compute: auto (triton on CUDA, torch on CPU), torch, triton, "
                               "grouped_mm", flag="--moe-backend", choices=EXPERT_BACKENDS)
    attention_backend: str = _opt("auto", "paged attention: auto (triton on CUDA; on the CPU, cpu in fp32 when its "
                                  "kernel builds, else torch), torch, triton, cpu (fp32 decodes in a C++ kernel "
                                  "built once per machine, the rest as torch)", choices=ATTENTION_BACKENDS)
    cpu_gemm: str = _opt("auto", "fp32 matmuls on the CPU: onednn (every weight packed once for oneDNN at "
                         "load, usually faster than aten's MKL path; a second copy of the weights in "
                         "memory), auto (onednn for fp32 on the CPU, weights of 256x256 and up), aten "
                         "(plain F.linear)", choices=("auto", "onednn", "aten"))
    cuda_graphs: bool = _opt(False, "run decode-only steps of up to 256 sequences from CUDA graphs captured at start "
                             "per batch-size bucket (worker/cuda_graph.py; needs triton attention, the triton "
                             "or grouped_mm moe backend and one worker; on the CPU, with --moe-backend "
                             "grouped_mm, the same static path runs eagerly). Off by default: not yet run on "
                             "a GPU (shared/GPU.md)")
    num_redundant_experts: int = _opt(0, "spare expert slots per MoE layer (each costs one expert's weights of "
                                      "memory, allocated at start)")
    moe_capacity_factor: float | None = _opt(None, "at most ceil(CF * T*K / E) token-slots per expert per step; "
                                             "overflow is re-routed or dropped (default: off, exact semantics)")
    moe_overflow: str = _opt("reroute", "token-slots over capacity: reroute (to the token's next-best expert with "
                             "room) or drop", choices=("reroute", "drop"))
    seed: int = _opt(0, "seed of unseeded sampling")

    def __post_init__(self) -> None:
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError("max_model_len must be >= 2")
        if self.num_redundant_experts < 0:
            raise ValueError(f"num_redundant_experts must be >= 0, got {self.num_redundant_experts}")
        if self.moe_capacity_factor is not None and self.moe_capacity_factor <= 0:
            raise ValueError(f"moe_capacity_factor must be > 0, got {self.moe_capacity_factor}")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = _opt(16, "tokens per KV-cache block")
    num_kv_blocks: int | None = _opt(None, "KV-cache blocks (default: from the memory budget)")
    kv_cache_memory_bytes: int | None = _opt(None, "bytes for the KV cache (default: measured on the GPU, "
                                             "<= 1 GiB on the CPU)")
    gpu_memory_utilization: float = _opt(0.9, "share of the GPU's memory for weights, activations and the KV cache")
    enable_prefix_caching: bool = _opt(True, "automatic prefix caching")

    def __post_init__(self) -> None:
        if self.block_size < 1 or (self.num_kv_blocks is not None and self.num_kv_blocks < 1):
            raise ValueError("block_size and num_kv_blocks must be >= 1")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = _opt(256, "most requests in one step")
    max_num_batched_tokens: int = _opt(2048, "token budget of one step")
    enable_chunked_prefill: bool = _opt(True, "run prompts longer than the budget in chunks")
    enable_overlap: bool | None = _opt(None, "split a step into two micro-batches whose expert all-to-alls "
                                       "overlap each other's compute, when every worker has at least the "
                                       "threshold's tokens. Default: on with more than one expert-parallel "
                                       "worker; --enable-overlap forces it on one worker too (the split's cost "
                                       "with nothing to hide), --no-enable-overlap turns it off")
    overlap_threshold_decode: int | None = _opt(None, "fewest tokens per worker for a split when a worker's "
                                                "tokens are all decodes (default: 32 on GPUs, as vLLM; 512 on "
                                                "CPUs, where bench/ep_overlap.py measured smaller splits slower)")
    overlap_threshold_prefill: int | None = _opt(None, "fewest tokens per worker for a split when a worker runs "
                                                 "prefill tokens (default: 512 on GPUs, as vLLM; 2048 on CPUs)")

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        for threshold in (self.overlap_threshold_decode, self.overlap_threshold_prefill):
            if threshold is not None and threshold < 1:
                raise ValueError(f"overlap thresholds must be >= 1, got {threshold}")

    def overlap_thresholds(self, on_gpu: bool) -> tuple[int, int]:
        """(decode, prefill) tokens per worker from which a step is split, defaults resolved."""
        decode, prefill = OVERLAP_THRESHOLDS["gpu" if on_gpu else "cpu"]
        return (self.overlap_threshold_decode or decode, self.overlap_threshold_prefill or prefill)


@dataclass(frozen=True)
class ParallelConfig:
    distributed_executor_backend: str = _opt("auto", "executor: uni (one worker in the engine process), ray "
                                             "(worker actors in a Ray placement group), mp (worker processes on "
                                             "this host, no Ray); auto: uni for one worker, ray for more",
                                             choices=EXECUTOR_BACKENDS)
    expert_parallel_size: int = _opt(1, "workers the experts are sharded over (attention runs data-parallel: "
                                     "each worker serves its own requests)")
    data_parallel_size: int = _opt(1, "with --enable-expert-parallel: the same as --expert-parallel-size "
                                   "(vLLM's spelling)")
    enable_expert_parallel: bool = _opt(False, "vLLM's switch: --data-parallel-size N --enable-expert-parallel "
                                        "shards the experts over N workers")
    expert_slot_groups: int = _opt(1, "groups the expert slots are split into, each a contiguous block of experts "
                                   "and spares (what an expert-parallel rank owns); replication balances load "
                                   "across them. With expert parallelism: one per worker")
    ray_address: str | None = _opt(None, "Ray cluster to join (host:port); default: start a local Ray instance")
    ray_placement_strategy: str = _opt("PACK", "Ray placement group strategy for the workers: PACK (one node when "
                                       "it fits) or SPREAD (across nodes)", choices=("PACK", "SPREAD"))
    distributed_timeout: float = _opt(10.0, "seconds a collective (or a worker's answer) may take before the "
                                      "step fails")
    ep_failure_policy: str = _opt("recover", "when an expert-parallel worker dies or hangs: recover (fail the "
                                  "requests it touched, restart it, rebuild the group, serve again) or fail (the "
                                  "engine stops)", choices=("recover", "fail"))

    def __post_init__(self) -> None:
        for name in ("expert_slot_groups", "expert_parallel_size", "data_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.data_parallel_size > 1 and not self.enable_expert_parallel:
            raise ValueError("--data-parallel-size without --enable-expert-parallel (whole-engine replicas) is not "
                             "an engine setting here: run replicas (see the README) or add --enable-expert-parallel")
        if self.data_parallel_size > 1 and self.expert_parallel_size > 1 and \
                self.data_parallel_size != self.expert_parallel_size:
            raise ValueError("--data-parallel-size and --expert-parallel-size name the same workers: give one")
        if self.world_size > 1 and self.expert_slot_groups not in (1, self.world_size):
            raise ValueError(f"with {self.world_size} expert-parallel workers the slot groups are the workers' "
                             f"shares: --expert-slot-groups must be {self.world_size} (or left out)")
        if self.world_size > 1 and self.distributed_executor_backend == "uni":
            raise ValueError("the uni executor runs one worker: use --distributed-executor-backend ray or mp")
        if self.distributed_timeout <= 0:
            raise ValueError("distributed_timeout must be > 0")

    @property
    def world_size(self) -> int:
        """Workers: expert-parallel ranks (one engine, one scheduler)."""
        return max(self.expert_parallel_size, self.data_parallel_size if self.enable_expert_parallel else 1)

    @property
    def num_slot_groups(self) -> int:
        return self.world_size if self.world_size > 1 else self.expert_slot_groups

    @property
    def executor_backend(self) -> str:
        if self.distributed_executor_backend != "auto":
            return self.distributed_executor_backend
        return "uni" if self.world_size == 1 else "ray"


@dataclass(frozen=True)
class ControlConfig:
    expert_metrics: str = _opt("layer", "MoE accounting and series in /metrics: off (no accounting work at "
                               "all), per layer, or per (layer, expert)", choices=EXPERT_METRICS)
    degradation: str = _opt("off", "fewer experts per token under load: off, auto (lowest priority classes "
                            "first, engine/degradation.py), force-k1 (every request)",
                            choices=("off", "auto", "force-k1"))
    degradation_k: int = _opt(1, "experts per token of a degraded class")
    degradation_slo_ttft: float = _opt(1.0, "seconds: the TTFT the degradation controller defends")
    degradation_slo_tpot: float = _opt(0.1, "seconds: the time per output token it defends")
    degradation_enter: float = _opt(1.0, "degrade one more class while the pressure (worst of TTFT, TPOT and "
                                    "queue against their targets) is above this")
    degradation_leave: float = _opt(0.7, "restore one class while the pressure is below this (< enter)")
    degradation_dwell: float = _opt(5.0, "seconds at least between two changes")
    degradation_layers: str | None = _opt(None, "comma-separated MoE-layer indices a degraded K applies to "
                                          "(default: every MoE layer)")
    replication: str = _opt("off", "hot-expert replication into spare slots while serving: off, auto "
                            "(engine/replication.py; needs --num-redundant-experts and >= 2 slot groups)",
                            choices=("off", "auto"))
    replication_window: int = _opt(64, "steps of expert load the replication planner looks at")
    replication_interval: int = _opt(8, "steps between two planning rounds (each round plans one expert move "
                                     "per MoE layer; one move is applied per step)")
    replication_threshold: float = _opt(0.9, "act on a layer while its balancedness (mean / max slot-group "
                                        "load) is below this")

    def __post_init__(self) -> None:
        if self.replication_window < 1 or self.replication_interval < 1:
            raise ValueError("replication_window and replication_interval must be >= 1")
        if not 0 < self.replication_threshold <= 1:
            raise ValueError(f"replication_threshold must be in (0, 1], got {self.replication_threshold}")

    @property
    def record_expert_load(self) -> bool:
        """The replication planner needs the counts even with no expert series in /metrics."""
        return self.expert_metrics != "off" or self.replication != "off"


@dataclass(frozen=True)
class EngineConfig:
    load: LoadConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    control: ControlConfig = field(default_factory=ControlConfig)

    @property
    def model(self) -> str:
        return self.load.model


ENGINE_LAYERS: dict[str, type] = {"load": LoadConfig, "cache": CacheConfig, "scheduler": SchedulerConfig,
                                  "parallel": ParallelConfig, "control": ControlConfig}


def engine_config(model: str, **settings: Any) -> EngineConfig:
    """EngineConfig from flat settings (`max_model_len=128, block_size=4`), as vLLM's LLM takes
    them; an unknown name is a TypeError naming it."""
    owner = {f.name: layer for layer, cls in ENGINE_LAYERS.items() for f in fields(cls)}
    unknown = sorted(set(settings) - set(owner))
    if unknown:
        raise TypeError(f"unknown engine setting(s): {', '.join(unknown)}")
    parts: dict[str, dict[str, Any]] = {layer: {} for layer in ENGINE_LAYERS}
    for name, value in settings.items():
        parts[owner[name]][name] = value
    parts["load"]["model"] = str(model)
    return EngineConfig(**{layer: ENGINE_LAYERS[layer](**values) for layer, values in parts.items()})


@dataclass(frozen=True)
class ServerConfig:
    host: str = _opt("127.0.0.1", "address to listen on (0.0.0.0 for every interface)")
    port: int = _opt(8000, "HTTP port")
    grpc_port: int | None = _opt(None, "gRPC port (off when not given)")
    api_key: tuple[str, ...] = _opt((), "accepted bearer key for /v1/* and gRPC (repeatable); none = open",
                                    repeat=True)
    served_model_name: str | None = _opt(None, "model name in the API (default: the model path)")
    shutdown_timeout: float = _opt(30.0, "seconds SIGTERM waits for requests in flight before exiting")
    log_level: str = _opt("info", "log level", choices=("debug", "info", "warning", "error"))
    router_config: str | None = _opt(None, "YAML file of profiles (model, K, decoding defaults, cost) served "
                                     "behind one endpoint with a routed name, moeserve-router (README: the outer "
                                     "router)")
    replicas: int | None = _opt(None, "serve N engine replicas behind one endpoint through Ray Serve on this "
                                "machine (a local Ray cluster; cluster/ scales further)")


@dataclass(frozen=True)
class AdmissionConfig:
    """Admission control in the front (entrypoints/admission.py); every check is off by default."""

    max_queued_requests: int | None = _opt(None, "most requests admitted and waiting for their first token; "
                                           "over it: 503, or lower-priority queued requests are dropped")
    max_queued_tokens: int | None = _opt(None, "most prompt tokens admitted and waiting (as above)")
    slo_ttft: float | None = _opt(None, "seconds: refuse (503) a request whose predicted time to first token "
                                  "exceeds it")
    slo_tpot: float | None = _opt(None, "seconds: refuse (503) a request that would make the predicted time per "
                                  "output token (of every running request) exceed it")
    tenant_requests_per_second: float | None = _opt(None, "per-tenant request rate (tenant = API key, else the "
                                                    "x-tenant header); over it: 429")
    tenant_tokens_per_minute: float | None = _opt(None, "per-tenant tokens (prompt + max_tokens) per minute; "
                                                  "over it: 429")
    tenant_config: str | None = _opt(None, "YAML file with per-tenant quotas and API-key tenant names")

    def __post_init__(self) -> None:
        for name in ("max_queued_requests", "max_queued_tokens", "slo_ttft", "slo_tpot", "tenant_requests_per_second",
                     "tenant_tokens_per_minute"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")


# ---- the command line, generated from the fields ----

def _flag(f: Any) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of `cls` (LoadConfig's model excepted). Flags default to None, so
    `from_args` can tell "not given" (the field's default applies) from a value."""
    for f in fields(cls):
        if "help" not in f.metadata:
            continue
        kind = bool if str(f.type).startswith("bool") else type(f.default) if f.default is not None else None
        default = f.default if f.default is not MISSING else None
        help_text = f"{f.metadata['help']} (default: {default})" if default not in (None, ()) else f.metadata["help"]
        if kind is bool:
            parser.add_argument(_flag(f), dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
        elif f.metadata.get("repeat"):
            parser.add_argument(_flag(f), dest=f.name, action="append", default=None, help=help_text)
        else:
            parser.add_argument(_flag(f), dest=f.name, type=_field_type(f), choices=f.metadata.get("choices"),
                                default=None, help=help_text)


def _field_type(f: Any) -> type:
    annotation = str(f.type)
    for name, kind in (("float", float), ("int", int)):
        if annotation.startswith(name):
            return kind
    return str


def from_args(cls: type, args: argparse.Namespace, **extra: Any) -> Any:
    """`cls` from parsed flags: the fields given on the command line, defaults for the rest."""
    values = dict(extra)
    for f in fields(cls):
        value = getattr(args, f.name, None)
        if value is not None and f.name not in values:
            values[f.name] = tuple(value) if f.metadata.get("repeat") else value
    return cls(**values)


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    for cls in ENGINE_LAYERS.values():
        add_flags(parser, cls)


def engine_settings(config: EngineConfig) -> dict[str, Any]:
    """The flat settings (engine_config's keywords) that differ from the defaults, model aside:
    engine_config(model, **engine_settings(c)) == c."""
    settings: dict[str, Any] = {}
    for layer, cls in ENGINE_LAYERS.items():
        values = getattr(config, layer)
        defaults = cls(model="") if cls is LoadConfig else cls()
        for f in fields(cls):
            if f.name != "model" and getattr(values, f.name) != getattr(defaults, f.name):
                settings[f.name] = getattr(values, f.name)
    return settings


def engine_config_from_args(model: str, args: argparse.Namespace) -> EngineConfig:
    parts = {layer: from_args(cls, args, **({"model": model} if cls is LoadConfig else {}))
             for layer, cls in ENGINE_LAYERS.items()}
    return EngineConfig(**parts)
