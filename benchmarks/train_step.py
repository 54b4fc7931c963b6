"""Step time of `ngrpo` against `grpo` in the same OpenRLHF pipeline (tiny model, CPU).

Two runs of each, in A-B-B-A order, use identical settings except the advantage estimator (no KL, no group filter, the
same clip range), so the difference is the cost of ngrpo's patch. Prints the median step time of
each (the first step, which includes warm-up, is dropped), their ratio (goal <= 1.02), and the
share of the ngrpo step spent computing advantages.

    .venv/bin/python benchmarks/train_step.py [--steps 6]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PHASES = ("timing/generation", "timing/make_experience", "timing/ppo_train", "timing/broadcast")
SAME = ["--device", "cpu", "--preset", "cpu-tiny", "--kl-mode", "none", "--group-filter", "none",
        "--eps-clip-low", "0.2", "--eps-clip-high", "0.2", "--save-steps", "1000"]


def run(algo, model, data, out, steps):
    cmd = [sys.executable, "-m", "ngrpo_cli.main", "train", "--model", str(model), "--data", str(data),
           "--algo", algo, "--output", str(out), "--max-steps", str(steps), *SAME]
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from pipelines.data import synthetic_arith
    from pipelines.tiny_model import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_tiny_model(tmp / "model")
        data = tmp / "data.jsonl"
        data.write_text("".join(json.dumps(p) + "\n" for p in synthetic_arith(n=4 * (args.steps + 1), seed=0)))
        pooled = {"grpo": [], "ngrpo": []}
        # A-B-B-A order: slow drifts of a shared machine's load cancel out in the comparison.
        for i, algo in enumerate(("grpo", "ngrpo", "ngrpo", "grpo")):
            pooled[algo] += run(algo, model, data, tmp / f"{algo}{i}", args.steps)[1:]
        results = {}
        for algo, metrics in pooled.items():
            results[algo] = {
                "step": statistics.median(m["timing/step_total"] for m in metrics),
                "advantages": statistics.median(m["ngrpo/advantage_time_s"] for m in metrics),
                "phases": {k.split("/")[1]: statistics.median(m[k] for m in metrics) for k in PHASES},
                "response_length": statistics.mean(m["rollout/response_length_mean"] for m in metrics),
            }
    g, n = results["grpo"], results["ngrpo"]
    ratio = n["step"] / g["step"]
    print(f"median step time over 2 x {args.steps - 1} steps per algorithm, runs in A-B-B-A order "
          f"(tiny Qwen2, CPU, {os.cpu_count()} cores):")
    print(f"  grpo : {g['step'] * 1000:8.1f} ms  (advantages {g['advantages'] * 1000:.3f} ms)")
    print(f"  ngrpo: {n['step'] * 1000:8.1f} ms  (advantages {n['advantages'] * 1000:.3f} ms)")
    print(f"  ratio ngrpo/grpo: {ratio:.3f}  [{'PASS' if ratio <= 1.02 else 'FAIL'} goal <= 1.02]")
    print(f"  share of the ngrpo step computing advantages: {100 * n['advantages'] / n['step']:.3f} %")
    phase_ratio = sum(n["phases"].values()) / sum(g["phases"].values())
    print(f"  ratio of the summed phase medians: {phase_ratio:.3f}")
    print("  phases (median ms)   " + "  ".join(f"{p:>15s}" for p in g["phases"]) + "  mean response tokens")
    for algo, r in results.items():
        print(f"  {algo:20s} " + "  ".join(f"{1000 * v:15.1f}" for v in r["phases"].values())
              + f"  {r['response_length']:.1f}")


if __name__ == "__main__":
    main()
