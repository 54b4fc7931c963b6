#!/usr/bin/env bash
# The real-model experiment of docs/real-model/README.md, exactly as it was run.
#
#   bash docs/real-model/run_experiment.sh OUT_DIR        (about 4.5 hours on a 2-core CPU)
#
# SmolLM2-135M-Instruct (the built-in model, from PyPI) on one-digit additions. Four runs:
# {ngrpo, grpo} x {boxed-only reward: 50 steps, the authors' answer extraction: 16 steps (about
# 30 minutes with its evaluations)}, each evaluated before and after with both extraction rules.
# Rerunning skips what is finished.
set -euo pipefail
OUT=$(realpath -m "${1:?usage: run_experiment.sh OUT_DIR}")
NGRPO=${NGRPO:-ngrpo}
mkdir -p "$OUT/data"

# All 100 questions "What is a + b?" (a, b in 0..9), shuffled: the training prompts and the eval set.
python3 - "$OUT/data/add1.jsonl" <<'EOF'
import json, random, sys
rows = [{"id": f"add1/{a}+{b}", "problem": f"What is {a} + {b}?", "answer": str(a + b)} for a in range(10) for b in range(10)]
random.Random(0).shuffle(rows)
with open(sys.argv[1], "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
EOF

EVAL=(--benchmarks "$OUT/data/add1.jsonl" --n 4 --temperature 0.6 --max-new-tokens 256 --seed 0 --backend vllm)
evaluate() {  # evaluate MODEL OUT_PREFIX: both extraction rules, same samples (same per-sample seeds)
  for mode in boxed authors; do
    [ -f "$2-$mode/summary.json" ] || $NGRPO eval --model "$1" -o "$2-$mode" --answer-extraction "$mode" "${EVAL[@]}"
  done
}
evaluate smollm2-135m-instruct "$OUT/eval/base"

# One setting differs between the runs (--answer-extraction) besides the algorithm's own recipe.
TRAIN=(--model smollm2-135m-instruct --data "$OUT/data/add1.jsonl" --device cpu --preset cpu-tiny
       --prompts-per-step 4 --samples-per-prompt 4 --mini-batch-prompts 1 --episodes 50
       --max-prompt-len 128 --max-response-len 256 --temperature 0.6 --lr 5e-6
       --micro-train-batch-size 4 --micro-rollout-batch-size 4)
declare -A STEPS=([boxed]=50 [authors]=16) SAVE=([boxed]=25 [authors]=16)
for extraction in boxed authors; do
  for algo in ngrpo grpo; do
    run="$OUT/runs/$extraction-$algo"
    if [ -f "$run/final_model/config.json" ]; then :
    elif [ -f "$run/ngrpo_run.json" ]; then $NGRPO train --resume "$run"
    else $NGRPO train --algo "$algo" --answer-extraction "$extraction" --output "$run" "${TRAIN[@]}" \
           --max-steps "${STEPS[$extraction]}" --save-steps "${SAVE[$extraction]}" -- --actor.adam.betas 0.9 0.999
    fi
    evaluate "$run" "$OUT/eval/$extraction-$algo"
  done
done
$NGRPO report "$OUT"/runs/* -o "$OUT/report"
