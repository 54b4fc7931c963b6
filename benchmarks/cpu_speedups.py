"""What CPU mode's optional speed-ups buy: `ngrpo train --cpu-speedups on` against `off`, side by side.

The same tiny model, data, seed and settings (CPU, the cpu-tiny preset, no checkpoint during the
run); the two kinds take turns going first. Per run: the wall time of the whole command (start-up
included: the early Ray node and the lean layout act there) and the median step (the first step,
which warms up, and the last are dropped). Across runs, the median and the range; a ratio is called
a difference only when the ranges of the two kinds do not overlap.

    .venv/bin/python benchmarks/cpu_speedups.py [--steps 6] [--repeats 2]
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from train_step import parse_args, tiny_model_and_data, verdict  # noqa: E402 - shared by the benchmarks
KINDS = ("on", "off")
SAME = ["--device", "cpu", "--preset", "cpu-tiny", "--algo", "ngrpo", "--save-steps", "100000", "--seed", "0"]


def run(kind, model, data, out, steps):
    cmd = [sys.executable, "-m", "ngrpo_cli.main", "train", "--model", str(model), "--data", str(data),
           "--output", str(out), "--max-steps", str(steps), "--cpu-speedups", kind, *SAME]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"wall": wall, "step": statistics.median(m["timing/step_total"] for m in steps[1:-1])}


def spread(values):
    return {"median": statistics.median(values), "low": min(values), "high": max(values), "runs": values}


def main():
    args = parse_args(steps=6, repeats=2)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model, data, _ = tiny_model_and_data(tmp, args.steps)
        runs = {k: [] for k in KINDS}
        for rep in range(args.repeats):
            for kind in KINDS[::1 if rep % 2 == 0 else -1]:
                runs[kind].append(run(kind, model, data, tmp / f"{kind}{rep}", args.steps))
                print(f"  repeat {rep + 1}: {kind} done", file=sys.stderr, flush=True)
    results = {k: {m: spread([r[m] for r in v]) for m in ("wall", "step")} for k, v in runs.items()}
    print(f"--cpu-speedups on vs off, {args.repeats} runs x {args.steps} steps (tiny Qwen2, CPU, "
          f"{os.cpu_count()} cores):")
    for measure, label in (("wall", "whole command"), ("step", "median step")):
        on, off = results["on"][measure], results["off"][measure]
        print(f"  {label:13s}: on {on['median']:7.2f} s ({on['low']:.2f}-{on['high']:.2f})  "
              f"off {off['median']:7.2f} s ({off['low']:.2f}-{off['high']:.2f})  "
              f"off / on = {off['median'] / on['median']:.2f}: {verdict(on, off)}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
