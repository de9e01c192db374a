"""The MoE causal LM: embed -> [Attention(paged KV) -> MoE or dense MLP] x L -> norm -> logits.

One class serves every supported family; ModelConfig carries the differences. Parameter names
follow the Hub layout (`model.layers.{i}.self_attn.q_proj.weight`, ...) so that the loader maps
names one to one, except the stacked expert tensors `model.layers.{i}.mlp.w13` / `.w2`.

Shape legend: T tokens in the flat step batch, D hidden, V vocabulary, L_moe MoE layers.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from moeserve.model_config import ModelConfig
from moeserve.model.attention import Attention, AttentionMetadata, PagedKVCache
from moeserve.model.layers import GatedMLP, Linear, RMSNorm, RotaryEmbedding
from moeserve.model.mla import MLAttention
from moeserve.model.moe import ExpertBackend, ExpertLoad, LoadRecorder, SlotLayout, SparseMoE, get_expert_backend
from moeserve.model.moe.dispatch import ExpertParallelGroup, run_to_end
from moeserve.model.overlap import MicroBatch, OverlapTrace, interleave


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int, moe_layer: int | None, layout: SlotLayout,
                 backend: ExpertBackend, attention_backend: str, ep: ExpertParallelGroup | None = None):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_scale_fp32)
        self.self_attn: Attention | MLAttention
        if config.mla is not None:
            self.self_attn = MLAttention(config, layer_id, attention_backend)
        else:
            self.self_attn = Attention(config, layer_id, attention_backend)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_scale_fp32)
        self.moe_layer = moe_layer
        self.mlp: SparseMoE | GatedMLP
        if moe_layer is None:
            self.mlp = GatedMLP(config.hidden_size, config.intermediate_size)
        else:
            self.mlp = SparseMoE(config, moe_layer, layout, backend, ep)


class _Backbone(nn.Module):
    """Holds the `model.` prefix of the Hub parameter names."""

    def __init__(self, config: ModelConfig, layout: SlotLayout, backend: ExpertBackend, attention_backend: str,
                 ep: ExpertParallelGroup | None = None):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        moe_index = {layer: i for i, layer in enumerate(config.moe_layer_ids)}
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, moe_index.get(i), layout, backend, attention_backend, ep)
            for i in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_scale_fp32)


@dataclass(frozen=True)
class TokenTopK:
    """The K in force per token for one step, built with the batch: `requested` [T] is the K of
    each token's request (its own, or the model's), `degraded` [T] <= requested the K after the
    degradation controller lowered it for the request's class. MoE layers marked in
    `MoEForCausalLM.degrade_layers` take `degraded`, the others `requested`; every layer also
    caps it at its own `top_k`."""

    requested: torch.Tensor  # [T] int64
    degraded: torch.Tensor  # [T] int64


class MoEForCausalLM(nn.Module):
    """Runtime state (not weights) lives in device buffers updated in place between steps:
    `top_k` [L_moe] (the K in force per MoE layer for every token, 1 <= k <= config.top_k),
    `degrade_layers` [L_moe] bool (which layers a request's degraded K applies to), each layer's
    placement maps, and the load counters of the last forward.
    """

    def __init__(
        self,
        config: ModelConfig,
        num_redundant_experts: int = 0,
        expert_backend: str = "torch",
        attention_backend: str = "torch",
        expert_slot_groups: int = 1,
        ep: ExpertParallelGroup | None = None,
    ):
        super().__init__()
        self.config = config
        self.num_slots = config.num_experts + num_redundant_experts
        self.layout = SlotLayout(config.num_experts, self.num_slots, expert_slot_groups)
        self.ep = ep
        self.expert_backend, self.attention_backend = expert_backend, attention_backend
        backend = get_expert_backend(expert_backend)
        self.model = _Backbone(config, self.layout, backend, attention_backend, ep)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        self.rotary = RotaryEmbedding(config.rope)
        self.register_buffer("top_k", torch.empty(config.num_moe_layers, dtype=torch.int64), persistent=False)
        self.register_buffer("degrade_layers", torch.empty(config.num_moe_layers, dtype=torch.bool), persistent=False)
        self.load = LoadRecorder(config.num_moe_layers, config.num_experts, self.num_slots)
        self.requires_grad_(False)
        self.reset_state()

    def tie_weights(self) -> None:
        """Share the embedding with the LM head when the config ties them (again after a
        device move: `to_empty` gives each module its own copy)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def reset_state(self) -> None:
        """(Re)initialise every non-weight buffer: K, placement maps, counters."""
        self.top_k.fill_(self.config.top_k)
        self.degrade_layers.fill_(True)
        for module in self.modules():
            if module is not self and hasattr(module, "reset_state"):
                module.reset_state()

    def pack_weights(self, min_elements: int = 0) -> None:
        """Keep oneDNN-packed copies of every dense Linear's weight and every expert slot's with
        at least `min_elements` elements (model/cpu_gemm.py: fp32 on the CPU), which the forward
        then multiplies with. Call after the weights are loaded; a slot whose weights change
        repacks itself."""
        for module in self.modules():
            if module is not self and hasattr(module, "pack") and module.weight_elements() >= min_elements:
                module.pack()

    @property
    def moe_layers(self) -> list[SparseMoE]:
        return [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, SparseMoE)]

    def set_top_k(self, k: int, moe_layers: Iterable[int] | None = None) -> None:
        """Change the K in force (all MoE layers, or the given MoE-layer indices) without reloading."""
        if not 1 <= k <= self.config.top_k:
            raise ValueError(f"top_k must lie in [1, {self.config.top_k}], got {k}")
        if moe_layers is None:
            self.top_k.fill_(k)
        else:
            self.top_k[torch.tensor(list(moe_layers), dtype=torch.int64)] = k

    def set_degrade_layers(self, moe_layers: Iterable[int] | None) -> None:
        """The MoE layers (all when None) in which a request's degraded K applies."""
        self.degrade_layers.fill_(moe_layers is None)
        if moe_layers is not None:
            self.degrade_layers[torch.tensor(list(moe_layers), dtype=torch.int64)] = True

    def set_capacity(self, capacity_factor: float | None, overflow: str = "reroute") -> None:
        """Cap token-slots per expert per step at ceil(CF * T*K / E) in every MoE layer (None: off)."""
        for moe in self.moe_layers:
            moe.set_capacity(capacity_factor, overflow)

    def expert_load(self) -> ExpertLoad:
        """Routed-token counts of the last forward."""
        return self.load.snapshot()

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata, kv_cache: PagedKVCache,
                token_top_k: TokenTopK | None = None) -> torch.Tensor:
        """input_ids [T] -> final-norm hidden states [T, D]; writes this step's keys/values.
        Without `token_top_k` every token runs at each layer's `top_k`."""
        self.load.begin_step()
        return run_to_end(self.layer_steps(input_ids, meta, kv_cache, token_top_k))

    @torch.inference_mode()
    def forward_micro_batches(self, batches: Sequence[MicroBatch], kv_cache: PagedKVCache,
                              trace: OverlapTrace | None = None) -> torch.Tensor:
        """The step's batch as consecutive micro-batches, interleaved layer by layer so that one's
        all-to-all overlaps the other's compute (model/overlap.py) -> hidden [sum T_m, D] in batch
        order. Every expert-parallel rank must pass the same number of micro-batches."""
        self.load.begin_step()
        steps = [self.layer_steps(mb.input_ids, mb.meta, kv_cache, mb.token_top_k, trace, i)
                 for i, mb in enumerate(batches)]
        return torch.cat(interleave(steps))

    def layer_steps(self, input_ids: torch.Tensor, meta: AttentionMetadata, kv_cache: PagedKVCache,
                    token_top_k: TokenTopK | None = None, trace: OverlapTrace | None = None,
                    micro_batch: int = 0) -> Generator[str, None, torch.Tensor]:
        """The forward as a staged computation (see model/overlap.py): yields after issuing each
        MoE layer's dispatch and combine all-to-all (expert parallelism only), returns [T, D]."""
        h = self.model.embed_tokens(input_ids)  # [T, D]
        mla = self.config.mla
        cos, sin = self.rotary(meta.positions, torch.float32 if mla and mla.rope_fp32 else h.dtype)  # [T, Dh] x2
        for i, layer in enumerate(self.model.layers):
            if trace is not None:
                trace.record("attention", micro_batch, i)
            residual = h
            h = layer.self_attn(layer.input_layernorm(h), cos, sin, meta, kv_cache.key[i], kv_cache.value[i])
            h = residual + h
            residual = h
            x = layer.post_attention_layernorm(h)
            if layer.moe_layer is None:
                h = residual + layer.mlp(x)
            else:
                k = self.top_k[layer.moe_layer]  # []
                if token_top_k is not None:
                    k = torch.minimum(torch.where(self.degrade_layers[layer.moe_layer], token_top_k.degraded,
                                                  token_top_k.requested), k)  # [T]
                tr = None if trace is None else (lambda event, i=i: trace.record(event, micro_batch, i))
                h = residual + (yield from layer.mlp.steps(x, k, self.load, tr))
        return self.model.norm(h)

    def set_ep_group(self, group: object) -> None:
        """The data-plane group changed (recovery): every MoE layer uses the new one."""
        import dataclasses

        self.ep = dataclasses.replace(self.ep, group=group)
        for moe in self.moe_layers:
            moe.ep = dataclasses.replace(moe.ep, group=group)

    @torch.inference_mode()
    def forward_idle(self) -> None:
        """An expert-parallel worker with no tokens this step joins every MoE layer's collectives."""
        self.load.begin_step()
        x = self.model.embed_tokens.weight[:0]  # [0, D]
        for moe in self.moe_layers:
            moe.forward_idle(x)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, D] -> logits [N, V] in the model dtype (the sampler upcasts)."""
        return self.lm_head(hidden)
