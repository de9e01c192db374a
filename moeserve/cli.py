"""The `moeserve` command. Subcommands mirror vLLM's (`serve`, `generate`, `bench`); each lands
with the issue that builds its stage. `inspect` shows how a checkpoint will be loaded."""

from __future__ import annotations

import argparse
import sys

from moeserve.config import CheckpointError, ModelConfig


def _inspect(args: argparse.Namespace) -> int:
    config = ModelConfig.from_pretrained(args.model)
    print(f"architecture      {config.architecture} ({config.model_type})")
    print(f"layers            {config.num_layers} ({config.num_moe_layers} MoE, "
          f"{config.num_layers - config.num_moe_layers} dense)")
    print(f"hidden / heads    {config.hidden_size} / {config.num_heads} q, {config.num_kv_heads} kv, "
          f"head_dim {config.head_dim}")
    print(f"experts           {config.num_experts}, top-{config.top_k}, intermediate "
          f"{config.moe_intermediate_size}, renormalise {config.renormalize}")
    if config.shared_expert_intermediate_size:
        print(f"shared expert     intermediate {config.shared_expert_intermediate_size}")
    print(f"rope              {config.rope.rope_type}, theta {config.rope.theta:g}")
    windows = sorted({w for w in config.sliding_windows if w})
    print(f"sliding window    {windows or 'none'}")
    print(f"checkpoint dtype  {config.checkpoint_dtype or 'unspecified'}")
    return 0


def _not_yet(name: str, issue: str):
    def run(args: argparse.Namespace) -> int:
        print(f"moeserve {name}: not implemented yet ({issue})", file=sys.stderr)
        return 2

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moeserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="show how a Hugging Face MoE checkpoint will be loaded")
    p.add_argument("model", help="path to a checkpoint directory in Hub layout")
    p.set_defaults(func=_inspect)
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP/gRPC server")
    p.add_argument("model", nargs="?")
    p.set_defaults(func=_not_yet("serve", "the serving-front issue"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CheckpointError as e:
        print(f"moeserve: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
