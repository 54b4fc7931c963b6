"""ngrpo against TRL's GRPOTrainer on the same model, prompts and settings, side by side.

    .venv/bin/python benchmarks/vs_trl.py --model tiny --setting small [--repeats 2] [--memory-runs 1]
    .venv/bin/python benchmarks/vs_trl.py --model smollm2 --setting large

Runs ngrpo (`ngrpo train`, OpenRLHF + Ray + vLLM + DeepSpeed) and TRL (GRPOTrainer, transformers
generate) alternately, A B A B, each as its own process tree, and prints medians and ngrpo / TRL
ratios of: start-up (launch -> end of step 1), steady step (median of steps 2..N), whole run, and
the peak memory of the whole process tree as PSS (Ray's workers live outside /usr/bin/time's view;
PSS splits shared pages between the processes that share them, so summing it does not count the
same library twice).
Times and memory come from separate runs. Reading the PSS of ngrpo's ~15 processes takes ~23 ms
a sweep (TRL's one process ~2 ms); sweeping every 0.25 s made ngrpo's steady step 14 % slower
(0.286 -> 0.325 s, tiny model, 3 pairs) and TRL's 3 % (0.116 -> 0.120 s). So the timed runs
A B A B carry no sampler, and then one more run of each tool (--memory-runs) measures memory.
Both train with the same group size, lengths, learning rate, no KL (beta 0), one optimizer step
per rollout, and the same math-verify reward; TRL is an optional benchmark dependency
(`pip install -c requirements/stack.txt trl==1.16.0 torch==2.13.0`).

`--before DIR` adds a third kind, `ngrpo` from another checkout DIR with its own DIR/.venv (e.g.
the commit before a stack change, in a git worktree), run in turn with the other two: ngrpo before
and after a change, side by side, each also as a ratio to TRL.

The machine must be otherwise idle: on 2 shared cores everything else running changes both sides.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {  # prompts per step, samples per prompt, new tokens
    "small": (4, 4, 32),
    "large": (16, 8, 128),
}
LR = 1e-5

TRL_SCRIPT = textwrap.dedent('''
    import json, sys, time
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from pipelines.datasets.grading import grade_many

    spec = json.loads(sys.argv[1])
    rows = [json.loads(line) for line in open(spec["data"])]

    def reward(prompts, completions, answer, **kwargs):
        return [1.0 if r.correct else 0.0 for r in grade_many(completions, answer)]

    class StepTimes(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            with open(spec["times"], "a") as f:
                f.write(json.dumps({"step": state.global_step, "time": time.time()}) + "\\n")

    def main():
        config = GRPOConfig(
            output_dir=spec["out"], max_steps=spec["steps"], learning_rate=spec["lr"], beta=0.0,
            num_generations=spec["group"], per_device_train_batch_size=spec["prompts"] * spec["group"],
            gradient_accumulation_steps=1, max_completion_length=spec["tokens"], temperature=1.0, top_p=1.0,
            logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False,
            dataloader_num_workers=0, seed=0)
        dataset = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])
        trainer = GRPOTrainer(model=spec["model"], reward_funcs=reward, args=config, train_dataset=dataset,
                              callbacks=[StepTimes()])
        trainer.train()

    if __name__ == "__main__":
        main()
''')


class PeakPSS(threading.Thread):
    """Samples the PSS of a process and all its descendants; keeps the maximum of the sums."""

    def __init__(self, pid: int, interval: float = 0.25):
        super().__init__(daemon=True)
        self.pid, self.interval, self.peak = pid, interval, 0
        self.stop = threading.Event()

    def run(self):
        import psutil

        while not self.stop.is_set():
            try:
                root = psutil.Process(self.pid)
                procs = [root] + root.children(recursive=True)
            except psutil.Error:
                break
            total = 0
            for proc in procs:
                try:
                    total += proc.memory_full_info().pss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self.stop.wait(self.interval)


def _measure(cmd, env, times_of, memory: bool, cwd=REPO):
    """Run CMD. A timed run (memory False) returns start-up, steady step and whole run; a memory
    run returns only the peak PSS of the process tree, as its sampler slows what it measures."""
    started = time.time()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    sampler = PeakPSS(proc.pid) if memory else None
    if sampler:
        sampler.start()
    _, err = proc.communicate()
    wall = time.time() - started
    if sampler:
        sampler.stop.set()
        sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} failed:\n{err[-3000:]}")
    if memory:
        return {"peak_pss_gb": sampler.peak / 2 ** 30}
    step_ends = times_of()
    steps = [b - a for a, b in zip(step_ends, step_ends[1:])]
    return {"startup_s": step_ends[0] - started, "steady_step_s": statistics.median(steps), "whole_run_s": wall,
            "steps": len(step_ends)}


def run_ngrpo(model, data, work: Path, prompts, group, tokens, steps, env, memory=False, checkout=None):
    """`ngrpo train` from this checkout, or from CHECKOUT with its own .venv (--before)."""
    out = work / "ngrpo-run"
    python = str(Path(checkout) / ".venv" / "bin" / "python") if checkout else sys.executable
    if checkout:
        env = {**env, "PYTHONPATH": str(checkout)}
    cmd = [python, "-m", "ngrpo_cli.main", "train", "--model", str(model), "--data", str(data),
           "--output", str(out), "--device", "cpu", "--preset", "cpu-tiny", "--algo", "grpo", "--kl-mode", "none",
           "--prompts-per-step", str(prompts), "--samples-per-prompt", str(group), "--mini-batch-prompts", str(prompts),
           "--micro-train-batch-size", str(min(prompts * group, 16)), "--micro-rollout-batch-size",
           str(min(prompts * group, 16)), "--max-response-len", str(tokens), "--max-prompt-len", "128",
           "--lr", str(LR), "--entropy-coef", "0", "--max-steps", str(steps), "--overwrite"]

    def times():
        return [json.loads(line)["time"] for line in (out / "metrics.jsonl").read_text().splitlines()]

    return _measure(cmd, env, times, memory, cwd=checkout or REPO)


def run_trl(model, prompts_file, work: Path, prompts, group, tokens, steps, env, memory=False):
    times_file = work / "trl-times.jsonl"
    times_file.unlink(missing_ok=True)
    spec = {"model": str(model), "data": str(prompts_file), "out": str(work / "trl-out"), "steps": steps, "lr": LR,
            "group": group, "prompts": prompts, "tokens": tokens, "times": str(times_file)}
    script = work / "trl_run.py"
    script.write_text(TRL_SCRIPT)

    def times():
        return [json.loads(line)["time"] for line in times_file.read_text().splitlines()]

    return _measure([sys.executable, str(script), json.dumps(spec)], env, times, memory)


def prepare_model(name: str, work: Path) -> Path:
    if name == "smollm2":
        out = subprocess.run([sys.executable, "-m", "ngrpo_cli.main", "get-model", "smollm2-135m-instruct"], cwd=REPO,
                             capture_output=True, text=True, check=True)
        return Path(out.stdout.strip().splitlines()[-1])
    warm = work / "tiny-warm"
    if not (warm / "config.json").exists():
        subprocess.run([sys.executable, "-m", "ngrpo_cli.main", "tiny-model", str(work / "tiny")], cwd=REPO, check=True)
        subprocess.run([sys.executable, "-m", "ngrpo_cli.main", "warmup", str(work / "tiny"), str(warm)], cwd=REPO,
                       check=True)
    return warm


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="small")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="Timed A B pairs (alternating ngrpo, TRL).")
    parser.add_argument("--memory-runs", type=int, default=1,
                        help="Further runs of each tool, alternating, that measure peak memory only.")
    parser.add_argument("--work", default=None, help="Scratch folder (default: a temporary one).")
    parser.add_argument("--before", default=None, help="Another checkout with its own .venv: a third kind, "
                                                       "'before', run in turn with the other two.")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="ngrpo-vs-trl-"))
    work.mkdir(parents=True, exist_ok=True)
    prompts, group, tokens = SETTINGS[args.setting]
    model = prepare_model(args.model, work)
    from pipelines.datasets import arith
    from pipelines.datasets.data import write_jsonl_atomic
    from pipelines.datasets.prompts import build_prompt

    problems = arith.problems(prompts * (args.steps + 2), mix="study", split="train", seed=0)
    data = write_jsonl_atomic(problems, work / "problems.jsonl")
    trl_prompts = write_jsonl_atomic([{"prompt": build_prompt(p["problem"]), "answer": p["answer"]} for p in problems],
                                     work / "trl_prompts.jsonl")
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "TOKENIZERS_PARALLELISM": "false"}
    kinds = ("ngrpo", "trl") + (("before",) if args.before else ())
    results = {k: [] for k in kinds}
    memory = {k: [] for k in kinds}
    for i in range(args.repeats + args.memory_runs):
        timed = i < args.repeats
        got = results if timed else memory
        got["ngrpo"].append(run_ngrpo(model, data, work, prompts, group, tokens, args.steps, env, memory=not timed))
        got["trl"].append(run_trl(model, trl_prompts, work, prompts, group, tokens, args.steps, env, memory=not timed))
        if args.before:
            got["before"].append(run_ngrpo(model, data, work, prompts, group, tokens, args.steps, env,
                                           memory=not timed, checkout=args.before))
        print(f"{'pair' if timed else 'memory run'} {i + 1 if timed else i + 1 - args.repeats}: "
              + "\n        ".join(f"{k:6s} {json.dumps(got[k][-1])}" for k in kinds), flush=True)
    print(f"\n{args.model}, {prompts} prompts x {group} samples x {tokens} tokens, {args.steps} steps, "
          f"medians of {args.repeats} alternating timed runs and {args.memory_runs} memory run(s) each:")
    print(f"{'measure':16s} {'TRL':>10s} {'ngrpo':>10s} {'ngrpo/TRL':>10s}")
    for key, runs in (("startup_s", results), ("steady_step_s", results), ("whole_run_s", results),
                      ("peak_pss_gb", memory)):
        if not runs["ngrpo"]:
            continue
        a = statistics.median(r[key] for r in runs["trl"])
        b = statistics.median(r[key] for r in runs["ngrpo"])
        spread = max(r[key] for r in runs["ngrpo"]) - min(r[key] for r in runs["ngrpo"])
        print(f"{key:16s} {a:10.3f} {b:10.3f} {b / a:10.2f}   (ngrpo spread {spread:.3f})")
        if args.before:
            c = statistics.median(r[key] for r in runs["before"])
            print(f"{'  before':16s} {a:10.3f} {c:10.3f} {c / a:10.2f}   (after / before {b / c:.3f})")
    results["memory"] = memory
    (work / "vs_trl.json").write_text(json.dumps(results, indent=2))
    print(f"raw numbers: {work / 'vs_trl.json'}")


if __name__ == "__main__":
    main()
