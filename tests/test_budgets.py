"""Equal budgets (--max-samples, --max-generated-tokens; `ngrpo study --budget`) and the per-prompt
record RUN_DIR/groups.jsonl (openrlhf_patch/sampling.py, group_log.py).

The unit tests drive sampling.wrap_generate_samples with stand-in batches (no OpenRLHF loop):
hand-counted samples, tokens, stop step and groups.jsonl rows. One pipeline test trains the tiny
model with a scripted reward until --max-samples stops it.
"""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from openrlhf_patch import config as patch_config
from openrlhf_patch import group_log, sampling
from openrlhf_patch.config import PatchConfig

G = 2          # samples per prompt in the stand-in batches
TOKENS = 3     # response tokens of every stand-in sample


def _sample(prompt, reward):
    return SimpleNamespace(prompts=[prompt], labels=["a"], rewards=torch.tensor([float(reward)]),
                           response_length=torch.tensor([TOKENS]), sequences=torch.zeros(1, 5), info={})


def _group(prompt, rewards):
    return [_sample(prompt, r) for r in rewards]


class Generator:
    def __init__(self, save_steps=10):
        self.args = SimpleNamespace(rollout=SimpleNamespace(n_samples_per_prompt=G),
                                    ckpt=SimpleNamespace(save_steps=save_steps))


def _activate(monkeypatch, **fields):
    monkeypatch.setitem(patch_config._active, "config", PatchConfig(**fields))


def _rows(run_dir):
    path = Path(run_dir) / group_log.GROUPS_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_max_samples_stops_at_the_step_that_reaches_it_without_a_filter(tmp_path, monkeypatch):
    _activate(monkeypatch, run_dir=str(tmp_path), max_samples=10)
    # OpenRLHF's own loop (no filter): two prompts a step, G samples each, handed over together
    upstream = lambda self: (_group("p0", [1, 0]) + _group("p1", [0, 0]), None, 2, False)
    gen, generate = Generator(), sampling.wrap_generate_samples(upstream)
    results = [generate(gen) for _ in range(4)]
    assert [len(r[0]) for r in results] == [4, 4, 4, 0]      # 4, 8, 12 >= 10 after step 3: stop
    assert results[3][3] is True                              # exhausted: OpenRLHF's loop ends, final save
    assert gen.args.ckpt.save_steps == 1                      # the budget's last step checkpoints
    assert [e.info["ngrpo/generated_samples"].item() for e in results[1][0]] == [8.0] * 4
    assert results[2][0][0].info["ngrpo/generated_tokens"].item() == 12 * TOKENS
    progress = json.loads((tmp_path / "progress.json").read_text())
    assert (progress["completed_steps"], progress["generated_samples"], progress["generated_tokens"]) == (3, 12, 36)
    rows = _rows(tmp_path)
    assert [(r["step"], r["correct"], r["n"], r["kept"], r["tokens"]) for r in rows] == \
        [(s, c, 2, True, 2 * TOKENS) for s in (1, 2, 3) for c in (1, 0)]
    assert rows[0]["mean_reward"] == 0.5
    assert rows[0]["prompt_id"] == group_log.prompt_hash("p0") and rows[0]["id_from"] == "hash"


def test_dropped_groups_count_and_are_recorded(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text(
        "".join(json.dumps({"id": f"row-{i}", "prompt": f"p{i}"}) + "\n" for i in range(2)))
    _activate(monkeypatch, run_dir=str(tmp_path), max_generated_tokens=20, group_filter="drop_all_correct")

    def refill_loop(self):  # what make_generate_vllm notes: a dropped group, then two kept ones
        dropped, kept = _group("p2", [1, 1]), _group("p0", [0, 1]) + _group("p1", [0, 0])
        sampling._note_group(self, dropped, torch.tensor([1.0, 1.0]), False)
        sampling._note_group(self, kept[:2], torch.tensor([0.0, 1.0]), True)
        sampling._note_group(self, kept[2:], torch.tensor([0.0, 0.0]), True)
        return kept, None, 3, False

    gen, generate = Generator(), sampling.wrap_generate_samples(refill_loop)
    results = [generate(gen) for _ in range(3)]
    assert [len(r[0]) for r in results] == [4, 4, 0]          # 18 tokens after step 1, 36 >= 20 after step 2
    assert results[1][0][0].info["ngrpo/generated_samples"].item() == 12.0  # 6 a step, dropped included
    rows = _rows(tmp_path)
    assert [(r["step"], r["prompt_id"], r["id_from"], r["correct"], r["kept"]) for r in rows] == [
        (s, pid, src, c, k) for s in (1, 2) for pid, src, c, k in
        ((group_log.prompt_hash("p2"), "hash", 2, False), ("row-0", "row", 1, True), ("row-1", "row", 0, True))]


def test_a_resume_continues_the_count(tmp_path, monkeypatch):
    _activate(monkeypatch, run_dir=str(tmp_path), max_samples=10, start_step=2, start_generated_samples=8,
              start_generated_tokens=24)
    upstream = lambda self: (_group("p0", [1, 0]) + _group("p1", [0, 0]), None, 2, False)
    gen, generate = Generator(), sampling.wrap_generate_samples(upstream)
    first, second = generate(gen), generate(gen)
    assert first[0][0].info["ngrpo/generated_samples"].item() == 12.0 and gen.args.ckpt.save_steps == 1
    assert second[0] == [] and second[3] is True
    assert [r["step"] for r in _rows(tmp_path)] == [3, 3]


def test_the_counts_at_a_checkpoint_come_from_the_step_log(tmp_path):
    from pipelines.launch import training

    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(
        {"step": s, "ngrpo/generated_samples": 4.0 * s, "ngrpo/generated_tokens": 12.0 * s}) + "\n" for s in (1, 2, 3)))
    assert training.generated_counts(tmp_path, 2) == (8, 24)
    assert training.generated_counts(tmp_path, 0) == (0, 0)
    assert training.budget_spent({"max_samples": 8}, tmp_path, 2) == "--max-samples 8 (8 generated)"
    assert training.budget_spent({"max_samples": 9, "max_generated_tokens": 100}, tmp_path, 2) is None


def test_a_resume_rebuilds_the_budget_from_the_manifest(tmp_path):
    from pipelines.launch import resume, training
    from pipelines.launch.recipes import build_recipe

    recipe = build_recipe("ngrpo", "cpu-tiny", {})
    import dataclasses

    manifest = {"recipe": dataclasses.asdict(recipe), "device": "cpu", "max_samples": 64,
                "patch_config": {"max_samples": 1, "start_generated_samples": 99}}
    config = resume.rebuild_patch_config(tmp_path, manifest, False)
    assert (config.max_samples, config.max_generated_tokens, config.start_generated_samples) == (64, None, 0)
    with pytest.raises(resume.ResumeRefused, match="max_generated_tokens is 'x'"):
        resume.rebuild_patch_config(tmp_path, {**manifest, "max_generated_tokens": "x"}, False)
    assert training.build_patch_config(recipe, device="cpu", max_steps=None, reward_file="r.py",
                                       max_samples=5).max_samples == 5


def test_study_budget_reaches_every_run_and_keeps_old_study_keys(tmp_path):
    import dataclasses
    import hashlib

    from pipelines.studies.study import StudyPlan, budget_text, train_argv

    plan = StudyPlan(model="m", data="d", benchmarks=["b"], algos=["ngrpo"], seeds=[0])
    old = dataclasses.asdict(plan)  # a plan written before --budget and --drop-checkpoints existed
    del old["budget"], old["drop_checkpoints"]
    assert plan.key() == hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]
    budgeted = dataclasses.replace(plan, budget=["samples", 64])
    assert budgeted.key() != plan.key()
    argv = train_argv(budgeted, "ngrpo", 0, tmp_path / "run")
    assert argv[argv.index("--max-samples") + 1] == "64"
    tokens = train_argv(dataclasses.replace(plan, budget=["tokens", 900]), "grpo", 1, tmp_path / "run")
    assert tokens[tokens.index("--max-generated-tokens") + 1] == "900"
    assert budget_text(dataclasses.asdict(budgeted)) == \
        "equal budget of 64 generated responses (dropped groups included) per run"
    assert budget_text({"max_steps": 5}) == "5 steps per run"


def test_cli_flags(tmp_path):
    from ngrpo_cli.main import cli

    runner = CliRunner()
    help_text = runner.invoke(cli, ["train", "--help"]).output
    assert "--max-samples" in help_text and "--max-generated-tokens" in help_text
    data = tmp_path / "d.jsonl"
    data.write_text("{}\n")
    out = runner.invoke(cli, ["study", "-o", str(tmp_path / "s"), "--model", "m", "--data", str(data), "--eval", "b",
                              "--budget", "steps", "5", "--max-steps", "5"])
    assert out.exit_code == 2 and "--budget steps N and --max-steps both set the steps" in out.output
    out = runner.invoke(cli, ["study", "-o", str(tmp_path / "s"), "--model", "m", "--data", str(data), "--eval", "b",
                              "--budget", "episodes", "5"])
    assert out.exit_code == 2 and "episodes" in out.output


# ------------------------------------------------------------------ one real run
EASY_REWARD = '''
import torch

def reward_func(queries, prompts, labels, **kwargs):
    r = torch.tensor([1.0 if "EASY" in p else 0.0 for p in prompts])
    return {"rewards": r, "scores": r, "extra_logs": {}}
'''
PROMPTS, GROUP = 4, 4   # cpu-tiny: 4 prompts a step, 4 samples each
BUDGET = 40


@pytest.mark.pipeline
def test_max_samples_run_writes_groups_and_stops_at_the_budget(tmp_path, tiny_model_dir):
    """ngrpo drops all-correct groups: every 4th problem is EASY (all 4 responses right, dropped),
    the rest all wrong (kept). The run stops at the first step whose cumulative responses,
    dropped groups included, reach --max-samples, and checkpoints it."""
    from pipelines.launch import rundir

    problems = [{"id": f"q{i}", "problem": f"{'EASY ' if i % 4 == 0 else ''}What is {i} + 1?", "answer": str(i + 1)}
                for i in range(32)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in problems))
    (tmp_path / "easy.py").write_text(EASY_REWARD)
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "ngrpo_cli.main", "train", "--model", str(tiny_model_dir), "--algo",
                           "ngrpo", "--data", str(data), "--output", str(run), "--device", "cpu", "--preset",
                           "cpu-tiny", "--reward-file", str(tmp_path / "easy.py"), "--max-samples", str(BUDGET)],
                          capture_output=True, text=True, timeout=1200, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    rows = [json.loads(line) for line in (run / "groups.jsonl").read_text().splitlines()]
    steps = sorted({r["step"] for r in rows})
    cumulative = [GROUP * sum(1 for r in rows if r["step"] <= s) for s in steps]
    last = next(s for s, c in zip(steps, cumulative) if c >= BUDGET)
    manifest = rundir.read_manifest(run)
    assert manifest["status"] == "finished" and manifest["global_step"] == last == steps[-1]
    assert last < len(problems) // PROMPTS
    easy = {p["id"] for p in problems if "EASY" in p["problem"]}
    for s in steps:  # steps x prompts kept, plus the dropped groups: exactly the EASY prompts
        kept = [r for r in rows if r["step"] == s and r["kept"]]
        dropped = [r for r in rows if r["step"] == s and not r["kept"]]
        assert len(kept) == PROMPTS and all(r["correct"] == 0 and r["n"] == GROUP for r in kept)
        assert all(r["correct"] == GROUP for r in dropped)
        assert {r["prompt_id"] for r in dropped} <= easy and not {r["prompt_id"] for r in kept} & easy
    assert {r["id_from"] for r in rows} == {"row"}
    metrics = rundir.read_step_log(run / rundir.METRICS).rows
    assert [m["ngrpo/generated_samples"] for m in metrics] == [float(c) for c in cumulative]
    assert metrics[-1]["ngrpo/generated_tokens"] == sum(r["tokens"] for r in rows)
    assert rundir.checkpoint_step(run) == last  # the budget's last step is checkpointed
    progress = json.loads((run / "progress.json").read_text())
    assert progress["generated_samples"] == cumulative[-1] and progress["completed_steps"] == last


@pytest.mark.parametrize("manifest, steps", [
    ({"num_problems": 2000, "recipe": {"prompts_per_step": 8, "samples_per_prompt": 4, "episodes": 1},
      "max_samples": 256}, 8),     # 256 / (8 x 4): the progress bar's length, not the data's 250 steps
    ({"num_problems": 2000, "recipe": {"prompts_per_step": 8, "samples_per_prompt": 4, "episodes": 1},
      "max_samples": 250}, 8),     # a last, partial step
    ({"num_problems": 2000, "recipe": {"prompts_per_step": 8, "samples_per_prompt": 4, "episodes": 1},
      "max_samples": 256, "max_steps": 5}, 5),
    ({"num_problems": 40, "recipe": {"prompts_per_step": 8, "samples_per_prompt": 4, "episodes": 1},
      "max_samples": 10_000}, 5),  # the data ends first
])
def test_the_planned_steps_follow_the_sample_budget(manifest, steps):
    from pipelines.launch.training import planned_steps

    assert planned_steps(manifest) == steps
