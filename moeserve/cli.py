"""The `moeserve` command. Subcommands mirror vLLM's: `serve` (HTTP + gRPC), `generate`
(prompts through the engine offline), `bench serve|compare` (the load-test harness), and
`inspect` (how a checkpoint will be loaded)."""

from __future__ import annotations

import argparse
import sys

from moeserve.config import AdmissionConfig, ServerConfig, add_engine_flags, add_flags, engine_config_from_args, from_args
from moeserve.errors import CheckpointError, EngineStartError


def _inspect(args: argparse.Namespace) -> int:
    from moeserve.model_config import ModelConfig

    config = ModelConfig.from_pretrained(args.model)
    print(f"architecture      {config.architecture} ({config.model_type})")
    print(f"layers            {config.num_layers} ({config.num_moe_layers} MoE, "
          f"{config.num_layers - config.num_moe_layers} dense)")
    print(f"hidden / heads    {config.hidden_size} / {config.num_heads} q, {config.num_kv_heads} kv, "
          f"head_dim {config.head_dim}")
    if config.mla is not None:
        m = config.mla
        print(f"attention         MLA: kv_lora_rank {m.kv_lora_rank}, q_lora_rank {m.q_lora_rank}, "
              f"nope/rope/v dims {m.qk_nope_head_dim}/{m.qk_rope_head_dim}/{m.v_head_dim}")
    if config.attention_sinks:
        print("attention         sinks (one learned logit per head)")
    heads, key_dim, value_dim = config.kv_entry
    cached = heads * key_dim if config.mla is not None else heads * (key_dim + value_dim)
    print(f"kv cache          {cached} values per token per layer")
    print(f"experts           {config.num_experts}, top-{config.top_k}, intermediate "
          f"{config.moe_intermediate_size}, renormalise {config.renormalize}")
    r = config.router
    print(f"router            {r.scoring}, groups {r.group_select} ({r.topk_group} of {r.n_group}), "
          f"scale {r.routed_scaling_factor:g}, expert activation {config.expert_activation.kind}"
          f"{', expert biases' if config.expert_bias else ''}")
    if config.quantization:
        print(f"quantization      {config.quantization} (dequantised at load)")
    if config.shared_expert_intermediate_size:
        print(f"shared expert     intermediate {config.shared_expert_intermediate_size}")
    print(f"rope              {config.rope.rope_type}, theta {config.rope.theta:g}")
    windows = sorted({w for w in config.sliding_windows if w})
    print(f"sliding window    {windows or 'none'}")
    print(f"checkpoint dtype  {config.checkpoint_dtype or 'unspecified'}")
    return 0


def _add_engine_flags(p: argparse.ArgumentParser, model_optional: bool = False) -> None:
    """The model path, then one flag per engine-config field (moeserve.config generates them)."""
    if model_optional:
        p.add_argument("model", nargs="?", help="path to a checkpoint directory in Hub layout "
                       "(default: the embedded default model)")
    else:
        p.add_argument("model", help="path to a checkpoint directory in Hub layout")
    add_engine_flags(p)


def _generate(args: argparse.Namespace) -> int:
    from moeserve.entrypoints.llm import LLM
    from moeserve.sampling_params import SamplingParams

    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_tokens=args.max_tokens, seed=args.sampling_seed, stop=tuple(args.stop or ()),
                            ignore_eos=args.ignore_eos)
    llm = LLM.from_config(engine_config_from_args(args.model, args))
    prompts = args.prompt or [sys.stdin.read()]
    for out in llm.generate(prompts, params):
        print(out.outputs[0].text)
    return 0


def _bench(args: argparse.Namespace) -> int:
    try:
        from moeserve.bench import serve as bench_serve
    except ImportError as e:
        print(f"moeserve bench needs the [bench] extra (httpx, matplotlib): {e}", file=sys.stderr)
        return 2
    return bench_serve.main(args.rest) if args.what == "serve" else bench_serve.compare_main(args.rest)


EMBEDDED_MODEL = "moeserve-tiny-moe"


def _default_model() -> tuple[str, str]:
    """(path, served name) of the embedded default model: models/moeserve-tiny-moe of the source
    tree (or of /opt/moeserve in the Docker image). Without it (a tree that does not ship the
    weights), a small random Mixtral is made on first use in the user's cache, with a warning."""
    import logging
    import os
    from pathlib import Path

    log = logging.getLogger("moeserve.server")
    for root in (Path(__file__).resolve().parents[1], Path("/opt/moeserve")):
        path = root / "models" / EMBEDDED_MODEL
        if (path / "config.json").is_file():
            log.info("serving the embedded default model %s", path)
            return str(path), EMBEDDED_MODEL
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "moeserve" / "tiny-random-mixtral"
    if not (cache / "config.json").is_file():
        from moeserve.testing.checkpoints import make_tiny_checkpoint

        make_tiny_checkpoint("mixtral", cache)
    log.warning("the embedded default model is missing: serving a small RANDOM checkpoint made at %s "
                "(its text is noise)", cache)
    return str(cache), "tiny-random-mixtral"


def _serve(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from moeserve.entrypoints.server import serve

    logging.basicConfig(level=getattr(logging, (args.log_level or "info").upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.model is None:
        args.model, name = _default_model()
        args.served_model_name = args.served_model_name or name
    server = from_args(ServerConfig, args)
    if server.replicas is not None:
        return _serve_replicas(args, server)
    asyncio.run(serve(engine_config_from_args(args.model, args), server, from_args(AdmissionConfig, args)))
    return 0


def _serve_replicas(args: argparse.Namespace, server: ServerConfig) -> int:
    """--replicas N: the Ray Serve application of cluster/local.yaml on this machine; engine and
    admission flags apply in every replica (so a tenant's quota is per replica)."""
    import dataclasses

    from moeserve.config import engine_settings
    from moeserve.entrypoints.ray_serve import ServeArgs, run_local

    if server.replicas < 1:
        raise ValueError(f"--replicas must be >= 1, got {server.replicas}")
    unsupported = [flag for flag, value in (("--grpc-port", server.grpc_port), ("--router-config", server.router_config))
                   if value is not None]
    if unsupported:
        raise ValueError(f"{', '.join(unsupported)} cannot be combined with --replicas yet")
    settings = engine_settings(engine_config_from_args(args.model, args))
    admission = from_args(AdmissionConfig, args)
    admission_settings = {f.name: getattr(admission, f.name) for f in dataclasses.fields(AdmissionConfig)
                          if getattr(admission, f.name) != getattr(AdmissionConfig(), f.name)}
    run_local(ServeArgs.from_dict(dict(model=args.model, served_model_name=server.served_model_name,
                                       num_replicas=server.replicas, engine=settings, admission=admission_settings,
                                       api_keys=list(server.api_key), log_level=server.log_level)),
              server.host, server.port)
    return 0


def _router(args: argparse.Namespace) -> int:
    import json

    from moeserve.router.replay import replay_file

    print(json.dumps(replay_file(args.audit, args.config), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moeserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="show how a Hugging Face MoE checkpoint will be loaded")
    p.add_argument("model", help="path to a checkpoint directory in Hub layout")
    p.set_defaults(func=_inspect)
    p = sub.add_parser("generate", help="generate from prompts offline and print the completions")
    _add_engine_flags(p)
    p.add_argument("--prompt", action="append", help="a prompt (repeatable; default: read stdin)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--stop", action="append", help="a stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--sampling-seed", type=int, help="seed of this request's sampling")
    p.set_defaults(func=_generate)
    p = sub.add_parser("bench", add_help=False,
                       help="load-test a server (bench serve --help) or compare two runs (bench compare A B)")
    p.add_argument("what", choices=["serve", "compare"])
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_bench)
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (and gRPC with --grpc-port)")
    _add_engine_flags(p, model_optional=True)
    add_flags(p, ServerConfig)
    add_flags(p, AdmissionConfig)
    p.set_defaults(func=_serve)
    p = sub.add_parser("router", help="the outer router's offline tools: replay AUDIT.jsonl --config NEW.yaml")
    p.add_argument("what", choices=["replay"])
    p.add_argument("audit", help="an audit log (router config `audit.path`)")
    p.add_argument("--config", required=True, help="the router config whose policy to estimate")
    p.set_defaults(func=_router)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CheckpointError, EngineStartError, ValueError) as e:
        print(f"moeserve: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
