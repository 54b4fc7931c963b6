#!/usr/bin/env bash
# On a lent GPU machine (its own torch + transformers, no internet), from the repository root with
# .whl/ carried along: installs the kit's wheels offline into a separate folder and runs the kit.
#   bash tests/gpu/run.sh [pytest options]
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -d .whl ] || { echo "tests/gpu/run.sh: no .whl/ here; build it with tests/gpu/make_wheels.sh and carry it" >&2; exit 2; }
PY=${PYTHON:-python3}
TARGET=${NGRPO_KIT_TARGET:-/tmp/ngrpo-gpu-kit}
PINS=$(grep -E '^(deepspeed|openrlhf)==' requirements/gpu-no-deps.txt)
# --target: the machine's own packages stay untouched; --no-deps: openrlhf's pins (flash-attn, its
# torch/transformers versions) are not what the kit is about, and nothing can be fetched anyway.
$PY -m pip install -q --no-index --no-deps --find-links .whl --target "$TARGET" -r tests/gpu/requirements-kit.txt $PINS
export PYTHONPATH="$TARGET:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$TARGET/bin:$PATH"  # ninja, for DeepSpeed's just-in-time ops
nvidia-smi -L 2>/dev/null || echo "nvidia-smi: not found"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'available', torch.cuda.is_available(), '| transformers', transformers.__version__)"
exec $PY -m pytest -ra -p no:cacheprovider tests/gpu "$@"
