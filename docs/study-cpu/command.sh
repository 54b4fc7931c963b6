#!/usr/bin/env bash
# The CPU study of docs/study-cpu (run from the repository root; ngrpo = python -m ngrpo_cli.main).
set -euo pipefail
D=/work/exp/study-data
ngrpo() { "${PY:-.venv/bin/python}" -m ngrpo_cli.main "$@"; }
ngrpo study -o /work/exp/study/out --model /work/exp/warm/w600 --data $D/train.jsonl --eval $D/test.jsonl \
  --algos ngrpo,grpo,dapo,w_reinforce --seeds 0,1,2 --max-steps 50 --device cpu --preset cpu-tiny \
  --prompts-per-step 16 --samples-per-prompt 8 --mini-batch-prompts 4 --max-response-len 96 --temperature 1.0 \
  --micro-train-batch-size 16 --micro-rollout-batch-size 16 --save-steps 10 \
  --eval-data $D/val.jsonl --eval-every 10 \
  --eval-n 4 --eval-temperature 1.0 --eval-top-p 1.0 --eval-max-new-tokens 96 --eval-backend vllm --overwrite
