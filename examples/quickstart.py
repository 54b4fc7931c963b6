"""The CPU quickstart: the whole ngrpo pipeline on a tiny model, through the real CLI.

    .venv/bin/python examples/quickstart.py [--out quickstart-out] [--steps 8] [--fast]

1. `ngrpo tiny-model`: a random-init Qwen2 (2 layers, hidden 128) and a Qwen-style tokenizer;
2. `ngrpo warmup`: a short supervised pass on synthetic arithmetic through OpenRLHF's SFT trainer,
   so that the model answers some problems (an RL run on a model that never answers correctly
   would see all-wrong groups only);
3. `ngrpo prepare-data synthetic:arith`: training problems and a held-out set;
4. `ngrpo train --algo ngrpo`: a few RL steps through OpenRLHF's Ray + vLLM + DeepSpeed pipeline;
5. `ngrpo eval` on the held-out problems (avg@n, pass@k, maj@n);
6. `ngrpo export-hf` of the run's last checkpoint;
7. `ngrpo report` of the run.
`--fast` (used by the test suite) runs 2 RL steps.
"""
import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def ngrpo(*args):
    cmd = [sys.executable, "-m", "ngrpo_cli.main", *map(str, args)]
    print(f"\n$ ngrpo {' '.join(map(str, args))}", flush=True)
    started = time.time()
    subprocess.run(cmd, check=True, cwd=REPO)
    print(f"  ({time.time() - started:.0f}s)", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "quickstart-out"), help="Output folder (replaced).")
    parser.add_argument("--steps", type=int, default=8, help="NGRPO training steps.")
    parser.add_argument("--fast", action="store_true", help="Only 2 RL steps (for CI).")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    steps = 2 if args.fast else args.steps
    started = time.time()

    ngrpo("tiny-model", out / "tiny-model")
    ngrpo("warmup", out / "tiny-model", out / "warm-model", "--eval", 50)
    ngrpo("prepare-data", "synthetic:arith?n=512&seed=1", "-o", out / "data" / "train.jsonl")
    ngrpo("prepare-data", "synthetic:arith?n=32&seed=2", "-o", out / "data" / "heldout.jsonl")
    run = out / "runs" / "ngrpo"
    ngrpo("train", "--model", out / "warm-model", "--algo", "ngrpo", "--data", out / "data" / "train.jsonl",
          "--output", run, "--max-steps", steps, "--device", "cpu")
    ngrpo("eval", "--model", run, "--benchmarks", out / "data" / "heldout.jsonl", "-o", run / "eval",
          "--n", 4, "--max-new-tokens", 48, "--backend", "vllm")
    ngrpo("export-hf", run, out / "export")
    ngrpo("report", run, "-o", out / "report")

    summary = json.loads((run / "eval" / "summary.json").read_text())
    warmup = json.loads((out / "warm-model" / "warmup.json").read_text())
    print(f"\nquickstart finished in {time.time() - started:.0f}s. Outputs:")
    for label, path in [("tiny model", out / "tiny-model"), ("warmed-up model", out / "warm-model"),
                        ("training data", out / "data" / "train.jsonl"), ("run directory", run),
                        ("step metrics", run / "metrics.jsonl"), ("eval results", run / "eval" / "summary.md"),
                        ("exported model", out / "export"), ("report", out / "report" / "report.md")]:
        print(f"  {label:16s} {path}")
    print(f"  warm-up: {warmup['wall_time_s']:.0f}s, greedy accuracy on {warmup['eval']['n_problems']} "
          f"held-out problems: {100 * warmup['eval']['greedy_accuracy']:.0f}%")
    print("  eval of the trained model:\n" + (run / "eval" / "summary.md").read_text().split("\n\n")[-1])


if __name__ == "__main__":
    main()
