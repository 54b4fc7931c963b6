"""A run directory is data, not instructions (issue 29, item 2).

Every field a probe tampered with is tampered here, in a copy of a real finished run: a resume
rebuilds OpenRLHF's command line from the recorded recipe, so a tampered command line or patch
setting is ignored (and nothing outside the run is read, written or run: an outside FIFO notices
a reader, an outside reward file would write a marker, outside folders keep their exact bytes);
what the rebuilt command line itself would take from the run (the user's flags after `--`,
symlinks, the checkpoint tag, the reward copy, the model's custom code) is refused before
anything starts, naming the field. `export-hf` refuses a `latest` tag or a checkpoint that
leads out of the run.
"""
import importlib.util
import json
import os
import re
import shutil
import threading
import time
from pathlib import Path

import pytest

from fixtures_runs import tiny_runs  # noqa: F401  (session fixture: two finished 2-step runs)
from pipelines.launch import resume, rundir
from test_faults import CPU, ngrpo, tree_digest, write_problems

OPENRLHF_LAUNCHER = Path(importlib.util.find_spec("openrlhf").origin).parent / "cli" / "train_ppo_ray.py"

MARKER_REWARD = """
from pathlib import Path
Path({marker!r}).write_text("the outside reward file ran")
def reward_func(queries, prompts, labels, **kwargs):
    raise SystemExit("outside reward")
"""


@pytest.fixture
def outside(tmp_path):
    """A folder outside the run with what a tampered manifest points at."""
    out = tmp_path / "outside"
    (out / "ckpt").mkdir(parents=True)
    (out / "final").mkdir()
    (out / "tb").mkdir()
    (out / "untouched.txt").write_text("must keep its bytes")
    (out / "evil_reward.py").write_text(MARKER_REWARD.format(marker=str(tmp_path / "MARKER")))
    return out


def _copy_run(tiny_runs, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(tiny_runs["ngrpo"], run)
    return run


def _edit_manifest(run: Path, change) -> dict:
    manifest = json.loads((run / rundir.MANIFEST).read_text())
    change(manifest)
    (run / rundir.MANIFEST).write_text(json.dumps(manifest))
    return manifest


def _set_flag(argv, flag, value):
    argv = list(argv)
    argv[argv.index(flag) + 1] = value
    return argv


class FifoWatch:
    """A FIFO that records whether any process opened it for reading (and then gives it EOF)."""

    def __init__(self, path: Path):
        self.path, self.opened = path, False
        os.mkfifo(path)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self):
        while not self._stop.is_set():
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)  # succeeds only once a reader is there
            except OSError:
                time.sleep(0.05)
                continue
            self.opened = True
            os.close(fd)

    def stop(self):
        self._stop.set()
        self._thread.join(5)


def test_every_path_flag_of_openrlhf_is_classified():
    """A new OpenRLHF flag that names a path must be sorted into resume's lists by a person."""
    flags = set(re.findall(r'"(--[a-zA-Z_.0-9]+)"', OPENRLHF_LAUNCHER.read_text()))
    pathlike = {f for f in flags if re.search(r"path|dir|dataset|file|url|model|pretrain|load|func|save|key|project|name", f)}
    known = set(resume.MODEL_FLAGS + resume.RUN_PATH_FLAGS + resume.NOT_PATH_FLAGS + (resume.REWARD_ENTRY_FLAG,))
    assert pathlike - known == set(), "classify these OpenRLHF flags in pipelines/launch/resume.py"
    assert known - flags == set(), "these flags are gone from OpenRLHF"


@pytest.mark.parametrize("flag", ["--ckpt.path", "--ckpt.pa", "--ckpt.path="])
def test_a_path_flag_is_checked_however_argparse_would_read_it(flag, tmp_path):
    """An abbreviation (argparse reads a unique prefix as the flag) or `--flag=value` is checked too."""
    run, outside = tmp_path / "run", tmp_path / "outside"
    run.mkdir()
    argv = lambda path: [flag + str(path)] if flag.endswith("=") else [flag, str(path)]  # noqa: E731
    with pytest.raises(resume.ResumeRefused, match=re.escape(f"is {outside}, which resolves to {outside}")):
        resume.check_paths(run, argv(outside), model="base")
    resume.check_paths(run, argv(run / "checkpoints"), model="base")  # inside the run: fine


@pytest.mark.pipeline
def test_a_tampered_command_line_and_patch_settings_are_ignored(tiny_runs, tmp_path, outside):
    """The probe's tampering of ngrpo_run.json: checkpoints, final model, TensorBoard, data and
    reward file moved outside the run. The resume trains from the run's own step-2 checkpoint on
    the run's own data, into the run, and says which recorded flags it did not follow."""
    run = _copy_run(tiny_runs, tmp_path)
    fifo = FifoWatch(outside / "data.jsonl")
    try:
        honest = json.loads((run / rundir.MANIFEST).read_text())["openrlhf_argv"]

        def tamper(m):
            argv = m["openrlhf_argv"]
            for flag, value in (("--ckpt.path", outside / "ckpt"), ("--ckpt.output_dir", outside / "final"),
                                ("--logger.tensorboard_dir", outside / "tb"),
                                ("--data.prompt_dataset", outside / "data.jsonl")):
                argv = _set_flag(argv, flag, str(value))
            m["openrlhf_argv"] = argv
            m["patch_config"].update(reward_file=str(outside / "evil_reward.py"), run_dir=str(outside))
            m["reward_file"]["origin"] = str(outside / "evil_reward.py")

        _edit_manifest(run, tamper)
        before = tree_digest(outside)
        proc = ngrpo("train", "--resume", run, "--max-steps", "3")
    finally:
        fifo.stop()
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert ("note: the manifest's recorded command line differs from the one its recipe gives (--ckpt.output_dir, "
            "--ckpt.path, --data.prompt_dataset, --logger.tensorboard_dir); resuming with the recipe's") in proc.stderr
    assert f"resuming {run} (finished) from step 2" in proc.stderr
    assert tree_digest(outside) == before and sorted(p.name for p in (outside / "ckpt").iterdir()) == []
    assert not fifo.opened and not (tmp_path / "MARKER").exists()
    assert [r["step"] for r in rundir.read_step_log(run / rundir.METRICS).rows] == [1, 2, 3]
    assert (run / "checkpoints" / "_actor" / "latest").read_text().strip() == "global_step3"
    assert rundir.read_manifest(run)["openrlhf_argv"] == honest  # the record is the rebuilt command line again


def _extra(flag, value):
    def change(m):
        m["launch"]["openrlhf_extra"] = [flag, value]
    return change


def _symlink_out(rel):
    def change(run, outside):
        target = run / rel
        moved = outside / target.name
        shutil.move(str(target), moved)
        target.symlink_to(moved)
    return change


def _write(rel, text):
    def change(run, outside):
        (run / rel).write_text(text)
    return change


def _model_with_code(run, outside):
    model = outside / "model"
    shutil.copytree(json.loads((run / rundir.MANIFEST).read_text())["model"], model)
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (model / "config.json").write_text(json.dumps(config))
    (model / "modeling_evil.py").write_text(f"open({str(outside.parent / 'MARKER')!r}, 'w').write('ran')\n")
    _edit_manifest(run, lambda m: m.update(model=str(model)))


REFUSED = {
    "extra --ckpt.path": (_extra("--ckpt.path", "OUTSIDE/ckpt"), "--ckpt.path is OUTSIDE/ckpt, which resolves to"),
    "extra --train.agent_func_path": (_extra("--train.agent_func_path", "OUTSIDE/evil_reward.py"),
                                      "--train.agent_func_path is OUTSIDE/evil_reward.py"),
    "extra --reward.remote_url": (_extra("--reward.remote_url", "OUTSIDE/evil_reward.py"),
                                  "a run's reward is always ngrpo's entry ngrpo_reward.py"),
    "extra --critic.model_name_or_path": (_extra("--critic.model_name_or_path", "OUTSIDE/final"),
                                          "--critic.model_name_or_path (only the base model"),
    "checkpoints symlinked out": (_symlink_out("checkpoints"), "--ckpt.path is RUN/checkpoints, which resolves to"),
    "data symlinked out": (_symlink_out("data/train.jsonl"), "--data.prompt_dataset is RUN/data/train.jsonl"),
    "a checkpoint file symlinked out": (
        _symlink_out("checkpoints/_actor/global_step2/mp_rank_00_model_states.pt"),
        "checkpoints/_actor/global_step2/mp_rank_00_model_states.pt is RUN/checkpoints"),
    "latest tag leaves the run": (_write("checkpoints/_actor/latest", "../../../outside/ckpt"),
                                  "unexpected checkpoint tag '../../../outside/ckpt' (expected global_stepN)"),
    "reward copy edited": (_write(rundir.REWARD_COPY, MARKER_REWARD.format(marker="MARKER")),
                           "reward_file.py has changed since the launch"),
    "trust_remote_code in the manifest": (
        lambda run, outside: _edit_manifest(run, lambda m: m.update(trust_remote_code=True)),
        "the run was launched with --trust-remote-code"),
    "base model with custom code": (_model_with_code, "auto_map names custom code (modeling_evil.py): pass --trust-remote-code"),
    "save_steps not a number": (lambda run, outside: _edit_manifest(
        run, lambda m: m["launch"].update(save_steps="1 --ckpt.path /tmp")), "launch.save_steps is '1 --ckpt.path /tmp'"),
    "no launch record": (lambda run, outside: _edit_manifest(run, lambda m: m.pop("launch")),
                         "the manifest has no 'launch' record (it was made by an older ngrpo)"),
    "patch setting of the wrong type": (lambda run, outside: _edit_manifest(
        run, lambda m: m["patch_config"].update(max_consecutive_dropped_groups="512")),
        "patch_config.max_consecutive_dropped_groups is '512', not of type int"),
}


@pytest.mark.pipeline
@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_tampered_run_directory_is_refused_before_anything_starts(case, tiny_runs, tmp_path, outside):
    run = _copy_run(tiny_runs, tmp_path)
    change, expected = REFUSED[case]
    if change.__code__.co_argcount == 1:  # an edit of the manifest's launch record
        def manifest_edit(m, change=change):
            change(m)
            m["launch"]["openrlhf_extra"] = [a.replace("OUTSIDE", str(outside)) for a in m["launch"]["openrlhf_extra"]]
        _edit_manifest(run, manifest_edit)
    else:
        change(run, outside)
    before_outside, before_manifest = tree_digest(outside), (run / rundir.MANIFEST).read_text()
    proc = ngrpo("train", "--resume", run, "--max-steps", "3", timeout=300)
    assert proc.returncode != 0
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith(f"Error: cannot resume {run}: "), proc.stderr[-3000:]
    assert expected.replace("OUTSIDE", str(outside)).replace("RUN", str(run)) in error
    assert tree_digest(outside) == before_outside and not (tmp_path / "MARKER").exists()
    assert (run / rundir.MANIFEST).read_text() == before_manifest  # refused before the run was touched
    assert [r["step"] for r in rundir.read_step_log(run / rundir.METRICS).rows] == [1, 2]


@pytest.mark.pipeline
def test_the_reward_copy_is_what_a_resume_runs(tiny_runs, tmp_path):
    """The launch copied the user's reward file into the run with its sha256; the original
    changing or vanishing later does not matter to a resume."""
    run = _copy_run(tiny_runs, tmp_path)
    manifest = rundir.read_manifest(run)
    origin = Path(manifest["reward_file"]["origin"])
    assert (run / rundir.REWARD_COPY).read_bytes() == origin.read_bytes()
    assert manifest["reward_file"]["sha256"] == resume.sha256_file(origin)
    assert resume.reward_file_for_resume(run, manifest) == str(run / rundir.REWARD_COPY)
    config = resume.rebuild_patch_config(run, manifest, trust_remote_code=False)
    assert config.reward_file == str(run / rundir.REWARD_COPY) and config.group_filter == "drop_all_correct"


# ------------------------------------------------------------------ export-hf


@pytest.mark.pipeline
@pytest.mark.parametrize("case", ["latest", "tag symlink", "final symlink"])
def test_export_refuses_what_leads_out_of_the_run(case, tiny_runs, tmp_path, outside):
    run = _copy_run(tiny_runs, tmp_path)
    actor = run / "checkpoints" / "_actor"
    args = []
    if case == "latest":
        shutil.copytree(actor / "global_step1", outside / "ckpt" / "global_step1")
        (actor / "latest").write_text("../../../outside/ckpt/global_step1")
        expected = f"{actor / 'latest'} names '../../../outside/ckpt/global_step1', not a checkpoint of this folder"
    elif case == "tag symlink":
        shutil.move(str(actor / "global_step2"), outside / "ckpt" / "global_step2")
        (actor / "global_step2").symlink_to(outside / "ckpt" / "global_step2")
        expected = f"leads to {outside / 'ckpt' / 'global_step2'}, outside {run}"
    else:
        shutil.move(str(run / "final_model"), outside / "final_model")
        (run / "final_model").symlink_to(outside / "final_model")
        args = ["--final"]
        expected = f"{run / 'final_model'} (the run's final model) leads to {outside / 'final_model'}, outside {run}"
    before = tree_digest(outside)
    proc = ngrpo("export-hf", run, tmp_path / "exported", *args, timeout=300)
    assert proc.returncode != 0 and expected in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "exported").exists() and tree_digest(outside) == before


# ------------------------------------------------------------------ a pickled model


def test_a_bin_only_model_is_refused_in_the_preflight(tiny_model_dir, tmp_path):
    import torch
    from safetensors.torch import load_file

    model = tmp_path / "bin_model"
    shutil.copytree(tiny_model_dir, model)
    weights = model / "model.safetensors"
    torch.save(load_file(weights), model / "pytorch_model.bin")
    weights.unlink()
    run = tmp_path / "run"
    proc = ngrpo("train", "--model", model, "--data", write_problems(tmp_path / "d.jsonl"), "--output", run, *CPU,
                 "--max-steps", "1", timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"Error: {model / 'pytorch_model.bin'}: the weights are a PyTorch pickle (.bin), which ngrpo does not load")
    assert not run.exists()
