"""The cost of ngrpo's patch: step time of OpenRLHF as released against the same run through ngrpo.

Three kinds of run on the same tiny model, data, seed and settings (CPU, no KL, no group filter,
the same clip range, no checkpoint during the run):

  openrlhf  OpenRLHF 0.11.2 without ngrpo's patch (benchmarks/openrlhf_unpatched.py): its own
            group_norm advantages, loss, generation loop and logger
  grpo      `ngrpo train --algo grpo`: the same estimator computed by ngrpo's core, with every
            hook of the patch in place (filter path, reward checks, step log, progress)
  ngrpo     `ngrpo train --algo ngrpo`

openrlhf reruns each repeat's grpo run directory right after it; that pair and ngrpo take turns
going first, so a slow drift of a shared machine's load falls on all three. Per run, the median of its steps (the first step, which
warms up, and the last are dropped); across runs, the median and the range. A ratio is called a
difference only when the ranges of the two kinds do not overlap; otherwise it is "within noise".

    .venv/bin/python benchmarks/train_step.py [--steps 8] [--repeats 3]
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
KINDS = ("openrlhf", "grpo", "ngrpo")
SAME = ["--device", "cpu", "--preset", "cpu-tiny", "--kl-mode", "none", "--group-filter", "none",
        "--eps-clip-low", "0.2", "--eps-clip-high", "0.2", "--save-steps", "100000", "--seed", "0"]


def ngrpo_run(algo, model, data, out, steps):
    cmd = [sys.executable, "-m", "ngrpo_cli.main", "train", "--model", str(model), "--data", str(data),
           "--algo", algo, "--output", str(out), "--max-steps", str(steps), *SAME]
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def unpatched_run(grpo_run_dir, out):
    log = out.parent / f"{out.name}.log"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "openrlhf_unpatched.py"), str(grpo_run_dir), str(log)],
                   check=True, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return [json.loads(line) for line in (grpo_run_dir / "unpatched" / "steps.jsonl").read_text().splitlines()]


def summary(runs):
    """Per run the median step (steps 2..n-1); across runs the median and range of those."""
    per_run = [statistics.median(m["timing/step_total"] for m in steps[1:-1]) for steps in runs]
    phases = {k.split("/")[1]: statistics.median(statistics.median(m[k] for m in steps[1:-1]) for steps in runs)
              for k in PHASES}
    return {"median": statistics.median(per_run), "low": min(per_run), "high": max(per_run), "runs": per_run,
            "phases": phases, "response_length": statistics.mean(m["rollout/response_length_mean"]
                                                                for steps in runs for m in steps[1:-1])}


def verdict(a, b):
    if min(len(a["runs"]), len(b["runs"])) < 2:
        return "one run per kind: no noise estimate, no verdict (use --repeats 2 or more)"
    if a["high"] < b["low"] or b["high"] < a["low"]:
        return "a difference (the ranges do not overlap)"
    return "within noise (the ranges overlap)"


def parse_args(steps: int, repeats: int):
    """The command line every side-by-side training benchmark takes."""
    parser = argparse.ArgumentParser(description=sys.modules["__main__"].__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    args = parser.parse_args()
    if args.steps < 4:
        parser.error("--steps must be >= 4 (the first and last steps are dropped)")
    return args


def tiny_model_and_data(tmp: Path, steps: int):
    """The tiny model and exactly STEPS rollouts of the cpu-tiny preset's arithmetic prompts (so
    OpenRLHF's own loop stops there too)."""
    sys.path.insert(0, str(REPO))
    from pipelines.datasets import arith
    from pipelines.datasets.data import write_jsonl_atomic
    from pipelines.launch.recipes import CPU_TINY
    from pipelines.launch.tiny_model import build_tiny_model

    model = build_tiny_model(tmp / "model")
    data = tmp / "data.jsonl"
    write_jsonl_atomic(arith.problems(steps * CPU_TINY["prompts_per_step"], mix="study", seed=0), data)
    return model, data, CPU_TINY["prompts_per_step"]


def main():
    args = parse_args(steps=8, repeats=3)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model, data, prompts_per_step = tiny_model_and_data(tmp, args.steps)
        runs = {k: [] for k in KINDS}
        for rep in range(args.repeats):
            # the baseline reruns this repeat's grpo run directory, so it always follows grpo;
            # grpo+openrlhf and ngrpo take turns going first
            for algo in ("grpo", "ngrpo")[::1 if rep % 2 == 0 else -1]:
                out = tmp / f"{algo}{rep}"
                runs[algo].append(ngrpo_run(algo, model, data, out, args.steps))
                print(f"  repeat {rep + 1}: {algo} done", file=sys.stderr, flush=True)
                if algo == "grpo":
                    runs["openrlhf"].append(unpatched_run(out, tmp / f"openrlhf{rep}"))
                    print(f"  repeat {rep + 1}: openrlhf done", file=sys.stderr, flush=True)
        results = {k: summary(v) for k, v in runs.items()}
    base = results["openrlhf"]
    print(f"step time, median of per-run medians over {args.repeats} runs x {args.steps - 2} steps "
          f"(tiny Qwen2, CPU, {os.cpu_count()} cores, {args.steps * prompts_per_step} prompts):")
    for kind, r in results.items():
        print(f"  {kind:9s}: {r['median'] * 1000:8.1f} ms  (range {r['low'] * 1000:.1f}-{r['high'] * 1000:.1f})"
              + ("" if kind == "openrlhf" else
                 f"  / openrlhf = {r['median'] / base['median']:.3f}: {verdict(r, base)}"))
    print("  phases (median ms)  " + "  ".join(f"{p:>15s}" for p in base["phases"]) + "  response tokens")
    for kind, r in results.items():
        print(f"  {kind:18s} " + "  ".join(f"{1000 * v:15.1f}" for v in r["phases"].values())
              + f"  {r['response_length']:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
