"""moeserve: a high-throughput inference server for Mixture-of-Experts language models."""

from moeserve.checkpoint import load_model
from moeserve.config import CheckpointError, GenerationDefaults, ModelConfig
from moeserve.entrypoints.llm import LLM
from moeserve.outputs import CompletionOutput, RequestOutput
from moeserve.sampling_params import SamplingParams
from moeserve.tokenizer import Tokenizer

__version__ = "0.1.0"
__all__ = [
    "LLM",
    "CheckpointError",
    "CompletionOutput",
    "GenerationDefaults",
    "ModelConfig",
    "RequestOutput",
    "SamplingParams",
    "Tokenizer",
    "load_model",
]
