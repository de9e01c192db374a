"""Load a Hugging Face checkpoint directory (Hub layout) into a MoEForCausalLM.

Every tensor the model needs must come from the files, with the right shape, exactly once;
anything else is a CheckpointError naming the tensor. Per-expert Hub tensors
(`block_sparse_moe.experts.{e}.w1/w2/w3` for Mixtral, `mlp.experts.{e}.{gate,up,down}_proj`
for Qwen/OLMoE) are copied once into the physical-slot tensors w13 [P, 2I, D] / w2 [P, D, I]
at expert e's home slot (slot e with one slot group); spare slots start zeroed and empty.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from moeserve.model_config import CheckpointError, ModelConfig, parse_dtype
from moeserve.model.decoder import MoEForCausalLM
from moeserve.model.moe.dispatch import ExpertParallelGroup

_EXPERT_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(\w+)\.weight$")
# Tensors some Hub checkpoints carry that hold nothing the model needs.
_IGNORED_RE = re.compile(r"\.rotary_emb\.inv_freq$")


# Mixtral's Hub names put the MoE block under `block_sparse_moe` and call the expert
# projections w1 (gate), w3 (up), w2 (down); moeserve names it `mlp` as the other families do.
_MIXTRAL_EXPERT_NAMES = {"gate": "w1", "up": "w3", "down": "w2"}
_QWEN_EXPERT_NAMES = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


def _hub_to_moeserve(name: str, config: ModelConfig) -> str:
    if config.model_type == "mixtral":
        return name.replace(".block_sparse_moe.", ".mlp.")
    return name


def _moeserve_to_hub(name: str, config: ModelConfig) -> str:
    if config.model_type == "mixtral":
        return re.sub(r"(model\.layers\.\d+)\.mlp\.", r"\1.block_sparse_moe.", name)
    return name


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


def read_expert(path: str | Path, config: ModelConfig, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One expert's (w13 [2I, D], w2 [D, I]) of decoder layer `layer`, read from the files alone
    (a restarted expert-parallel worker refilling a slot that held a replica)."""
    names = {part: _expert_hub_name(config, layer, expert, part) for part in ("gate", "up", "down")}
    found: dict[str, torch.Tensor] = {}
    for f in weight_files(Path(path)):
        with _open(f) as handle:
            keys = set(handle.keys())
            for part, name in names.items():
                if name in keys:
                    found[part] = handle.get_tensor(name)
    missing = [names[p] for p in names if p not in found]
    if missing:
        raise CheckpointError(f"{path}: no tensor {missing[0]}")
    return torch.cat([found["gate"], found["up"]]), found["down"]


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
) -> MoEForCausalLM:
    """Build the model on the meta device, allocate it on `device` in `dtype` ('auto' follows
    the checkpoint), then fill every parameter from the checkpoint. Backends 'auto': triton
    kernels on CUDA (when triton is installed), torch elsewhere. With `ep` (an expert-parallel
    worker) only that worker's slots are allocated and only their experts read."""
    path = Path(path)
    config = ModelConfig.from_pretrained(path)
    files = weight_files(path)
    torch_dtype = _checkpoint_dtype(config, files) if dtype == "auto" else parse_dtype(dtype)
    if num_redundant_experts < 0:
        raise ValueError(f"num_redundant_experts must be >= 0, got {num_redundant_experts}")

    expert_backend, attention_backend = resolve_backends(expert_backend, attention_backend, device, torch_dtype)
    with torch.device("meta"):
        model = MoEForCausalLM(config, num_redundant_experts, expert_backend, attention_backend, expert_slot_groups, ep)
    _materialise(model, torch.device(device), torch_dtype)
    model.reset_state()
    _fill(model, config, files)
    model.eval()
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
                    target = dtype if as_param and t.is_floating_point() else t.dtype
                    new = torch.empty(t.shape, dtype=target, device=device)
                    made[id(t)] = nn.Parameter(new, requires_grad=False) if as_param else new
                slots[name] = made[id(t)]


def resolve_backends(
    expert_backend: str, attention_backend: str, device: str | torch.device, dtype: torch.dtype = torch.bfloat16
) -> tuple[str, str]:
    """'auto' -> the device's default; a backend that cannot run here is a ValueError (at start,
    not at the first request): triton with neither CUDA nor the interpreter, grouped_mm on CUDA
    in anything but bf16 (torch's CUDA grouped GEMM takes bf16 only)."""
    from moeserve.kernels import triton_usable
    from moeserve.model.attention import ATTENTION_BACKENDS
    from moeserve.model.moe.experts import EXPERT_BACKENDS, default_expert_backend

    default = default_expert_backend(device)
    expert_backend = default if expert_backend == "auto" else expert_backend
    attention_backend = default if attention_backend == "auto" else attention_backend
    for kind, name, known in (("moe", expert_backend, EXPERT_BACKENDS), ("attention", attention_backend,
                                                                         ATTENTION_BACKENDS)):
        if name not in known:
            raise ValueError(f"unknown {kind} backend {name!r}; choose auto, {', '.join(known)}")
        if name == "triton" and not triton_usable(device):
            raise ValueError(f"the triton {kind} backend needs triton and a CUDA device (or TRITON_INTERPRET=1 "
                             f"for the CPU interpreter); device is {device}")
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
    stacked = {n for n in params if n.endswith((".mlp.w13", ".mlp.w2"))}
    expected -= stacked
    loaded: set[str] = set()
    for moe in model.moe_layers:
        moe.w13.zero_()
        moe.w2.zero_()
    moe_layer_ids = set(config.moe_layer_ids)
    experts_needed = {(layer, e, part) for layer in moe_layer_ids for e in range(config.num_experts)
                      for part in ("gate", "up", "down")}
    I = config.moe_intermediate_size
    home = model.layout.home_slot  # expert e's weights go to slot home[e]
    expert_part = {hub: part for part, hub in _expert_names(config).items()}

    def elsewhere(hub_name: str) -> bool:
        """An expert another worker holds (only under expert parallelism)."""
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

    missing = [_moeserve_to_hub(n, config) for n in sorted(expected)] + [
        _expert_hub_name(config, layer, e, part) for layer, e, part in sorted(experts_needed)
    ]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"checkpoint is missing tensor(s): {', '.join(missing[:5])}{more}")


_WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _copy(hub_name: str, target: torch.Tensor, tensor: torch.Tensor) -> None:
    if tensor.dtype not in _WEIGHT_DTYPES:
        raise CheckpointError(f"tensor {hub_name} has dtype {tensor.dtype}; expected float32, bfloat16 or float16")
    if tuple(tensor.shape) != tuple(target.shape):
        raise CheckpointError(
            f"tensor {hub_name} has shape {list(tensor.shape)}, expected {list(target.shape)}"
        )
    target.copy_(tensor)
