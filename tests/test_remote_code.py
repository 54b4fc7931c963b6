"""No model code runs unless asked (`--trust-remote-code`).

A real model folder (the tiny model) whose config.json has an auto_map naming a .py file that
writes a marker file when it is imported: every command that loads a model refuses it, in one line
naming the file, before anything starts, and the file is never imported; --trust-remote-code lets
it through. OpenRLHF's hard-coded trust_remote_code=True is replaced by the run's decision
(openrlhf_patch/remote_code.py).
"""
import inspect
import json
import shutil
import types
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from ngrpo_cli.main import cli
from openrlhf_patch import remote_code, touchpoints, upstream
from openrlhf_patch.config import PatchConfig
from pipelines.models import ModelError, check_remote_code, remote_code_problems

CODE_FILE = "configuration_ngrpo_test.py"
# The class keeps the name of the one it extends: transformers finds the model class of a config by
# the config class's name, so the model itself loads as a plain Qwen2.
CUSTOM_CONFIG = '''from pathlib import Path
Path({marker!r}).write_text("imported\\n")
from transformers.models.qwen2.configuration_qwen2 import Qwen2Config as _Qwen2Config


class Qwen2Config(_Qwen2Config):
    pass
'''


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def refusal(model: Path) -> str:
    return (f"{model}/config.json: auto_map names custom code ({CODE_FILE}): pass --trust-remote-code to run it")


@pytest.fixture
def custom_model(tiny_model_dir, tmp_path):
    """(model folder with an auto_map naming CODE_FILE, the marker file importing it writes)."""
    model = (tmp_path / "custom_model").resolve()
    shutil.copytree(tiny_model_dir, model)
    marker = tmp_path / "marker"
    (model / CODE_FILE).write_text(CUSTOM_CONFIG.format(marker=str(marker)))
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_ngrpo_test.Qwen2Config"}
    (model / "config.json").write_text(json.dumps(config, indent=2))
    return model, marker


@pytest.fixture
def no_ray(monkeypatch):
    """Fails the test if `ngrpo train` starts Ray's node."""
    from pipelines.launch import training

    def start_ray_early(*a, **k):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(training, "start_ray_early", start_ray_early)


# ------------------------------------------------------------------------------- the check
def test_the_check_names_every_config_and_file(custom_model):
    model, marker = custom_model
    (model / "tokenizer_config.json").write_text(json.dumps({
        **json.loads((model / "tokenizer_config.json").read_text()),
        "auto_map": {"AutoTokenizer": ["tokenization_x.XTokenizer", "owner/repo--tokenization_x.XTokenizerFast"]}}))
    assert remote_code_problems(model) == [
        f"{model}/config.json: auto_map names custom code ({CODE_FILE})",
        f"{model}/tokenizer_config.json: auto_map names custom code (tokenization_x.py)"]
    with pytest.raises(ModelError) as err:
        check_remote_code(model, trust_remote_code=False)
    assert str(err.value) == (f"{model}/config.json: auto_map names custom code ({CODE_FILE}); "
                              f"{model}/tokenizer_config.json: auto_map names custom code (tokenization_x.py): "
                              "pass --trust-remote-code to run it")
    check_remote_code(model, trust_remote_code=True)  # lets it through
    assert not marker.exists()


def test_a_py_file_named_outside_auto_map_counts_and_a_plain_model_passes(tiny_model_dir, tmp_path):
    check_remote_code(tiny_model_dir, trust_remote_code=False)
    assert remote_code_problems(tiny_model_dir) == []
    model = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "custom_pipelines": {"x": {"impl": "pipe_x.py"}}}))
    assert remote_code_problems(model) == [f"{model}/config.json: names custom code (pipe_x.py)"]


# ------------------------------------------------------------------------------- each command refuses
def test_eval_refuses_before_anything_starts(custom_model, problems, tmp_path):
    model, marker = custom_model
    out = tmp_path / "eval_out"
    result = invoke("eval", "--model", model, "--backend", "hf", "--benchmarks", problems, "-o", out, "--n", "1")
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == f"Error: {refusal(model)}"
    assert not out.exists() and not marker.exists()


def test_train_refuses_before_ray_and_the_run_directory(custom_model, problems, tmp_path, no_ray):
    model, marker = custom_model
    run = tmp_path / "run"
    result = invoke("train", "--model", model, "--data", problems, "--output", run, "--device", "cpu",
                    "--preset", "cpu-tiny", "--max-steps", "1")
    assert result.exit_code == 2  # a usage error, as every failed check of train's preflight
    assert result.output.strip().splitlines()[-1] == f"Error: {refusal(model)}"
    assert not run.exists() and not marker.exists()


def test_warmup_refuses_before_anything_starts(custom_model, tmp_path):
    model, marker = custom_model
    out = tmp_path / "warm"
    result = invoke("warmup", model, out, "--device", "cpu")
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == f"Error: {refusal(model)}"
    assert not out.exists() and not (tmp_path / "warm_warmup_work").exists() and not marker.exists()


def test_export_refuses_before_anything_starts(custom_model, tmp_path):
    model, marker = custom_model
    out = tmp_path / "exported"
    result = invoke("export-hf", model, out)
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == f"Error: {refusal(model)}"
    assert not out.exists() and not marker.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".exported")] == []


def test_study_refuses_before_the_study_folder(custom_model, problems, tmp_path):
    model, marker = custom_model
    study = tmp_path / "study"
    result = invoke("study", "-o", study, "--model", model, "--data", problems, "--eval", problems,
                    "--algos", "grpo", "--seeds", "0", "--device", "cpu")
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == f"Error: {refusal(model)}"
    assert not study.exists() and not marker.exists()


def test_study_passes_the_flag_to_every_train_and_eval(custom_model, problems, tmp_path, monkeypatch):
    from pipelines.studies import study as study_module

    model, _ = custom_model
    seen = {}

    class Stop(Exception):
        pass

    def execute(self, progress=True):
        seen["train"] = study_module.train_argv(self.plan, "grpo", 0, self.run_dir("grpo-s0"))
        seen["eval"] = study_module.eval_argv(self.plan, str(model), self.dir / "eval" / "base")
        raise click.ClickException("stopped by the test")

    monkeypatch.setattr(study_module.Study, "execute", execute)
    result = invoke("study", "-o", tmp_path / "study", "--model", model, "--data", problems, "--eval", problems,
                    "--algos", "grpo", "--seeds", "0", "--device", "cpu", "--trust-remote-code")
    assert "stopped by the test" in result.output, result.output
    assert "--trust-remote-code" in seen["train"] and "--trust-remote-code" in seen["eval"]


# ------------------------------------------------------------------------------- --trust-remote-code
def test_eval_with_the_flag_runs_the_models_code(custom_model, problems, tmp_path):
    """End to end: the flag reaches transformers, which imports the model's file."""
    model, marker = custom_model
    out = tmp_path / "eval_out"
    result = invoke("eval", "--model", model, "--backend", "hf", "--benchmarks", problems, "-o", out, "--n", "1",
                    "--limit", "1", "--temperature", "0", "--max-new-tokens", "2", "--trust-remote-code")
    assert result.exit_code == 0, result.output
    assert marker.read_text() == "imported\n"
    assert (out / "summary.json").is_file()


def _stop_before_training(monkeypatch):
    """`ngrpo train` as far as the run's manifest, in this process; no Ray, no OpenRLHF run."""
    from ngrpo_cli import train_cmd
    from pipelines.launch import training

    monkeypatch.setattr(training, "start_ray_early", lambda *a, **k: None)

    def execute(run_path, manifest, resume, verbose):
        raise click.ClickException("stopped by the test before training")

    monkeypatch.setattr(train_cmd, "_execute", execute)


def test_train_records_the_decision_in_the_manifest(custom_model, tiny_model_dir, problems, tmp_path, monkeypatch):
    _stop_before_training(monkeypatch)
    model, marker = custom_model
    common = ["--data", problems, "--device", "cpu", "--preset", "cpu-tiny", "--max-steps", "1"]
    for spec, flag, run in ((tiny_model_dir, [], tmp_path / "plain"),
                            (model, ["--trust-remote-code"], tmp_path / "trusted")):
        result = invoke("train", "--model", spec, "--output", run, *common, *flag)
        assert "stopped by the test before training" in result.output, result.output
        manifest = json.loads((run / "ngrpo_run.json").read_text())
        trusted = bool(flag)
        assert manifest["trust_remote_code"] is trusted
        assert manifest["patch_config"]["trust_remote_code"] is trusted
        assert PatchConfig(**manifest["patch_config"]).trust_remote_code is trusted
    # the preflight loads the tokenizer with the flag: the model's own code ran
    assert marker.exists()


# ------------------------------------------------------------------------------- OpenRLHF's hard-coded True
def test_the_patched_names_exist_in_this_openrlhf():
    from openrlhf_patch.cpu import cpu_mode

    cpu_mode.ensure_flash_attn_importable()  # OpenRLHF imports flash_attn at module level
    names = [s for s in upstream.SYMBOLS if s.module in remote_code.patches(False)]
    assert len(names) >= 6
    assert upstream.missing(names) == []


def _module(name, **attrs):
    module = types.ModuleType(name)
    vars(module).update(attrs)
    return module


def test_the_patch_decides_trust_remote_code_for_openrlhf():
    calls = []

    class Auto:
        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            calls.append(kwargs["trust_remote_code"])

    class ActorClass:
        def options(self, **kwargs):
            return self

        def remote(self, **kwargs):
            calls.append(kwargs["trust_remote_code"])

    before = len(touchpoints.installed())
    for trust in (False, True):
        # stand-ins for the four OpenRLHF modules, under their names (touchpoints.patch checks the owner)
        utils = _module("openrlhf.utils.utils", AutoTokenizer=Auto, is_vlm_model=None)
        actor = _module("openrlhf.models.actor", AutoModelForCausalLM=Auto, AutoModelForImageTextToText=Auto)
        model = _module("openrlhf.models.model", AutoConfig=Auto)
        engine = _module("openrlhf.trainer.ray.vllm_engine", RolloutRayActor=ActorClass())
        patches = remote_code.patches(trust)
        for name, module in (("openrlhf.utils.utils", utils), ("openrlhf.models.actor", actor),
                             ("openrlhf.models.model", model), ("openrlhf.trainer.ray.vllm_engine", engine)):
            patches[name](module)
        calls.clear()
        # what upstream writes: trust_remote_code=True everywhere
        utils.AutoTokenizer.from_pretrained("m", trust_remote_code=True, use_fast=True)
        actor.AutoModelForCausalLM.from_pretrained("m", trust_remote_code=True)
        actor.AutoModelForImageTextToText.from_pretrained("m", trust_remote_code=True)
        model.AutoConfig.from_pretrained("m", trust_remote_code=True)
        engine.RolloutRayActor.options(num_cpus=1).remote(model="m", trust_remote_code=True)
        assert calls == [trust] * 5
        assert utils.is_vlm_model._ngrpo_trust is trust
        patches["openrlhf.utils.utils"](utils)  # a second application wraps the upstream name, not itself
        assert utils.AutoTokenizer._ngrpo_upstream is Auto
    touchpoints.undo_since(before)  # the stand-ins' records, not left for later tests


def test_openrlhfs_own_is_vlm_model_no_longer_runs_the_code(custom_model):
    """The real OpenRLHF function: upstream (trust_remote_code=True) imports the model's file; with
    the patch's decision False it does not."""
    from openrlhf_patch.cpu import cpu_mode

    cpu_mode.ensure_flash_attn_importable()
    import openrlhf.utils.utils as utils

    model, marker = custom_model
    upstream_is_vlm = getattr(utils.is_vlm_model, "_ngrpo_upstream", None) or utils.is_vlm_model
    before = len(touchpoints.installed())
    remote_code.patches(False)["openrlhf.utils.utils"](utils)
    try:
        assert utils.is_vlm_model(str(model)) is False
        assert not marker.exists()
    finally:
        touchpoints.undo_since(before)  # the real module as it was, and no record left behind
    if upstream_is_vlm.__module__ == "openrlhf.utils.utils":  # not replaced earlier in this process
        upstream_is_vlm(str(model))
        assert marker.exists()  # what OpenRLHF 0.11.2 does on its own


def test_the_kv_cache_estimate_does_not_trust_by_default():
    from openrlhf_patch.cpu import cpu_mode

    assert inspect.signature(cpu_mode.kv_cache_bytes).parameters["trust_remote_code"].default is False
    assert PatchConfig().trust_remote_code is False
    assert PatchConfig.from_env(PatchConfig(trust_remote_code=True).to_env()).trust_remote_code is True


# ------------------------------------------------------------------------------- one real run
@pytest.mark.pipeline
def test_a_trusted_run_runs_the_code_in_every_process(custom_model, problems, tmp_path):
    """One real step on CPU with --trust-remote-code: the model's file is imported (the flag works
    end to end) and the run's processes report trust_remote_code=True."""
    import os
    import subprocess
    import sys

    model, marker = custom_model
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "ngrpo_cli.main", "train", "--model", str(model), "--data",
                           str(problems), "--output", str(run), "--device", "cpu", "--preset", "cpu-tiny",
                           "--max-steps", "1", "--trust-remote-code"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=1200)
    log = proc.stdout + proc.stderr + "".join(p.read_text() for p in (run / "logs").glob("launch-*.log"))
    assert proc.returncode == 0, log[-6000:]
    assert marker.read_text() == "imported\n"
    manifest = json.loads((run / "ngrpo_run.json").read_text())
    assert manifest["trust_remote_code"] is True and manifest["status"] == "finished"
    assert "trust_remote_code=True" in log
    assert "trust_remote_code=False" not in log
