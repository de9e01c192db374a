#!/usr/bin/env bash
# shared/GPU.md items 1, 3 and 5 in one device call (about 8 minutes on an H200), results under $OUT:
#   run(command="bash bench/gpu/session.sh", carry=[".whl"], timeout_s=590)
# after `bash bench/gpu/fetch_wheels.sh` here. The device machine is bare: no install of the project
# (its build needs grpc_tools, absent there); the package is used from the tree, with kernels/ linked
# in as moeserve.kernels (pyproject's package-dir mapping). Each step has its own time limit, so a
# hang in one leaves the others their time; every step's log lands in $OUT.
# SESSION_SMOKE=1: the benchmarks at smoke size and only the fast kernel tests (a check of this
# script on the CPU, where the kernel tests run in Triton's interpreter).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/gpu-session-out}
mkdir -p "$OUT"
PY=${PY:-python3}
SMOKE=${SESSION_SMOKE:-0}

ln -sfn ../kernels moeserve/kernels
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-deps --no-index .whl/*.whl > "$OUT/install.log" 2>&1 || echo "wheel install failed" >> "$OUT/install.log"
fi

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
  "$PY" - <<'PYEOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton absent")
import moeserve, msgspec, zmq  # what the benchmarks import
print("moeserve imports")
PYEOF
} > "$OUT/env.txt" 2>&1

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, note the status
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "$name: exit $? after $((SECONDS - start)) s" >> "$OUT/steps.txt"
}

if [ "$SMOKE" = 1 ]; then
  step kernel_tests 300 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_kernels_paged_attention.py -k "decode"
  step decode_step 120 "$PY" bench/decode_step.py --smoke --out "$OUT/decode_step.json"
  step throughput 300 "$PY" bench/throughput.py --smoke --out "$OUT/throughput.json"
else
  # 1. every kernel test on CUDA (the tests pick CUDA when it is there; gpu-marked ones included)
  step kernel_tests 200 "$PY" -m pytest -q -p no:cacheprovider -m "gpu or not gpu" tests/test_kernels_moe.py \
    tests/test_kernels_paged_attention.py tests/test_kernels_model.py tests/test_decode_graphs.py
  # 5. the decode step: CUDA graphs against the ordinary step, batch 1/8/64/256
  step decode_step 120 "$PY" bench/decode_step.py --out "$OUT/decode_step-cuda.json"
  # 3. end-to-end throughput against transformers on the same GPU, bf16, the scaled Mixtral
  step throughput 180 "$PY" bench/throughput.py --device cuda --dtype bfloat16 --reps 2 --out "$OUT/throughput-cuda.json"
fi
cat "$OUT/steps.txt"
