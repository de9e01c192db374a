"""moeserve: a high-throughput inference server for Mixture-of-Experts language models."""

from moeserve.checkpoint import load_model
from moeserve.config import CheckpointError, GenerationDefaults, ModelConfig
from moeserve.tokenizer import Tokenizer

__version__ = "0.1.0"
__all__ = ["CheckpointError", "GenerationDefaults", "ModelConfig", "Tokenizer", "load_model"]
