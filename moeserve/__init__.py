"""moeserve: a high-throughput inference server for Mixture-of-Experts language models.

The public names load on first use, so a process that needs only the serving front (the HTTP
and gRPC servers) never imports torch or the model: that lives in the engine's process.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
_PUBLIC = {
    "LLM": "moeserve.entrypoints.llm",
    "CheckpointError": "moeserve.errors",
    "CompletionOutput": "moeserve.outputs",
    "GenerationDefaults": "moeserve.generation_config",
    "ModelConfig": "moeserve.model_config",
    "RequestOutput": "moeserve.outputs",
    "RequestOutputKind": "moeserve.sampling_params",
    "SamplingParams": "moeserve.sampling_params",
    "Tokenizer": "moeserve.tokenizer",
    "load_model": "moeserve.checkpoint",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'moeserve' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)
