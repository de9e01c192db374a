"""Load a Hugging Face checkpoint directory (Hub layout) into a MoEForCausalLM.

Every tensor the model needs must come from the files, with the right shape, exactly once;
anything else is a CheckpointError naming the tensor. Per-expert Hub tensors
(`block_sparse_moe.experts.{e}.w1/w2/w3` for Mixtral, `mlp.experts.{e}.{gate,up,down}_proj`
for Qwen/OLMoE/DeepSeek) are copied once into the physical-slot tensors w13 [P, 2I, D] / w2
[P, D, I] at expert e's home slot (slot e with one slot group); spare slots start zeroed and
empty. GPT-OSS stores each layer's experts stacked (`mlp.experts.gate_up_proj` [E, D, 2I] with
gate and up interleaved column by column, `down_proj` [E, I, D], their biases), or as MXFP4
`*_blocks`/`*_scales` [E, out, in / 32, ...] (moeserve.mxfp4): both are transposed,
de-interleaved (gate rows, then up rows) and dequantised into the same slot tensors. DeepSeek-V3
checkpoints carry a multi-token-prediction layer past num_hidden_layers: it is skipped.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from moeserve.model_config import CheckpointError, ModelConfig, parse_dtype
from moeserve.model.cpu_gemm import MIN_PACKED_ELEMENTS, resolve_cpu_gemm
from moeserve.model.decoder import MoEForCausalLM
from moeserve.model.moe import SparseMoE
from moeserve.model.moe.dispatch import ExpertParallelGroup
from moeserve.mxfp4 import dequantize_mxfp4

log = logging.getLogger(__name__)

_EXPERT_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(\w+)\.weight$")
# GPT-OSS: one tensor per layer and part, every expert stacked on dim 0.
_STACKED_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)(_bias|_blocks|_scales)?$")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
# Tensors some Hub checkpoints carry that hold nothing the model needs.
_IGNORED_RE = re.compile(r"\.rotary_emb\.inv_freq$")


# Mixtral's Hub names put the MoE block under `block_sparse_moe` and call the expert
# projections w1 (gate), w3 (up), w2 (down); moeserve names it `mlp` as the other families do.
_MIXTRAL_EXPERT_NAMES = {"gate": "w1", "up": "w3", "down": "w2"}
_QWEN_EXPERT_NAMES = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


# Hub module names that moeserve calls otherwise, per family: (Hub, moeserve) fragments.
_RENAMES = {
    "mixtral": ((".block_sparse_moe.", ".mlp."),),
    "deepseek_v2": ((".mlp.shared_experts.", ".mlp.shared_expert."),),
    "deepseek_v3": ((".mlp.shared_experts.", ".mlp.shared_expert."),),
    "gpt_oss": ((".mlp.router.", ".mlp.gate."),),
}


def _hub_to_moeserve(name: str, config: ModelConfig) -> str:
    for hub, ours in _RENAMES.get(config.model_type, ()):
        name = name.replace(hub, ours)
    return name


def _moeserve_to_hub(name: str, config: ModelConfig) -> str:
    for hub, ours in _RENAMES.get(config.model_type, ()):
        name = name.replace(ours, hub)
    return name


def _stacked(config: ModelConfig) -> bool:
    return config.model_type == "gpt_oss"


def _stacked_parts(config: ModelConfig) -> tuple[str, ...]:
    """The stacked tensors each MoE layer needs, by suffix after `mlp.experts.`."""
    if config.quantization == "mxfp4":
        return ("gate_up_proj_blocks", "gate_up_proj_scales", "gate_up_proj_bias",
                "down_proj_blocks", "down_proj_scales", "down_proj_bias")
    return ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")


def _beyond_layers(name: str, config: ModelConfig) -> bool:
    """A tensor of a layer past num_hidden_layers (DeepSeek-V3's MTP module): not served."""
    match = _LAYER_RE.match(name)
    return bool(match) and config.mla is not None and int(match[1]) >= config.num_layers


def _expert_from_stacked(parts: dict[str, torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """One expert's stacked GPT-OSS tensors (dim 0 already taken) -> its slot tensors [w13 [2I, D],
    w2 [D, I], b13 [2I], b2 [D]], gate rows before up rows."""
    if "gate_up_proj_blocks" in parts:
        gate_up = dequantize_mxfp4(parts["gate_up_proj_blocks"], parts["gate_up_proj_scales"], dtype)  # [2I, D]
        down = dequantize_mxfp4(parts["down_proj_blocks"], parts["down_proj_scales"], dtype)  # [D, I]
    else:
        gate_up, down = parts["gate_up_proj"].t(), parts["down_proj"].t()  # [2I, D], [D, I]
    bias = parts["gate_up_proj_bias"]  # [2I]
    return [torch.cat([gate_up[0::2], gate_up[1::2]]), down,
            torch.cat([bias[0::2], bias[1::2]]), parts["down_proj_bias"]]


def _expert_names(config: ModelConfig) -> dict[str, str]:
    """part -> Hub projection name; gate and up are w13's rows :I and I:, down is w2."""
    return _MIXTRAL_EXPERT_NAMES if config.model_type == "mixtral" else _QWEN_EXPERT_NAMES


def _expert_hub_name(config: ModelConfig, layer: int, expert: int, part: str) -> str:
    names = _expert_names(config)
    return _moeserve_to_hub(f"model.layers.{layer}.mlp.experts.{expert}.{names[part]}.weight", config)


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint, from its index when it has one."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map")
        except (json.JSONDecodeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a valid index ({e})") from e
        if not weight_map:
            raise CheckpointError(f"{index}: no weight_map")
        files = [path / f for f in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{index} names {f.name}, which is missing")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors weights (only safetensors checkpoints are supported)")
    return files


def _open(f: Path):
    try:
        return safe_open(str(f), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{f.name}: not a readable safetensors file ({e})") from e


def _iter_tensors(files: list[Path], skip=lambda name: False) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every tensor in the files, except those `skip(name)` says are not needed
    here (never read: an expert-parallel worker reads only its own experts)."""
    seen: set[str] = set()
    with ExitStack() as stack:
        for f in files:
            handle = stack.enter_context(_open(f))
            for name in handle.keys():
                if name in seen:
                    raise CheckpointError(f"tensor {name} appears in more than one weight file")
                seen.add(name)
                if skip(name):
                    continue
                try:
                    tensor = handle.get_tensor(name)
                except Exception as e:
                    raise CheckpointError(f"{f.name}: tensor {name} cannot be read ({e})") from e
                yield name, tensor


def read_expert(path: str | Path, config: ModelConfig, layer: int, expert: int) -> list[torch.Tensor]:
    """One expert's slot tensors of decoder layer `layer` (w13 [2I, D], w2 [D, I], and for
    GPT-OSS b13 [2I], b2 [D]), read from the files alone (a restarted expert-parallel worker
    refilling a slot that held a replica)."""
    if _stacked(config):
        names = {part: f"model.layers.{layer}.mlp.experts.{part}" for part in _stacked_parts(config)}
    else:
        names = {part: _expert_hub_name(config, layer, expert, part) for part in ("gate", "up", "down")}
    found: dict[str, torch.Tensor] = {}
    for f in weight_files(Path(path)):
        with _open(f) as handle:
            keys = set(handle.keys())
            for part, name in names.items():
                if name in keys:
                    found[part] = handle.get_slice(name)[expert] if _stacked(config) else handle.get_tensor(name)
    missing = [names[p] for p in names if p not in found]
    if missing:
        raise CheckpointError(f"{path}: no tensor {missing[0]}")
    if _stacked(config):
        return _expert_from_stacked(found, torch.float32)
    return [torch.cat([found["gate"], found["up"]]), found["down"]]


def _checkpoint_dtype(config: ModelConfig, files: list[Path]) -> torch.dtype:
    if config.checkpoint_dtype:
        return parse_dtype(config.checkpoint_dtype)
    with _open(files[0]) as handle:
        for name in handle.keys():
            dtype = handle.get_slice(name).get_dtype()
            mapped = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(dtype)
            if mapped is not None:
                return mapped
    return torch.float32


def load_model(
    path: str | Path,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    num_redundant_experts: int = 0,
    expert_backend: str = "auto",
    attention_backend: str = "auto",
    expert_slot_groups: int = 1,
    ep: ExpertParallelGroup | None = None,
    cpu_gemm: str = "auto",
) -> MoEForCausalLM:
    """Build the model on the meta device, allocate it on `device` in `dtype` ('auto' follows
    the checkpoint), then fill every parameter from the checkpoint. Backends 'auto': triton
    kernels on CUDA (when triton is installed), torch elsewhere, except attention in fp32 on the
    CPU: cpu (kernels/cpu_attention.py) when its kernel builds. With `ep` (an expert-parallel
    worker) only that worker's slots are allocated and only their experts read. `cpu_gemm`
    'auto' packs fp32 weights of MIN_PACKED_ELEMENTS or more for oneDNN on the CPU, 'onednn'
    every weight (model/cpu_gemm.py); 'aten' none."""
    path = Path(path)
    config = ModelConfig.from_pretrained(path)
    files = weight_files(path)
    torch_dtype = _checkpoint_dtype(config, files) if dtype == "auto" else parse_dtype(dtype)
    if num_redundant_experts < 0:
        raise ValueError(f"num_redundant_experts must be >= 0, got {num_redundant_experts}")

    expert_backend, attention_backend = resolve_backends(expert_backend, attention_backend, device, torch_dtype,
                                                         config.expert_activation, config.expert_bias)
    gemm = resolve_cpu_gemm(cpu_gemm, device, torch_dtype)
    with torch.device("meta"):
        model = MoEForCausalLM(config, num_redundant_experts, expert_backend, attention_backend, expert_slot_groups, ep)
    _materialise(model, torch.device(device), torch_dtype)
    model.reset_state()
    _fill(model, config, files)
    model.eval()
    if gemm == "onednn":
        model.pack_weights(min_elements=0 if cpu_gemm == "onednn" else MIN_PACKED_ELEMENTS)
    return model


def _materialise(model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Give every meta tensor uninitialised storage on `device`: parameters in `dtype` straight
    away (never an fp32 stage, which would need twice a bf16 model's memory), buffers in the
    dtype they were declared with (int64 maps, fp32 counters). A tensor shared by several
    modules (tied embeddings) is allocated once and stays shared."""
    made: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for slots, as_param in ((module._parameters, True), (module._buffers, False)):
            for name, t in slots.items():
                if t is None:
                    continue
                if id(t) not in made:
                    # A module's keep_fp32_params stay fp32 in any model dtype (V3's correction bias).
                    keep = name in getattr(module, "keep_fp32_params", ())
                    target = dtype if as_param and t.is_floating_point() and not keep else t.dtype
                    new = torch.empty(t.shape, dtype=target, device=device)
                    made[id(t)] = nn.Parameter(new, requires_grad=False) if as_param else new
                slots[name] = made[id(t)]


def resolve_backends(
    expert_backend: str, attention_backend: str, device: str | torch.device, dtype: torch.dtype = torch.bfloat16,
    act=None, biases: bool = False,
) -> tuple[str, str]:
    """'auto' -> the device's default; a backend that cannot run here is a ValueError (at start,
    not at the first request): triton with neither CUDA nor the interpreter, grouped_mm on CUDA
    in anything but bf16 (torch's CUDA grouped GEMM takes bf16 only)."""
    from moeserve.kernels import triton_usable
    from moeserve.model.attention import ATTENTION_BACKENDS
    from moeserve.model.moe.experts import EXPERT_BACKENDS, SILU, default_expert_backend

    default = default_expert_backend(device, act or SILU, biases)
    expert_backend = default if expert_backend == "auto" else expert_backend
    if attention_backend == "auto":
        attention_backend = default_expert_backend(device)
        if attention_backend == "torch" and torch.device(device).type == "cpu" and dtype == torch.float32:
            from moeserve.kernels import cpu_attention

            attention_backend = "cpu" if cpu_attention.usable() else "torch"
    for kind, name, known in (("moe", expert_backend, EXPERT_BACKENDS), ("attention", attention_backend,
                                                                         ATTENTION_BACKENDS)):
        if name not in known:
            raise ValueError(f"unknown {kind} backend {name!r}; choose auto, {', '.join(known)}")
        if name == "triton" and not triton_usable(device):
            raise ValueError(f"the triton {kind} backend needs triton and a CUDA device (or TRITON_INTERPRET=1 "
                             f"for the CPU interpreter); device is {device}")
    if attention_backend == "cpu":
        from moeserve.kernels import cpu_attention

        if torch.device(device).type != "cpu" or not cpu_attention.usable():
            raise ValueError(f"the cpu attention backend runs a C++ kernel on the CPU, built with g++ and ninja; "
                             f"device is {device}{'' if torch.device(device).type != 'cpu' else ', and it did not build'}")
        if dtype != torch.float32:
            log.warning("the cpu attention backend's kernel computes fp32 only; in %s every group takes the torch path",
                        dtype)
    if expert_backend == "grouped_mm" and str(device).startswith("cuda") and dtype != torch.bfloat16:
        raise ValueError(f"the grouped_mm moe backend takes bfloat16 on CUDA, not {dtype}; use --dtype bfloat16 "
                         "or --moe-backend triton")
    return expert_backend, attention_backend


@torch.no_grad()
def _fill(model: MoEForCausalLM, config: ModelConfig, files: list[Path]) -> None:
    params = dict(model.named_parameters())
    expected = set(params)
    if config.tie_word_embeddings:
        expected.discard("lm_head.weight")
    stacked = {n for n in params if n.endswith((".mlp.w13", ".mlp.w2", ".mlp.b13", ".mlp.b2"))}
    expected -= stacked
    loaded: set[str] = set()
    for moe in model.moe_layers:
        for t in moe.slot_tensors():
            t.zero_()
    moe_layer_ids = set(config.moe_layer_ids)
    if _stacked(config):
        experts_needed = {(layer, part) for layer in moe_layer_ids for part in _stacked_parts(config)}
    else:
        experts_needed = {(layer, e, part) for layer in moe_layer_ids for e in range(config.num_experts)
                          for part in ("gate", "up", "down")}
    I = config.moe_intermediate_size
    home = model.layout.home_slot  # expert e's weights go to slot home[e]
    expert_part = {hub: part for part, hub in _expert_names(config).items()}
    pending: dict[int, dict[str, torch.Tensor]] = {}  # GPT-OSS layer -> its stacked tensors so far

    def elsewhere(hub_name: str) -> bool:
        """An expert another worker holds (only under expert parallelism), or a layer not served."""
        if _beyond_layers(hub_name, config):
            return True
        match = _EXPERT_RE.match(_hub_to_moeserve(hub_name, config))
        if model.ep is None or not match or int(match[1]) not in moe_layer_ids or int(match[2]) >= config.num_experts:
            return False
        if model.model.layers[int(match[1])].mlp.local(home[int(match[2])]) is not None:
            return False
        experts_needed.discard((int(match[1]), int(match[2]), expert_part.get(match[3])))
        return True

    for hub_name, tensor in _iter_tensors(files, elsewhere):
        if _IGNORED_RE.search(hub_name):
            continue
        name = _hub_to_moeserve(hub_name, config)
        match = _EXPERT_RE.match(name)
        stacked_match = _STACKED_RE.match(name) if _stacked(config) else None
        if stacked_match:
            layer, part = int(stacked_match[1]), stacked_match[2] + (stacked_match[3] or "")
            if layer not in moe_layer_ids or part not in _stacked_parts(config):
                raise CheckpointError(f"unexpected tensor {hub_name} for a {config.architecture} with this config")
            if (layer, part) not in experts_needed:
                raise CheckpointError(f"tensor {hub_name} appears twice")
            pending.setdefault(layer, {})[part] = tensor
            experts_needed.discard((layer, part))
            if len(pending[layer]) == len(_stacked_parts(config)):
                _fill_stacked(model.model.layers[layer].mlp, pending.pop(layer), config, home, hub_name)
            continue
        if match:
            layer, expert, proj = int(match[1]), int(match[2]), match[3]
            part = expert_part.get(proj)
            if layer not in moe_layer_ids or expert >= config.num_experts or part is None:
                raise CheckpointError(f"unexpected tensor {hub_name} for a {config.architecture} with this config")
            if (layer, expert, part) not in experts_needed:
                raise CheckpointError(f"tensor {hub_name} appears twice (under two names)")
            mlp = model.model.layers[layer].mlp
            slot = mlp.local(home[expert])
            target = {"gate": mlp.w13[slot, :I], "up": mlp.w13[slot, I:], "down": mlp.w2[slot]}[part]
            _copy(hub_name, target, tensor)
            experts_needed.discard((layer, expert, part))
            continue
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if name in loaded:
            raise CheckpointError(f"tensor {hub_name} appears twice (under two names)")
        if name not in expected:
            raise CheckpointError(f"unexpected tensor {hub_name} for a {config.architecture} with this config")
        _copy(hub_name, params[name], tensor)
        expected.discard(name)
        loaded.add(name)

    missing = [_moeserve_to_hub(n, config) for n in sorted(expected)]
    if _stacked(config):
        missing += [f"model.layers.{layer}.mlp.experts.{part}" for layer, part in sorted(experts_needed)]
    else:
        missing += [_expert_hub_name(config, layer, e, part) for layer, e, part in sorted(experts_needed)]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"checkpoint is missing tensor(s): {', '.join(missing[:5])}{more}")


def _fill_stacked(mlp: SparseMoE, parts: dict[str, torch.Tensor], config: ModelConfig, home: list[int],
                  hub_name: str) -> None:
    """One GPT-OSS layer's stacked expert tensors into the slots this worker holds."""
    E = config.num_experts
    for part, t in parts.items():
        if t.shape[0] != E:
            raise CheckpointError(f"{hub_name.rsplit('.', 1)[0]}.{part} has shape {list(t.shape)}, "
                                  f"expected {E} experts on dim 0")
        if part.endswith(("_blocks", "_scales")) and t.dtype != torch.uint8:
            raise CheckpointError(f"{hub_name.rsplit('.', 1)[0]}.{part} has dtype {t.dtype}; MXFP4 needs uint8")
    for expert in range(E):
        slot = mlp.local(home[expert])
        if slot is None:
            continue
        try:
            values = _expert_from_stacked({part: t[expert] for part, t in parts.items()}, torch.float32)
        except ValueError as e:
            raise CheckpointError(f"{hub_name.rsplit('.', 1)[0]}: {e}") from e
        for target, value, what in zip(mlp.slot_tensors(), values, ("w13", "w2", "b13", "b2")):
            _copy(f"{hub_name.rsplit('.', 1)[0]} (expert {expert}, {what})", target[slot], value)


_WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _copy(hub_name: str, target: torch.Tensor, tensor: torch.Tensor) -> None:
    if tensor.dtype not in _WEIGHT_DTYPES:
        raise CheckpointError(f"tensor {hub_name} has dtype {tensor.dtype}; expected float32, bfloat16 or float16")
    if tuple(tensor.shape) != tuple(target.shape):
        raise CheckpointError(
            f"tensor {hub_name} has shape {list(tensor.shape)}, expected {list(target.shape)}"
        )
    target.copy_(tensor)
