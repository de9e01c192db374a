"""generation_config.json: EOS ids and default sampling values (no torch: the front reads
these in the EngineInfo the engine sends at start)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moeserve.errors import CheckpointError

if TYPE_CHECKING:
    from moeserve.model_config import ModelConfig


@dataclass(frozen=True)
class GenerationDefaults:
    """generation_config.json: EOS ids (Qwen lists several) and default sampling values.

    As in vLLM, sampling values the file lists are the request defaults whether or not it also
    says do_sample; values it omits stay None (the engine's own defaults apply).
    """

    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    max_new_tokens: int | None = None

    @classmethod
    def from_pretrained(cls, path: str | Path, model_config: ModelConfig) -> GenerationDefaults:
        gen_path = Path(path) / "generation_config.json"
        try:
            raw: dict[str, Any] = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{gen_path}: not valid JSON ({e})") from e
        return cls(
            eos_token_ids=as_id_tuple(raw.get("eos_token_id")) or model_config.eos_token_ids,
            bos_token_id=raw.get("bos_token_id", model_config.bos_token_id),
            **{key: raw.get(key) for key in ("temperature", "top_p", "top_k", "min_p",
                                              "repetition_penalty", "max_new_tokens")},
        )


def as_id_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)
