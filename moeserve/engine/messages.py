"""Typed messages between the front and the EngineCore, and their wire format.

    front -> core   EngineCoreRequest, AbortRequests, UtilityCall, Shutdown
    core -> front   EngineInfo (once, when ready) or StartFailed; EngineCoreOutputs (per step,
                    with EngineStats); UtilityResult; EngineDead (the core's last word)

Each message is a frozen dataclass; on the wire it is two ZMQ frames, a one-byte kind and the
msgpack body (msgspec encodes and decodes dataclasses by their field types, so a message is
checked as it is decoded). msgpack was measured against pickle on these messages:
bench/serialization.py. No torch here: the front imports this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec

from moeserve.generation_config import GenerationDefaults
from moeserve.sampling_params import SamplingParams

# ---- front -> core ----


@dataclass(frozen=True)
class EngineCoreRequest:
    """One sequence for the engine (a request with n > 1 is n of these). Tokenised and
    validated by the front; the engine only schedules, runs and stops it on token ids."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: tuple[int, ...]
    priority: int = 0


@dataclass(frozen=True)
class AbortRequests:
    request_ids: list[str]


@dataclass(frozen=True)
class UtilityCall:
    """A control call on the core (`EngineCore.call`): set K, expert load, profile, ..."""

    call_id: int
    method: str
    args: list[Any] = field(default_factory=list)


@dataclass(frozen=True)
class Shutdown:
    pass


# ---- core -> front ----


@dataclass(frozen=True)
class EngineInfo:
    """What the front needs to know about the engine, sent once when it is ready."""

    model: str
    max_model_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]  # from the checkpoint's configs (the front adds its tokenizer's)
    generation_defaults: GenerationDefaults
    num_kv_blocks: int
    block_size: int
    max_num_seqs: int
    max_num_batched_tokens: int
    moe_layer_ids: tuple[int, ...]  # decoder-layer index of each MoE layer
    num_experts: int
    top_k: int  # the checkpoint's K
    device: str
    pid: int


@dataclass(frozen=True)
class StartFailed:
    message: str


@dataclass(frozen=True)
class ExpertLoadStats:
    """One step's routing counts (summed over workers)."""

    logical: list[list[int]]  # [L_moe][E] tokens routed to each expert
    gate_entropy: list[float]  # [L_moe] summed over the step's tokens (nats)
    num_tokens: int  # tokens that entered each MoE layer
    overflow: list[list[int]] = field(default_factory=list)  # [L_moe][2] re-routed, dropped (capacity factor)


@dataclass(frozen=True)
class ReplicationStats:
    """The replication planner's view (engine/replication.py), over its load window."""

    replicas: list[list[int]]  # [L_moe][E] copies of each expert
    balancedness: list[float]  # [L_moe] mean / max slot-group load with the current placement
    balancedness_home: list[float]  # [L_moe] the same load on the start placement (no replication)
    num_replications: int  # expert copies made since start
    num_retirements: int  # copies retired since start
    stall_seconds_total: float  # steps' time spent copying expert weights, since start
    stall_seconds_max: float  # the longest single copy


@dataclass(frozen=True)
class EngineStats:
    """The engine's state after a step (or after a command changed it). Totals are since start;
    rates are exponential moving averages over recent steps that did that kind of work."""

    step: int
    timestamp: float  # time.monotonic() in the engine process (same clock as the front on one host)
    num_running: int
    num_waiting: int
    num_waiting_tokens: int  # prompt tokens of waiting requests not yet computed
    waiting_tokens_by_priority: dict[int, int]
    num_blocks: int
    num_free_blocks: int
    step_time_s: float  # the last step: schedule + execute + update
    num_prefill_tokens: int  # in the last step (recompute after preemption counts as prefill)
    num_decode_tokens: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    # Step time as a function of the tokens in the step, fitted over recent steps (weighted least
    # squares): step_time ~ step_time_base_s + step_time_per_token_s * tokens.
    step_time_base_s: float
    step_time_per_token_s: float
    prefill_tokens_per_step: float  # average over recent steps, those without prefill included
    num_requests_received: int  # sequences the engine has been given, since start
    num_preemptions: int
    prefix_cache_hits: int  # blocks reused
    top_k: list[int]  # K in force per MoE layer (for every token)
    expert_load: ExpertLoadStats | None  # None when expert metrics are off, or no step ran
    top_k_by_class: dict[int, int] = field(default_factory=dict)  # K in force per priority class present
    num_degraded_tokens: int = 0  # since start: tokens run with fewer experts than their request asked
    recent_ttft_s: float = 0.0  # p90 of the engine-side TTFT (arrival -> first token) of recent requests
    replication: ReplicationStats | None = None  # None when replication is off
    running_by_rank: list[int] = field(default_factory=list)  # running requests on each worker
    unavailable: str | None = None  # why the engine cannot serve now (rebuilding its workers); None: serving
    worker_failures: int = 0  # since start: expert-parallel worker failures
    worker_recoveries: int = 0
    recovery_seconds_total: float = 0.0
    last_recovery_s: float = 0.0
    num_split_steps: int = 0  # since start: steps run as two overlapped micro-batches

    @property
    def kv_usage(self) -> float:
        return 1 - self.num_free_blocks / self.num_blocks if self.num_blocks else 0.0


@dataclass(frozen=True)
class EngineCoreOutput:
    """New tokens of one sequence. `finish_reason` is set once, on its last output; `error` says
    the engine failed this sequence (it is released; the others go on); `unavailable` that it
    failed because a worker was lost (a 503 to retry, not a 500)."""

    request_id: str
    new_token_ids: list[int] = field(default_factory=list)
    new_logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | None = None  # the stop token id that ended it
    num_cached_tokens: int | None = None  # on the first output: prompt tokens from the prefix cache
    queue_time_s: float | None = None  # on the first output: engine arrival -> first scheduled
    num_degraded_tokens: int = 0  # so far: tokens it ran with fewer experts than it asked for
    error: str | None = None
    unavailable: bool = False


@dataclass(frozen=True)
class EngineCoreOutputs:
    outputs: list[EngineCoreOutput]
    stats: EngineStats | None = None


@dataclass(frozen=True)
class UtilityResult:
    call_id: int
    result: Any = None
    error: str | None = None


@dataclass(frozen=True)
class EngineDead:
    message: str


# ---- wire format ----

_KINDS: dict[type, bytes] = {
    EngineCoreRequest: b"r", AbortRequests: b"a", UtilityCall: b"c", Shutdown: b"s",
    EngineInfo: b"i", StartFailed: b"f", EngineCoreOutputs: b"o", UtilityResult: b"u", EngineDead: b"d",
}
_TYPES = {kind: cls for cls, kind in _KINDS.items()}


class Codec:
    """Encodes any message to [kind, body] frames and back. One per socket user (msgspec's
    encoders and decoders are not shared between threads)."""

    def __init__(self) -> None:
        self._encoder = msgspec.msgpack.Encoder()
        self._decoders = {kind: msgspec.msgpack.Decoder(cls) for kind, cls in _TYPES.items()}

    def encode(self, message: Any) -> list[bytes]:
        return [_KINDS[type(message)], self._encoder.encode(message)]

    def decode(self, frames: list[bytes]) -> Any:
        kind, body = frames
        return self._decoders[bytes(kind)].decode(body)
