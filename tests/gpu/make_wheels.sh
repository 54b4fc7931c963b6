#!/usr/bin/env bash
# Builds .whl/ (git-ignored) for the GPU check kit, on a machine that reaches PyPI:
#   bash tests/gpu/make_wheels.sh            # wheels for CPython 3.10, 3.11 and 3.12
#   PY_VERSIONS="3.12" bash tests/gpu/make_wheels.sh
# DeepSpeed is built here from its sdist with DS_BUILD_OPS=0 (a pure-Python wheel); everything
# else is downloaded as Linux x86_64 wheels. The folder stays around 15 MB (the carry limit is 64 MiB).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=.whl
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
PY_VERSIONS=${PY_VERSIONS:-"3.10 3.11 3.12"}
# pip as on a fresh machine: PyPI (or PIP_INDEX_URL), no local config or wheel folders
PIP="env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL PIP_CONFIG_FILE=/dev/null $PY -m pip"
PINS=$(grep -E '^(deepspeed|openrlhf)==' requirements/gpu-no-deps.txt)
DEEPSPEED=$(echo "$PINS" | grep '^deepspeed==')
OPENRLHF=$(echo "$PINS" | grep '^openrlhf==')
PLATFORMS=""
for minor in $(seq 35 -1 5); do PLATFORMS="$PLATFORMS --platform manylinux_2_${minor}_x86_64"; done
PLATFORMS="$PLATFORMS --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform linux_x86_64"

rm -rf "$OUT" && mkdir -p "$OUT"
# Build isolation: the build needs no torch (without one it records none and compiles nothing).
DS_BUILD_OPS=0 $PIP wheel -q --no-cache-dir --no-deps -w "$OUT" "$DEEPSPEED"
for version in $PY_VERSIONS; do
  $PIP download -q --no-deps --only-binary=:all: $PLATFORMS --python-version "$version" --implementation cp \
    -d "$OUT" -r tests/gpu/requirements-kit.txt "$OPENRLHF"
done
ls "$OUT"
du -sh "$OUT"
