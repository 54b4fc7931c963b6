"""`ngrpo study` (issue 11): a real 2 algorithms x 2 seeds x 2 steps study on the tiny model.

The study is stopped with SIGINT after its first run has finished and started again with the same
command; the tests then hold every number of study.json against the runs' own eval summaries and
statistics computed here, independently, from those summaries.
"""
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from child_process import sigint_as_in_a_terminal

from pipelines.datasets import arith

pytestmark = pytest.mark.pipeline
REPO = Path(__file__).resolve().parents[1]
T95_DF1 = 12.706  # two-sided 95 % quantile of Student's t with 1 degree of freedom (2 seeds)


def _jsonl(path: Path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("study")
    train = _jsonl(root / "train.jsonl", arith.problems(64, level=1, split="train", seed=0))
    bench = _jsonl(root / "heldout.jsonl", arith.problems(6, level=1, split="test", seed=0))
    out = root / "study"
    cmd = [sys.executable, "-m", "ngrpo_cli.main", "study", "-o", str(out), "--model", str(tiny_model_dir),
           "--data", str(train), "--eval", str(bench), "--algos", "ngrpo,grpo", "--seeds", "0,1", "--max-steps", "2",
           "--device", "cpu", "--preset", "cpu-tiny", "--eval-n", "2", "--eval-max-new-tokens", "16",
           "--eval-backend", "hf"]
    first = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True,
                             preexec_fn=sigint_as_in_a_terminal)
    try:
        deadline = time.time() + 1800
        while time.time() < deadline:
            state = json.loads((out / "study.json").read_text()) if (out / "study.json").exists() else {}
            if state.get("runs", {}).get("ngrpo-s0", {}).get("status") == "finished":
                break
            time.sleep(1)
        else:
            raise AssertionError("the study's first run did not finish")
        first_run = _digest(out / "runs" / "ngrpo-s0")
        os.killpg(first.pid, signal.SIGINT)
        stopped_output, _ = first.communicate(timeout=600)
    finally:
        first.kill()
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=3600)
    assert again.returncode == 0, (again.stdout + again.stderr)[-6000:]
    return {"dir": out, "cmd": cmd, "first_run": first_run, "stopped": first.returncode, "stopped_output": stopped_output,
            "output": again.stdout + again.stderr, "state": json.loads((out / "study.json").read_text())}


def _summary(study_dir: Path, name: str) -> dict:
    return json.loads((study_dir / name / "summary.json").read_text())["benchmarks"]["heldout"]


def test_every_number_is_the_runs_own(study):
    out, results = study["dir"], study["state"]["results"]["benchmarks"]["heldout"]
    assert results["base"] == {k: v for k, v in _summary(out / "eval", "base").items() if k in results["base"]}
    assert list(results["base"]) == ["avg@2", "pass@2", "maj@2", "final_score"]
    for algo in ("ngrpo", "grpo"):
        runs = [_summary(out / "runs" / f"{algo}-s{seed}", "eval") for seed in (0, 1)]
        got = results["algos"][algo]
        assert got["seeds"] == [0, 1]
        for metric in results["base"]:
            values = [r[metric] for r in runs]
            mean, std = statistics.mean(values), statistics.stdev(values)
            half = T95_DF1 * std / math.sqrt(2)
            assert got[metric]["values"] == values
            assert got[metric]["mean"] == pytest.approx(mean, abs=1e-12)
            assert got[metric]["std"] == pytest.approx(std, abs=1e-12)
            assert got[metric]["ci95"] == pytest.approx([mean - half, mean + half], abs=1e-12)
            assert got[metric]["change_from_base"] == pytest.approx(mean - results["base"][metric], abs=1e-12)
    ngrpo = [_summary(out / "runs" / f"ngrpo-s{s}", "eval")["avg@2"] for s in (0, 1)]
    grpo = [_summary(out / "runs" / f"grpo-s{s}", "eval")["avg@2"] for s in (0, 1)]
    diffs = [a - b for a, b in zip(ngrpo, grpo)]  # paired by seed
    assert results["paired"]["grpo"]["avg@2"]["values"] == pytest.approx(diffs, abs=1e-12)
    assert results["paired"]["grpo"]["avg@2"]["mean"] == pytest.approx(statistics.mean(diffs), abs=1e-12)


def test_training_curves_are_the_mean_of_the_runs(study):
    out, training = study["dir"], study["state"]["results"]["training"]
    for algo in ("ngrpo", "grpo"):
        logs = [[json.loads(line) for line in (out / "runs" / f"{algo}-s{s}" / "metrics.jsonl").read_text().splitlines()]
                for s in (0, 1)]
        curve = training[algo]["rollout/reward_mean"]
        assert curve["steps"] == [1, 2]
        for i, step in enumerate((1, 2)):
            values = [next(r["rollout/reward_mean"] for r in log if r["step"] == step) for log in logs]
            assert curve["mean"][i] == pytest.approx(statistics.mean(values), abs=1e-12)
            assert curve["std"][i] == pytest.approx(statistics.stdev(values), abs=1e-12)
    assert "clip_frac_low" in training["ngrpo"] and "ngrpo/frac_all_wrong" in training["grpo"]


def test_study_md_and_figures(study):
    out, results = study["dir"], study["state"]["results"]["benchmarks"]["heldout"]
    md = (out / "study.md").read_text()
    stats = results["algos"]["ngrpo"]["avg@2"]
    cell = (f"{100 * stats['mean']:.1f} ± {100 * stats['std']:.1f} "
            f"[{100 * stats['ci95'][0]:.1f}, {100 * stats['ci95'][1]:.1f}]")
    assert f"| ngrpo (2 seeds) | {cell} |" in md
    assert "Paired difference, seed by seed" in md and "Command: `ngrpo study -o" in md and "CPU cores" in md
    assert (out / "eval_heldout.png").stat().st_size > 10_000 and (out / "training_curves.png").stat().st_size > 10_000
    assert study["state"]["results"]["steps_trained"] == {"ngrpo-s0": 2, "grpo-s0": 2, "ngrpo-s1": 2, "grpo-s1": 2}
    assert "Stopped short" not in md


def test_a_restart_keeps_finished_runs(study):
    out = study["dir"]
    assert study["stopped"] != 0  # the interrupted study said so
    assert _digest(out / "runs" / "ngrpo-s0") == study["first_run"]  # not one file of the finished run rewritten
    log = (out / "logs" / "ngrpo-s0.train.log").read_text()
    assert log.count("$ ngrpo train") == 1
    assert all(e["status"] == "finished" for e in study["state"]["runs"].values())
    assert "ngrpo-s1: finished in" in study["output"] and "ngrpo-s0: finished" not in study["output"]


def test_a_changed_setting_is_refused(study):
    cmd = [a if a != "2" or study["cmd"][i - 1] != "--max-steps" else "3" for i, a in enumerate(study["cmd"])]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "holds a study with other settings (max_steps changed)" in proc.stderr and "--overwrite" in proc.stderr


def test_the_same_data_path_with_other_contents_is_refused(study):
    train = Path(study["cmd"][study["cmd"].index("--data") + 1])
    original = train.read_text()
    try:
        train.write_text(original + json.dumps({"id": "extra", "problem": "What is 1 + 1?", "answer": "2"}) + "\n")
        proc = subprocess.run(study["cmd"], cwd=REPO, capture_output=True, text=True, timeout=600)
    finally:
        train.write_text(original)
    assert proc.returncode != 0
    assert "holds a study with other settings (input_files changed)" in proc.stderr


def test_an_arm_trains_its_algorithm_with_its_own_settings_after_the_shared_ones(tmp_path):
    from pipelines.studies.study import StudyError, StudyPlan, arm_dirname, parse_arm, train_argv

    plan = StudyPlan(model="m", data="d.jsonl", benchmarks=["b"], algos=["grpo", "grpo@uniform-groups=mask-aux"],
                     seeds=[0], recipe={"uniform_groups": "keep", "lr": 1e-6})
    assert [name for name, _, _ in plan.runs()] == ["grpo-s0", "grpo+uniform-groups-mask-aux-s0"]
    argv = train_argv(plan, "grpo@uniform-groups=mask-aux", 0, tmp_path / "r")
    assert argv[argv.index("--algo") + 1] == "grpo"
    assert argv[-4:] == ["--lr", "1e-06", "--uniform-groups", "mask-aux"]  # the arm's after the shared: it wins
    assert parse_arm("ngrpo") == ("ngrpo", []) and arm_dirname("ngrpo") == "ngrpo"
    with pytest.raises(StudyError, match=r"arm 'grpo@mask-aux': 'mask-aux' is not SETTING=VALUE"):
        parse_arm("grpo@mask-aux")


@pytest.mark.parametrize("algos, message", [
    ("grpo@no-such-setting=1", "no-such-setting: not a recipe setting"),
    ("gpro@uniform-groups=skip", "unknown gpro"),
    ("grpo,grpo", "named twice"),
])
def test_bad_arms_are_refused_before_anything_starts(tmp_path, algos, message):
    from click.testing import CliRunner

    from ngrpo_cli.main import cli

    data = tmp_path / "d.jsonl"
    data.write_text('{"id": "1", "problem": "What is 1 + 1?", "answer": "2"}\n')
    result = CliRunner().invoke(cli, ["study", "-o", str(tmp_path / "s"), "--model", "m", "--data", str(data),
                                      "--eval", "b", "--algos", algos])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("drop", [True, False])
def test_drop_checkpoints_removes_a_finished_runs_checkpoints_only_after_its_eval(tmp_path, monkeypatch, drop):
    """The children stand in for `ngrpo train` and `ngrpo eval` (this test is about the study's
    bookkeeping: the real children are the pipeline tests'); each writes what the real one writes."""
    from pipelines.launch import rundir
    from pipelines.studies.study import Study, StudyPlan

    plan = StudyPlan(model="m", data="d.jsonl", benchmarks=["b"], algos=["grpo"], seeds=[0], drop_checkpoints=drop)
    seen = []

    def child(self, argv, log_name):
        out = Path(argv[argv.index("--output" if argv[0] == "train" else "-o") + 1])
        if argv[0] == "train":
            (out / rundir.CHECKPOINTS / "global_step1").mkdir(parents=True)
            (out / rundir.FINAL_MODEL).mkdir()
            (out / rundir.FINAL_MODEL / "config.json").write_text("{}")
            rundir.write_manifest(out, {"status": "finished", "global_step": 1})
        else:
            seen.append((rundir.CHECKPOINTS in {p.name for p in out.parent.iterdir()}) if out.name == "eval" else None)
            out.mkdir(parents=True, exist_ok=True)
            (out / "summary.json").write_text(json.dumps(
                {"settings": {"n": 1}, "benchmarks": {"b": {"avg@1": 0.5}}}))
        return 0

    monkeypatch.setattr(Study, "_ngrpo", child)
    study = Study(tmp_path / "s", plan, log=lambda msg: None)
    state = study.execute(progress=False)
    run = tmp_path / "s" / "runs" / "grpo-s0"
    assert state["runs"]["grpo-s0"]["status"] == "finished"
    assert seen == [None, True]  # the checkpoints were there while the final model was evaluated
    assert (run / rundir.CHECKPOINTS).exists() is (not drop) and (run / rundir.FINAL_MODEL / "config.json").exists()
    # housekeeping, not part of what is computed: a study planned without it continues with it
    assert StudyPlan(model="m", data="d.jsonl", benchmarks=["b"], algos=["grpo"], seeds=[0]).key() == \
        StudyPlan(model="m", data="d.jsonl", benchmarks=["b"], algos=["grpo"], seeds=[0], drop_checkpoints=True).key()
