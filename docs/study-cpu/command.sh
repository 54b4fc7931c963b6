#!/usr/bin/env bash
# The CPU study of docs/study-cpu, as it was run (paths as on the machine that ran it; W is the
# scratch folder). From the repository root, with the venv active (`ngrpo` on the path).
set -euo pipefail
W=${W:-/work/exp}
D=$W/study-data
mkdir -p $D $W/warm

# 1. the model: ngrpo's tiny model, warmed up with the warm-up's default recipe (600 steps)
ngrpo tiny-model $W/warm/tiny
ngrpo warmup $W/warm/tiny $W/warm/w600 --problems 3200 --epochs 6 --eval 200 --eval-samples 4 --device cpu

# 2. the data: 2,400 RL questions from the train split; 264 from the test split, of which the
#    first 200 are the evaluation set and the last 64 the in-training validation set
ngrpo prepare-data "synthetic:arith?n=2400&mix=study&split=train&seed=1" -o $D/train.jsonl
ngrpo prepare-data "synthetic:arith?n=264&mix=study&split=test&seed=0" -o $D/heldout264.jsonl
head -200 $D/heldout264.jsonl > $D/test.jsonl
tail -64 $D/heldout264.jsonl > $D/val.jsonl

# 3. the study (the first attempt used --eval-backend hf and 800 questions; --overwrite started
#    it again with these settings)
ngrpo study -o $W/study/out --model $W/warm/w600 --data $D/train.jsonl --eval $D/test.jsonl \
  --algos ngrpo,grpo,dapo,w_reinforce --seeds 0,1,2 --max-steps 50 --device cpu --preset cpu-tiny \
  --prompts-per-step 16 --samples-per-prompt 8 --mini-batch-prompts 4 --max-response-len 96 --temperature 1.0 \
  --micro-train-batch-size 16 --micro-rollout-batch-size 16 --save-steps 10 \
  --eval-data $D/val.jsonl --eval-every 10 \
  --eval-n 4 --eval-temperature 1.0 --eval-top-p 1.0 --eval-max-new-tokens 96 --eval-backend vllm --overwrite
