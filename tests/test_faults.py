"""Faults and bad input (issue 10): nothing lost, nothing silently wrong, errors before the engine starts.

Each case of the issue's table is a test here, with real processes, real signals and real files:
preflight failures leave no run directory and never start Ray; a copied run resumes into the
copy only; a second launch into a live run is refused; SIGINT marks a run interrupted and
SIGKILL leaves a run that reads as killed; non-finite rewards, a reward file that raises and a
filter that drops every group stop the run with one clear message; a damaged latest checkpoint
falls back to the previous complete one.
"""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from child_process import sigint_as_in_a_terminal
from click.testing import CliRunner

from fixtures_runs import tiny_runs  # noqa: F401  (session fixture: two finished 2-step runs)
from ngrpo_cli.main import cli
from pipelines.launch import rundir

REPO = Path(__file__).resolve().parents[1]
CPU = ["--device", "cpu", "--preset", "cpu-tiny"]


def write_problems(path: Path, n: int = 64, long_problem: str = None) -> Path:
    rows = [{"id": str(i), "problem": f"What is {i} + {i % 7}?", "answer": str(i + i % 7)} for i in range(n)]
    if long_problem:
        rows[3]["problem"] = long_problem
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def ngrpo(*args, timeout=900, **kwargs):
    return subprocess.run([sys.executable, "-m", "ngrpo_cli.main", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, **kwargs)


def tree_digest(folder: Path) -> dict:
    """{relative path: sha256} of every file under FOLDER."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ preflight: before Ray, no run directory


@pytest.fixture
def data(tmp_path):
    return write_problems(tmp_path / "d.jsonl")


@pytest.mark.parametrize("case", ["no_model", "no_tokenizer", "group_of_one", "clip_out_of_range", "zero_steps",
                                  "negative_steps", "bad_row", "long_prompt"])
def test_bad_input_fails_in_one_line_before_anything_starts(case, tmp_path, data, tiny_model_dir):
    model, extra, expected = str(tiny_model_dir), [], None
    if case == "no_model":
        model, expected = str(tmp_path / "nowhere"), f"{tmp_path / 'nowhere'}: no such model folder or file"
    elif case == "no_tokenizer":
        model = tmp_path / "weights_only"
        shutil.copytree(tiny_model_dir, model)
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json"):
            (model / name).unlink(missing_ok=True)
        expected = f"{model} has no tokenizer files"
    elif case == "group_of_one":
        extra, expected = ["--samples-per-prompt", "1"], "--samples-per-prompt 1: the ngrpo estimator works on groups"
    elif case == "clip_out_of_range":
        extra, expected = ["--eps-clip-low", "1.5"], "--eps-clip-low 1.5: must be in (0, 1)"
    elif case in ("zero_steps", "negative_steps"):
        extra = ["--max-steps", "0" if case == "zero_steps" else "-1"]
        expected = "Invalid value for '--max-steps'"
    elif case == "bad_row":
        data.write_text(data.read_text() + json.dumps({"id": "x", "problem": "", "answer": "1"}) + "\n")
        expected = f"{data}: line 65: field 'problem': missing or empty"
    elif case == "long_prompt":
        write_problems(data, long_problem="What is the sum of " + "1 + " * 12_500 + "1?")  # 50,000 characters
        expected = f"{data}: 1 of 64 prompts are longer than --max-prompt-len 128 tokens (the longest, id '3', has"
    run = tmp_path / "run"
    result = invoke("train", "--model", model, "--data", data, "--output", run, *CPU, *extra)
    assert result.exit_code != 0
    assert expected in result.output, result.output
    assert "Traceback" not in result.output and not run.exists()
    if case == "long_prompt":  # dropped on request, and said so
        result = invoke("train", "--model", model, "--data", data, *CPU, "--long-prompts", "drop", "--dry-run")
        assert result.exit_code == 0, result.output
        assert "1 of 64 prompts are longer than --max-prompt-len 128 tokens" in result.output and "left out" in result.output


def test_preflight_starts_no_ray(tmp_path, data):
    """The same checks in a fresh process: it exits without ever importing Ray's driver."""
    code = ("import sys; sys.argv = ['ngrpo', 'train', '--model', 'no/such-model', '--data', sys.argv[1], "
            "'--output', sys.argv[2], '--device', 'cpu']\n"
            "from ngrpo_cli.main import cli\n"  # the click app: main() would end the process at once
            "try:\n    cli()\n"
            "except SystemExit as e:\n    print('exit', e.code, 'ray' in sys.modules and sys.modules['ray'].is_initialized())")
    proc = subprocess.run([sys.executable, "-c", code, str(data), str(tmp_path / "run")], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert "exit 2 False" in proc.stdout, proc.stdout + proc.stderr
    assert "no/such-model: cannot load this Hub model: it is not in the local Hugging Face cache" in proc.stderr
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ ownership and status


LOCK_HOLDER = textwrap.dedent('''
    import sys, time
    from pipelines.launch.rundir import RunLock
    RunLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(600)
''')


def test_a_live_owner_is_respected_and_a_killed_one_detected(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rundir.write_manifest(run, {"status": "running"})
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(run)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(rundir.RunDirBusy, match=f"in use by ngrpo pid {holder.pid} on "):
            rundir.RunLock(run).acquire()
        assert rundir.effective_status(run) == "running"
        holder.send_signal(signal.SIGKILL)  # a hard kill: no code of the owner runs
        holder.wait(30)
        assert rundir.effective_status(run) == "killed"  # the manifest still says "running"
        assert rundir.read_manifest(run)["status"] == "running"
        with rundir.RunLock(run):  # the dead owner's lock is free
            assert rundir.RunLock.held(run)
    finally:
        holder.kill()


@pytest.mark.parametrize("status, checkpoint, refused", [("failed", False, False), ("killed", False, False),
                                                         ("failed", True, True), ("finished", False, True)])
def test_an_earlier_run_in_the_output_folder(tmp_path, status, checkpoint, refused):
    """A failed or killed run without a checkpoint never blocks a rerun; one that can be resumed, or
    a finished one, is kept unless --overwrite."""
    from ngrpo_cli.train_cmd import _clear_earlier_run

    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    (run / "data" / "train.jsonl").write_text("{}\n")
    rundir.write_manifest(run, {"status": "running" if status == "killed" else status})
    if checkpoint:
        (run / "checkpoints" / "_actor").mkdir(parents=True)
        (run / "checkpoints" / "_actor" / "latest").write_text("global_step3")
    effective = rundir.effective_status(run)
    assert effective == status
    if refused:
        with pytest.raises(Exception, match=f"already holds a {status} run.*--resume {run}.*--overwrite"):
            _clear_earlier_run(run, overwrite=False, status=effective)
        assert (run / rundir.MANIFEST).exists()
    _clear_earlier_run(run, overwrite=refused, status=effective)
    assert not (run / rundir.MANIFEST).exists() and not (run / "data").exists()


# ------------------------------------------------------------------ real runs


BAD_REWARDS = {
    "nan": "import torch\ndef reward_func(queries, prompts, labels, **kw):\n"
           "    r = torch.full((len(queries),), float('nan'))\n    return {'rewards': r, 'scores': r, 'extra_logs': {}}\n",
    "raises": "def helper(q):\n    raise ValueError('boom from the user reward: ' + str(len(q)))\n"
              "def reward_func(queries, prompts, labels, **kw):\n    return helper(queries)\n",
    "always_right": "import torch\ndef reward_func(queries, prompts, labels, **kw):\n"
                    "    r = torch.ones(len(queries))\n    return {'rewards': r, 'scores': r, 'extra_logs': {}}\n",
}


@pytest.mark.pipeline
@pytest.mark.parametrize("kind", sorted(BAD_REWARDS))
def test_bad_rewards_stop_the_run_with_one_clear_message(kind, tmp_path, tiny_model_dir):
    reward = tmp_path / f"{kind}_reward.py"
    reward.write_text(BAD_REWARDS[kind])
    run = tmp_path / "run"
    proc = ngrpo("train", "--model", tiny_model_dir, "--data", write_problems(tmp_path / "d.jsonl", 256),
                 "--output", run, *CPU, "--reward-file", reward, "--max-steps", "2", "--max-dropped-groups", "6")
    assert proc.returncode != 0
    err = proc.stderr
    first_error = err[err.index("Error: "):]  # the first error line of the whole output
    if kind == "nan":
        assert f"Error: training failed: the reward function ({reward}) returned nan for a response of prompt" in err
    elif kind == "raises":  # the user's traceback, first: their file, their line, their message
        assert first_error.startswith(f"Error: training failed: the reward function in {reward} failed:\nTraceback")
        assert f'File "{reward}", line 2, in helper' in first_error
        assert "ValueError: boom from the user reward: 1" in first_error
    else:  # ngrpo drops all-correct groups; a reward that is always right leaves nothing to train on
        assert "the group filter 'drop_all_correct' dropped 6 groups in a row" in err and "[1.0, 1.0, 1.0, 1.0]" in err
    assert "(full log: " in err  # and where to read more
    manifest = rundir.read_manifest(run)
    assert manifest["status"] == "failed" and manifest["global_step"] == 0
    assert not (run / rundir.FINAL_MODEL).exists()  # no "final model" that is the base model


@pytest.mark.pipeline
def test_a_vllm_engine_that_fails_to_start_stops_the_run_at_once(tmp_path, tiny_model_dir):
    """A model vLLM cannot serve (an architecture it does not know; transformers loads it by its
    model_type, so the policy starts): the rollout actor dies while it is created. The policy's
    weight-sync group used to wait for it until its 10-minute store timeout; the subprocess
    timeout below is well under that, so without the fix this test fails."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = ["NgrpoNoSuchForCausalLM"]
    (model / "config.json").write_text(json.dumps(config))
    run = tmp_path / "run"
    proc = ngrpo("train", "--model", model, "--data", write_problems(tmp_path / "d.jsonl"), "--output", run, *CPU,
                 "--max-steps", "2", timeout=300)
    assert proc.returncode != 0
    err = proc.stderr
    first_error = err[err.index("Error: "):]
    assert first_error.startswith("Error: training failed: EngineStartError: vLLM engine 0 of 1 failed to start"), \
        err[-3000:]
    # vLLM's own reason, in the message's next lines
    assert "Model architectures ['NgrpoNoSuchForCausalLM'] are not supported" in "\n".join(first_error.splitlines()[:3])
    manifest = rundir.read_manifest(run)
    assert manifest["status"] == "failed" and manifest["global_step"] == 0


@pytest.mark.parametrize("text, expected", [
    ("The actor died because of an error raised in its creation task, ray::A.__init__() (pid=1)\n"
     '  File "a.py", line 3, in f\n    raise E\nValueError: one\n\nDuring handling\n'
     "pydantic_core.ValidationError: 1 validation error\n  Value error, no such model\n",
     "pydantic_core.ValidationError: 1 validation error\n  Value error, no such model"),
    ("RuntimeError: Engine core initialization failed. See root cause above.",
     "RuntimeError: Engine core initialization failed. See root cause above."),
    ("no exception line", "no exception line"),
    ("KeyError: " + "k" * 700, "KeyError: " + "k" * 590 + " ..."),
])
def test_an_engine_error_is_cut_to_its_last_exception(text, expected):
    from openrlhf_patch.engines import _last_exception

    assert _last_exception(text) == expected


def _wait_for(predicate, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.pipeline
def test_concurrent_launch_sigint_and_sigkill(tmp_path, tiny_model_dir):
    """A second launch into a live run is refused; SIGINT marks the run interrupted and keeps its
    checkpoint; after SIGKILL the run reads as killed and resumes; each step trains once."""
    data = write_problems(tmp_path / "d.jsonl", 20_000)  # a large file widens the old race window
    run = tmp_path / "run"
    args = ["train", "--model", tiny_model_dir, "--data", data, "--output", run, *CPU, "--max-steps", "4",
            "--save-steps", "1"]
    first = subprocess.Popen([sys.executable, "-m", "ngrpo_cli.main", *map(str, args)], cwd=REPO, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                             preexec_fn=sigint_as_in_a_terminal)
    try:
        _wait_for(lambda: rundir.RunLock.held(run), 300, "the first launch to take the run")
        second = ngrpo(*args, timeout=300)
        assert second.returncode != 0 and f"{run} is in use by ngrpo pid {first.pid} on " in second.stderr
        _wait_for(lambda: rundir.checkpoint_step(run) >= 1, 900, "the first checkpoint")
        os.killpg(first.pid, signal.SIGINT)  # Ctrl-C in the terminal reaches the whole process group
        out, _ = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode != 0 and "interrupted; the run keeps its last checkpoint" in out
    manifest = rundir.read_manifest(run)
    assert manifest["status"] == "interrupted" and rundir.checkpoint_step(run) >= 1

    resumed = subprocess.Popen([sys.executable, "-m", "ngrpo_cli.main", "train", "--resume", str(run)], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for(lambda: rundir.read_manifest(run).get("status") == "running" and rundir.RunLock.held(run), 300,
                  "the resumed launch")
        resumed.send_signal(signal.SIGKILL)
        resumed.wait(60)
    finally:
        resumed.kill()
    _wait_for(lambda: not rundir.RunLock.held(run), 60, "the lock to be released by the dead process")
    assert rundir.read_manifest(run)["status"] == "running" and rundir.effective_status(run) == "killed"

    killed_at = rundir.checkpoint_step(run)
    final = ngrpo("train", "--resume", run)
    assert final.returncode == 0, final.stderr[-4000:]
    assert f"resuming {run} (killed) from step {killed_at}" in final.stderr
    steps = [row["step"] for row in rundir.read_step_log(run / rundir.METRICS).rows]
    assert steps == [1, 2, 3, 4]  # every step once, none repeated or lost
    assert rundir.read_manifest(run)["status"] == "finished"


@pytest.mark.pipeline
def test_sigterm_marks_the_run_interrupted(tmp_path, tiny_model_dir):
    """A scheduler's SIGTERM to `ngrpo train` (not its group) ends the run like Ctrl-C, although
    ray.init gives the driver its own SIGTERM handler (sys.exit)."""
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "ngrpo_cli.main", "train", "--model", str(tiny_model_dir), "--data",
                             str(write_problems(tmp_path / "d.jsonl", 256)), "--output", str(run), *CPU,
                             "--max-steps", "50", "--save-steps", "1"], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for(lambda: rundir.checkpoint_step(run) >= 1, 900, "the first checkpoint")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode != 0 and "interrupted; the run keeps its last checkpoint" in out, out[-3000:]
    manifest = rundir.read_manifest(run)
    assert manifest["status"] == "interrupted" and manifest["error"] is None and rundir.checkpoint_step(run) >= 1


@pytest.mark.pipeline
def test_a_copied_run_resumes_into_the_copy_only(tiny_runs, tmp_path):
    original = tiny_runs["ngrpo"]
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    before = tree_digest(original)
    proc = ngrpo("train", "--resume", copy, "--max-steps", "3")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert tree_digest(original) == before  # byte-identical: no checkpoint, log or model of it touched
    assert [r["step"] for r in rundir.read_step_log(copy / rundir.METRICS).rows] == [1, 2, 3]
    assert (copy / "checkpoints" / "_actor" / "latest").read_text().strip() == "global_step3"
    assert f"final model: {copy / 'final_model'}" in proc.stdout
    assert str(original) not in (copy / rundir.MANIFEST).read_text()  # the manifest names no path of the original


@pytest.mark.pipeline
def test_resume_falls_back_from_a_truncated_latest_checkpoint(tiny_runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_runs["ngrpo"], run)
    damaged = run / "checkpoints" / "_actor" / "global_step2" / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
    damaged.write_bytes(damaged.read_bytes()[:1000])
    proc = ngrpo("train", "--resume", run, "--max-steps", "3")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert ("the latest checkpoint (step 2) is damaged: " f"{damaged} is corrupt or truncated") in proc.stderr
    assert "resuming from the previous complete one, step 1" in proc.stderr
    assert [r["step"] for r in rundir.read_step_log(run / rundir.METRICS).rows] == [1, 2, 3]
    kept = list((run / "checkpoints" / "damaged").glob("*/_actor/global_step2"))
    assert len(kept) == 1 and (kept[0] / damaged.name).stat().st_size == 1000  # nothing deleted
