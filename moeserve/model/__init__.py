"""The model: layers, paged attention, the MoE layer, and the causal LM that joins them."""

from moeserve.model.attention import AttentionMetadata, PagedKVCache
from moeserve.model.decoder import MoEForCausalLM

__all__ = ["AttentionMetadata", "MoEForCausalLM", "PagedKVCache"]
