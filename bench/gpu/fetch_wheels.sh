#!/usr/bin/env bash
# Download, on the CPU machine, the wheels the GPU machine lacks for bench/gpu/session.sh (its python
# is 3.12 and has no msgspec or pyzmq; /work/.library/device/KINDS.md lists what it has) into .whl/,
# at the versions this project's venv runs. .whl/ is kept out of git (.git/info/exclude) and travels
# with `run`'s carry: [".whl"].
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
PYVER=${PYVER:-3.12}
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
for pkg in msgspec pyzmq; do
  version=$("$PY" -m pip show "$pkg" | awk '/^Version:/ {print $2}')
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "$pkg==$version"
done
ls -l .whl
