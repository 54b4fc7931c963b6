"""The correctness bugs of the fidelity review (issue 12), each with a test that failed before its fix."""
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from ngrpo_cli.main import cli
from pipelines.launch import rundir

REPO = Path(__file__).resolve().parents[1]
CPU = ["--device", "cpu", "--preset", "cpu-tiny"]


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _jsonl(path: Path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------ data and eval files


def test_limit_applies_after_drop_overlap(tmp_path, shared_data_dir):
    """--limit N --drop-overlap writes N problems, none of them in the benchmark (the limit used to
    come first and leave fewer than N)."""
    out = tmp_path / "train.jsonl"
    result = invoke("prepare-data", "math-test", "--data-dir", shared_data_dir, "-o", out, "--limit", 300,
                    "--drop-overlap", "--check-overlap", "math500", "--no-check-answers")
    assert result.exit_code == 0, result.output
    rows = _jsonl(out)
    math500 = {r["problem"].strip() for r in _jsonl(shared_data_dir / "math500" / "test.jsonl")}
    assert len(rows) == 300 and not any(r["problem"] in math500 for r in rows)
    assert "-- dropped" in result.output


def test_a_json_file_of_json_lines_is_read(tmp_path):
    src = tmp_path / "lines.json"
    src.write_text('{"id": "a", "problem": "1 + 1?", "answer": "2"}\n{"id": "b", "problem": "2 + 2?", "answer": "4"}\n')
    result = invoke("prepare-data", src, "-o", tmp_path / "out.jsonl", "--check-overlap", "none")
    assert result.exit_code == 0, result.output
    assert [(r["id"], r["answer"]) for r in _jsonl(tmp_path / "out.jsonl")] == [("lines/a", "2"), ("lines/b", "4")]


def test_eval_resume_keeps_the_valid_samples_after_a_bad_line(tiny_model_dir, tmp_path):
    bench = tmp_path / "toy.jsonl"
    bench.write_text("".join(json.dumps({"id": str(i), "problem": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n"
                             for i in range(4)))
    args = ["eval", "--model", tiny_model_dir, "--backend", "hf", "--benchmarks", bench, "-o", tmp_path / "e",
            "--n", "2", "--temperature", "0", "--max-new-tokens", "4"]
    assert invoke(*args).exit_code == 0
    samples = tmp_path / "e" / "samples.jsonl"
    lines = samples.read_text().splitlines()
    assert len(lines) == 8
    lines[2] = '{"benchmark": "toy", "id": "1", "sam'  # one damaged line in the middle
    samples.write_text("\n".join(lines) + "\n")
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert f"{samples}: skipped 1 unreadable line(s) (line 3: invalid JSON" in result.output
    assert "7 already in" in result.output and "1 to generate" in result.output  # the 5 lines after it kept
    assert len(_jsonl(samples)) == 8


# ------------------------------------------------------------------ real runs

LOGGING_REWARD = textwrap.dedent('''
    import json, os, torch
    LOG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "graded.jsonl")

    def reward_func(queries, prompts, labels, **kwargs):
        # prompt i's answer is i + 1: even i are always right (1.0), odd i get partial credit (0.9)
        r = [1.0 if int(label) % 2 == 1 else 0.9 for label in labels]
        with open(LOG, "a") as f:
            f.writelines(json.dumps({"label": l, "reward": x}) + "\\n" for l, x in zip(labels, r))
        t = torch.tensor(r)
        return {"rewards": t, "scores": t, "extra_logs": {}}
''')


def _problems(path: Path, n: int = 64) -> Path:
    path.write_text("".join(json.dumps({"id": str(i), "problem": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n"
                            for i in range(n)))
    return path


def ngrpo(*args, timeout=1800):
    proc = subprocess.run([sys.executable, "-m", "ngrpo_cli.main", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return proc


@pytest.mark.pipeline
def test_max_steps_holds_when_openrlhf_logs_every_few_steps(tmp_path, tiny_model_dir):
    """--max-steps counted the logger's calls: with logging every 2 steps, 3 steps overshot to 4."""
    run = tmp_path / "run"
    ngrpo("train", "--model", tiny_model_dir, "--data", _problems(tmp_path / "d.jsonl"), "--output", run, *CPU,
          "--algo", "psr", "--max-steps", "3", "--", "--logger.logging_steps", "2")
    manifest = rundir.read_manifest(run)
    assert manifest["global_step"] == 3 and manifest["status"] == "finished"
    assert (run / "checkpoints" / "_actor" / "latest").read_text().strip() == "global_step3"
    assert [r["step"] for r in rundir.read_step_log(run / rundir.METRICS).rows] == [2]


@pytest.mark.pipeline
def test_the_group_filter_decides_by_correctness(tmp_path, tiny_model_dir):
    """ngrpo's drop-all-correct filter through the real sample generator: all-correct groups are
    dropped; groups of partial credit (0.9 < R_max = 1) are not all correct and stay. OpenRLHF's
    range on the mean (-1/8, 7/8) used to drop those too, and then every group of this run."""
    reward = tmp_path / "reward" / "partial_credit.py"
    reward.parent.mkdir()
    reward.write_text(LOGGING_REWARD)
    run = tmp_path / "run"
    ngrpo("train", "--model", tiny_model_dir, "--data", _problems(tmp_path / "d.jsonl"), "--output", run, *CPU,
          "--algo", "ngrpo", "--reward-file", reward, "--max-steps", "2")
    graded = _jsonl(reward.parent / "graded.jsonl")
    assert {g["reward"] for g in graded} == {1.0, 0.9}  # all-correct groups were generated...
    group = rundir.read_manifest(run)["recipe"]["samples_per_prompt"]
    for row in rundir.read_step_log(run / rundir.METRICS).rows:  # ...and none of them trained on
        assert row["ngrpo/frac_all_correct"] == 0.0 and row["ngrpo/frac_all_wrong"] == 1.0
        assert row["rollout/reward_mean"] == pytest.approx(0.9)
        # OpenRLHF's "pass rate" is kept *samples* per consumed prompt x 100; per prompt it is
        # below 100 % because the all-correct half of the prompts was dropped.
        assert 0 < row["dynamic_filtering_pass_rate"] / group < 100
    assert rundir.read_manifest(run)["global_step"] == 2


@pytest.mark.pipeline
def test_a_run_whose_data_runs_out_says_so(tmp_path, tiny_model_dir):
    """8 problems at 4 prompts per step and one episode: OpenRLHF's loader ends after 2 steps, and
    a run asked for 3 says that it stopped short and why, instead of only "finished"."""
    run = tmp_path / "run"
    proc = ngrpo("train", "--model", tiny_model_dir, "--data", _problems(tmp_path / "d.jsonl", n=8), "--output", run,
                 *CPU, "--algo", "grpo", "--max-steps", "3")
    assert rundir.read_manifest(run)["global_step"] == 2
    assert ("warning: the training data ran out after 2 of --max-steps 3 steps (8 problems x --episodes 1, "
            "4 prompts per step plus the refills of dropped groups)") in proc.stderr
