"""Real tiny training runs shared by the export and report tests (no conftest changes needed).

Two 2-step CPU runs of OpenRLHF's pipeline on the tiny random Qwen2 model, made once per pytest
session, one at a time, each in its own subprocess (Ray keeps global state in the process):

    ngrpo   ZeRO-2   (ngrpo's estimator, clip 0.16 / 0.24, drop-all-correct filter)
    grpo    ZeRO-3   (OpenRLHF's group_norm, KL loss 0.001 k3, so a reference model too)

The reward is a deterministic stand-in (``COIN_REWARD``): 1.0 when the response has an even number
of characters. A random model's responses then give all-wrong, all-correct and mixed groups, so
the logged reward / accuracy / group shares are not all zero, and training moves the weights.

Import it from a test module (``from fixtures_runs import tiny_runs``); the result is cached in
this module, so two test modules importing the fixture still share the same two runs. Set
``NGRPO_TEST_RUNS_DIR`` to keep the runs in a fixed folder and reuse them across sessions (runs
whose manifest says "finished" are not made again); tests must copy a run before changing it.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
MAX_STEPS = 2


def _left_in_tmp_file(run_dir: Path) -> Path:
    return run_dir.with_name(run_dir.name + ".left_in_tmp")


def left_in_tmp(run_dir: Path) -> list:
    """What a run of make_run left in its temp folder (TMPDIR): (kind, name) pairs."""
    return [tuple(line.split(" ", 1)) for line in _left_in_tmp_file(run_dir).read_text().splitlines()]


def _kind(path: Path) -> str:
    import stat

    mode = path.lstat().st_mode
    return "socket" if stat.S_ISSOCK(mode) else "dir" if stat.S_ISDIR(mode) else "file"


COIN_REWARD = textwrap.dedent('''
    import torch

    def reward_func(queries, prompts, labels, **kwargs):
        r = [1.0 if len(q[len(p):]) % 2 == 0 else 0.0 for q, p in zip(queries, prompts)]
        t = torch.tensor(r)
        return {"rewards": t, "scores": t, "extra_logs": {}}
''')

# One run, made in a fresh interpreter: what `ngrpo train` does, with the stand-in reward.
_RUN_SCRIPT = textwrap.dedent('''
    import dataclasses, json, sys
    from pathlib import Path
    from pipelines.launch import rundir, training
    from pipelines.launch.recipes import build_recipe

    spec = json.loads(sys.argv[1])
    run = Path(spec["run_dir"])
    problems = [{"id": str(i), "problem": f"What is {i} + {i % 5}?", "answer": str(i + i % 5)} for i in range(32)]
    training.write_training_file(problems, run / rundir.TRAIN_DATA)
    recipe = build_recipe(spec["algo"], "cpu-tiny", spec["overrides"])
    layout = training.Layout.for_device("cpu")
    argv = training.build_openrlhf_argv(recipe, model=spec["model"], layout=layout)
    patch_config = training.build_patch_config(recipe, device="cpu", max_steps=spec["max_steps"],
                                               reward_file=spec["reward_file"])
    manifest = {"model": spec["model"], "algo": spec["algo"], "preset": "cpu-tiny", "device": "cpu",
                "num_problems": len(problems), "recipe": dataclasses.asdict(recipe), "max_steps": spec["max_steps"],
                "layout": dataclasses.asdict(layout), "eval_every": None,
                "launch": {"save_steps": 1, "keep_checkpoints": 3, "openrlhf_extra": []},  # build_openrlhf_argv's defaults
                "openrlhf_argv": argv, "patch_config": dataclasses.asdict(patch_config)}
    rundir.write_manifest(run, manifest)
    training.execute_run(run, manifest)
''')

RUN_SPECS = {
    "ngrpo": {"algo": "ngrpo", "overrides": {"zero_stage": 2}},
    "grpo": {"algo": "grpo", "overrides": {"zero_stage": 3}},
}

_CACHE = {}


def _finished(run_dir: Path) -> bool:
    manifest = run_dir / "ngrpo_run.json"
    return (manifest.exists() and json.loads(manifest.read_text()).get("status") == "finished"
            and _left_in_tmp_file(run_dir).exists())


def make_run(run_dir: Path, model_dir: Path, reward_file: Path, algo: str, overrides: dict,
             max_steps: int = MAX_STEPS, timeout: int = 1200) -> Path:
    """One real CPU training run in a subprocess; its log goes to RUN_DIR.log."""
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    spec = {"run_dir": str(run_dir), "model": str(model_dir), "algo": algo, "overrides": overrides,
            "reward_file": str(reward_file), "max_steps": max_steps}
    log = run_dir.with_name(run_dir.name + ".log")
    # a temp folder of the run's own (short: sockets go there), for what the run leaves in it
    tmp = tempfile.mkdtemp(prefix="ngrpo-test-tmp-", dir="/tmp")
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TMPDIR=tmp, RAY_TMPDIR=os.environ.get("RAY_TMPDIR", "/tmp"))
    env.pop("RAY_ADDRESS", None)
    try:
        with open(log, "w") as out:
            proc = subprocess.run([sys.executable, "-c", _RUN_SCRIPT, json.dumps(spec)], cwd=REPO_ROOT, env=env,
                                  stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
        _left_in_tmp_file(run_dir).write_text("".join(
            f"{_kind(p)} {p.name}\n" for p in sorted(Path(tmp).iterdir())))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if proc.returncode != 0 or not _finished(run_dir):
        tail = log.read_text()[-4000:]
        raise RuntimeError(f"training run {run_dir} failed (exit {proc.returncode}); log {log}:\n{tail}")
    return run_dir


def build_runs(root: Path) -> dict:
    """{"model": base model folder, "ngrpo": run dir, "grpo": run dir} under ROOT (reused when finished)."""
    from pipelines.launch.tiny_model import build_tiny_model

    root.mkdir(parents=True, exist_ok=True)
    model_dir = root / "base_model"
    if not (model_dir / "config.json").exists():
        build_tiny_model(model_dir, seed=0)
    reward_file = root / "coin_reward.py"
    reward_file.write_text(COIN_REWARD)
    runs = {"model": model_dir}
    for name, spec in RUN_SPECS.items():
        run_dir = root / f"{name}_run"
        if not _finished(run_dir):
            make_run(run_dir, model_dir, reward_file, spec["algo"], spec["overrides"])
        runs[name] = run_dir
    return runs


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory) -> dict:
    """The two shared runs (see the module docstring); made once per session. Treat as read-only."""
    if "runs" not in _CACHE:
        fixed = os.environ.get("NGRPO_TEST_RUNS_DIR")
        root = Path(fixed) if fixed else tmp_path_factory.getbasetemp() / "shared_tiny_runs"
        _CACHE["runs"] = build_runs(root)
    return _CACHE["runs"]


if __name__ == "__main__":  # make (or refresh) the runs by hand: python tests/fixtures_runs.py DIR
    sys.path.insert(0, str(REPO_ROOT))
    print(build_runs(Path(sys.argv[1]).resolve()))
