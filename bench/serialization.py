"""The wire format between the front and the engine: msgpack (msgspec, typed) vs pickle.

Encodes and decodes the messages that cross per step, at serving sizes: a new request (a
128-token prompt; one message per sequence), and one step's EngineCoreOutputs with EngineStats and the
step's expert load (Mixtral: 32 MoE layers x 8 experts; Qwen3-30B: 48 x 128), for 1 to 256
sequences. Reports microseconds per message (encode + decode, best of --repeats timing loops)
and bytes, as JSON with the machine's description. --smoke: few sizes, few loops.
"""

from __future__ import annotations

import argparse
import json
import pickle
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from throughput import machine  # noqa: E402

from moeserve.engine.messages import (  # noqa: E402
    Codec,
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    EngineStats,
    ExpertLoadStats,
)
from moeserve.sampling_params import SamplingParams  # noqa: E402

LOAD_SHAPES = {"mixtral": (32, 8), "qwen3-30b": (48, 128)}


def step_outputs(num_seqs: int, layers: int, experts: int, logprobs: bool, rng: random.Random) -> EngineCoreOutputs:
    outputs = [EngineCoreOutput(f"cmpl-{i}-123456789", [rng.randrange(32000)],
                                [{rng.randrange(32000): -rng.random() for _ in range(5)}] if logprobs else None)
               for i in range(num_seqs)]
    load = ExpertLoadStats([[rng.randrange(1000) for _ in range(experts)] for _ in range(layers)],
                           [rng.random() * 100 for _ in range(layers)], num_seqs)
    stats = EngineStats(step=1000, timestamp=time.monotonic(), num_running=num_seqs, num_waiting=12,
                        num_waiting_tokens=3000, waiting_tokens_by_priority={0: 3000}, num_blocks=16384,
                        num_free_blocks=9000, step_time_s=0.031, num_prefill_tokens=0, num_decode_tokens=num_seqs,
                        prefill_tokens_per_s=5000.0, decode_tokens_per_s=900.0, step_time_base_s=0.01,
                        step_time_per_token_s=2e-5, prefill_tokens_per_step=100.0, num_requests_received=5000,
                        num_preemptions=3,
                        prefix_cache_hits=120, top_k=[2] * layers, expert_load=load)
    return EngineCoreOutputs(outputs, stats)


def requests(num: int, rng: random.Random) -> list[EngineCoreRequest]:
    return [EngineCoreRequest(f"cmpl-{i}-123456789", [rng.randrange(32000) for _ in range(128)],
                              SamplingParams(temperature=0.7, top_p=0.9, max_tokens=256, seed=i), (2,), 0)
            for i in range(num)]


def time_us(fn, loops: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(loops):
            fn()
        best = min(best, (time.perf_counter() - start) / loops)
    return best * 1e6


def compare(message, loops: int, repeats: int) -> dict:
    codec = Codec()
    frames = codec.encode(message)
    blob = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    assert codec.decode(frames) == message and pickle.loads(blob) == message
    msgpack_us = time_us(lambda: codec.decode(codec.encode(message)), loops, repeats)
    pickle_us = time_us(lambda: pickle.loads(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)), loops, repeats)
    return {"msgpack_us": msgpack_us, "pickle_us": pickle_us, "msgpack_bytes": sum(len(f) for f in frames),
            "pickle_bytes": len(blob), "speedup_msgpack_over_pickle": pickle_us / msgpack_us}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loops", type=int, default=200)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", type=Path, help="JSON file (default: bench/results/serialization-cpu.json)")
    args = p.parse_args(argv)
    sizes = (1, 8) if args.smoke else (1, 16, 64, 256)
    if args.smoke:
        args.loops, args.repeats = 5, 1
    rng = random.Random(0)
    rows = []
    for shape, (layers, experts) in LOAD_SHAPES.items():
        for n in sizes:
            for logprobs in (False, True):
                row = {"message": "EngineCoreOutputs", "load_shape": shape, "sequences": n, "logprobs": logprobs}
                rows.append({**row, **compare(step_outputs(n, layers, experts, logprobs, rng), args.loops,
                                              args.repeats)})
    rows.append({"message": "EngineCoreRequest", "prompt_tokens": 128,
                 **compare(requests(1, rng)[0], args.loops, args.repeats)})
    result = {"benchmark": "serialization", "machine": machine(),
              "command": "python bench/serialization.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "rows": rows}
    out = args.out or Path(__file__).parent / "results" / "serialization-cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for r in rows:
        what = (f"{r['message']} {r.get('load_shape', '')} n={r.get('sequences', '')} "
                f"logprobs={r.get('logprobs', '')}" if r["message"] == "EngineCoreOutputs" else r["message"])
        print(f"{what:60s} msgpack {r['msgpack_us']:8.1f} us {r['msgpack_bytes']:7d} B   "
              f"pickle {r['pickle_us']:8.1f} us {r['pickle_bytes']:7d} B")
    return 0


if __name__ == "__main__":
    sys.exit(main())
