#!/usr/bin/env bash
# The real-model study of docs/real-model-study/README.md, exactly as it is run.
#
#   bash docs/real-model-study/command.sh OUT_DIR      (hours on a 2-core CPU; rerun to resume)
#
# SmolLM2-135M-Instruct (the built-in model, from PyPI) on one- and two-digit sums and differences:
# a task it half knows (one-digit sums: ~34 % under the authors' rule, two-digit: a few %). Trained on
# 24 questions of the train split, 12 of each kind, seen again and again (so that a prompt's groups
# can be followed across a run: rescue, transitions); evaluated on 100 questions of the test split
# (30 one-digit, 70 two-digit), which share no question with training (arith.split_of, a hash of
# the expression). Two regimes, one `ngrpo study` each:
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
[ -f "$OUT/data/test.jsonl" ] || (cd "$(dirname "$0")/../.." && python3 - "$OUT/data" <<'EOF'
import json, random, sys
from pathlib import Path
from pipelines.datasets import arith

out = Path(sys.argv[1])
one = [f"{a} {op} {b}" for a in range(10) for b in range(10) for op in "+-"]
rows = {split: [e for e in one if arith.split_of(e) == split] for split in ("train", "test")}
rng = random.Random(0)
def row(expr, kind, i):
    return {"id": f"{kind}/{i}", "problem": rng.choice(arith.TEMPLATES).format(e=expr),
            "answer": str(eval(expr, {"__builtins__": {}}, {})), "source": kind}
two = {split: [p["expression"] for p in arith.problems(n, level=2, split=split, seed=0)]
       for split, n in (("train", 12), ("test", 70))}
train = [row(e, "one-digit", i) for i, e in enumerate(rng.sample(rows["train"], 12))] + \
        [row(e, "two-digit", i) for i, e in enumerate(two["train"])]
test = [row(e, "one-digit-test", i) for i, e in enumerate(rng.sample(rows["test"], 30))] + \
       [row(e, "two-digit-test", i) for i, e in enumerate(two["test"])]
rng.shuffle(train)
for name, data in (("train", train), ("test", test)):
    (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
EOF
)

# Shrunk from the paper's scale to fit a 2-core CPU (measured: 33-45 s a step of 32 responses of up
# to 96-128 tokens on SmolLM2, the cores shared; ~100 s with other work beside it): 8 prompts x 4
# responses a step, one optimizer step per rollout, responses of up to 96 tokens, a budget of 256
# generated responses (8 steps without a filter; the 24 prompts come round ~2.7 times), lr 1e-5.
# The entropy bonus and KL settings are each recipe's own. Finished runs keep their final model
# and drop their checkpoints (36 runs of ~1.8 GB of checkpoints each would fill the disk).
ARMS=ngrpo,grpo,grpo@uniform-groups=mask-aux,w_reinforce,nsr,reinforce_pp_baseline
COMMON=(--model smollm2-135m-instruct --data "$OUT/data/train.jsonl" --eval "$OUT/data/test.jsonl"
        --algos "$ARMS" --seeds 0,1,2 --budget samples 256 --episodes 100 --device cpu --preset cpu-tiny
        --prompts-per-step 8 --samples-per-prompt 4 --mini-batch-prompts 8
        --max-prompt-len 128 --max-response-len 96 --temperature 0.6 --lr 1e-5
        --micro-train-batch-size 4 --micro-rollout-batch-size 8 --save-steps 4
        --eval-n 4 --eval-temperature 0.6 --eval-max-new-tokens 128 --drop-checkpoints)
for regime in boxed authors; do
  $NGRPO study -o "$OUT/$regime" "${COMMON[@]}" --answer-extraction "$regime"
done
