#!/usr/bin/env bash
# The real-model study of docs/real-model-study/README.md, exactly as it is run.
#
#   bash docs/real-model-study/command.sh OUT_DIR      (hours on a 2-core CPU; rerun to resume)
#
# SmolLM2-135M-Instruct (the built-in model, from PyPI) on two-digit sums and differences
# (synthetic:arith level 2): trained on its train split, evaluated on 100 questions of its test
# split, which shares no question with training. Two regimes, one `ngrpo study` each:
#   boxed    the reward is 1 only for a right \boxed{} answer: the base model earns ~1 %, so
#            nearly every group is all-wrong (the regime NGRPO is about)
#   authors  the NGRPO authors' answer rule (last \boxed{}, else "the answer is", else the last
#            number): mixed groups
# Six arms x 3 seeds each, every run with the same budget of generated responses (dropped groups
# included). Each study resumes where it stopped; a finished one is skipped.
set -euo pipefail
OUT=$(realpath -m "${1:?usage: command.sh OUT_DIR}")
NGRPO=${NGRPO:-ngrpo}
mkdir -p "$OUT/data"
[ -f "$OUT/data/train.jsonl" ] || $NGRPO prepare-data "synthetic:arith?n=2000&level=2&split=train&seed=0" -o "$OUT/data/train.jsonl"
[ -f "$OUT/data/test.jsonl" ] || $NGRPO prepare-data "synthetic:arith?n=100&level=2&split=test&seed=0" -o "$OUT/data/test.jsonl"

# Shrunk from the paper's scale to fit a 2-core CPU (measured: ~45-100 s a step of 32 responses
# of up to 128 tokens on SmolLM2, the cores shared): 8 prompts x 4 responses a step, one optimizer
# step per rollout, responses of up to 96 tokens, a budget of 256 generated responses (8 steps
# without a filter), lr 1e-5. The entropy bonus and KL settings are each recipe's own.
ARMS=ngrpo,grpo,grpo@uniform-groups=mask-aux,w_reinforce,nsr,reinforce_pp_baseline
COMMON=(--model smollm2-135m-instruct --data "$OUT/data/train.jsonl" --eval "$OUT/data/test.jsonl"
        --algos "$ARMS" --seeds 0,1,2 --budget samples 256 --device cpu --preset cpu-tiny
        --prompts-per-step 8 --samples-per-prompt 4 --mini-batch-prompts 8
        --max-prompt-len 128 --max-response-len 96 --temperature 0.6 --lr 1e-5
        --micro-train-batch-size 4 --micro-rollout-batch-size 8 --save-steps 4
        --eval-n 4 --eval-temperature 0.6 --eval-max-new-tokens 128 --drop-checkpoints)
for regime in boxed authors; do
  $NGRPO study -o "$OUT/$regime" "${COMMON[@]}" --answer-extraction "$regime"
done
