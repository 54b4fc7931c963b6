"""OpenRLHF features under ngrpo's patch, and the logs users look for (issue 31, items 4 and 5).

pipelines/launch/features.py is the table: each OpenRLHF flag that changes how rollouts are made, rewarded,
batched or synced is tested here with a real CPU run of ngrpo's estimator, or refused before Ray
starts with one line (the refusals are checked here: no run directory, no Ray node). Logging: the
TensorBoard events every run writes, and `--wandb PROJECT` through OpenRLHF's own W&B logger,
checked offline (WANDB_MODE=offline) by reading the W&B run with wandb's own reader.
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from openrlhf_patch import config as patch_config
from openrlhf_patch import old_log_probs
from pipelines.launch import features, rundir, training
from pipelines.launch.recipes import build_recipe

REPO = Path(__file__).resolve().parents[1]
CPU = ["--device", "cpu", "--preset", "cpu-tiny"]
FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"  # W&B keys are 40 hex digits; offline, none is checked


from test_faults import invoke, ngrpo, write_problems  # noqa: E402  (the same helpers as the fault tests)


def metrics(run: Path) -> list:
    return [json.loads(line) for line in (run / rundir.METRICS).read_text().splitlines()]


def launch_log(run: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted((run / rundir.LOGS).glob("launch-*.log")))


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


# ------------------------------------------------------------------ the table


def test_every_feature_names_its_test_and_is_documented():
    """Each row's test exists in this module (a parametrized one with its case), and
    docs/FEATURES.md lists each flag with its status."""
    module = sys.modules[__name__]
    doc = (REPO / "docs" / "FEATURES.md").read_text()
    for f in features.FEATURES:
        assert f.status in ("tested", "refused", "gpu-only"), f
        name, _, case = f.test.partition("[")
        assert callable(getattr(module, name, None)), f"{f.flag}: no test {name}"
        if case:
            assert case.rstrip("]") in REFUSED, f"{f.flag}: no case {case}"
        row = next((line for line in doc.splitlines() if line.startswith(f"| `{f.flag}")), None)
        assert row is not None and f"| {f.status} |" in row, f"docs/FEATURES.md has no row for {f.flag} ({f.status})"


def test_flags_are_read_as_openrlhf_parses_them():
    """The last occurrence wins, `--flag=value` counts, and an abbreviation is the flag it abbreviates
    (argparse accepts unique prefixes)."""
    assert features.flag_values(["--ds.lora.rank", "8", "--ds.lora.rank=0"]) == {"--ds.lora.rank": ["0"]}
    features.check(["--ds.lora.rank", "8", "--ds.lora.rank", "0"], device="cpu")  # LoRA off in the end
    with pytest.raises(features.FeatureRefused, match="^--ds.lora.rank 4: "):
        features.check(["--ds.lora.r", "4"], device="cpu")
    with pytest.raises(features.FeatureRefused, match="^--ds.ring_attn_size 2: "):
        features.check(["--ds.ring_attn_size=2"], device="cuda")
    features.check(["--ds.ring_attn_size", "1", "--data.max_images_per_prompt", "0"], device="cpu")


def test_packing_on_a_gpu_needs_a_usable_flash_attn():
    for flag in ("--ds.packing_samples", "--train.dynamic_batch_enable"):
        with pytest.raises(features.FeatureRefused, match=f"^{flag}: needs a flash-attn built for the installed torch"):
            features.check([flag], device="cuda", flash_attn_usable=lambda: False)
        features.check([flag], device="cuda", flash_attn_usable=lambda: True)  # GPU-only, allowed there


# ------------------------------------------------------------------ refused before Ray starts

AGENT = "from openrlhf.utils.agent import AgentExecutorBase\nclass AgentExecutor(AgentExecutorBase):\n    pass\n"

# case -> (ngrpo train arguments, the one line's start)
REFUSED = {
    "lora": (["--", "--ds.lora.rank", "8"], "--ds.lora.rank 8: OpenRLHF 0.11.2 syncs the LoRA-wrapped policy to vLLM"),
    "packing": (["--", "--ds.packing_samples"], "--ds.packing_samples: GPU-only: OpenRLHF packs samples with "
                                                "flash-attention's varlen kernels"),
    "packing_recipe": (["--packing"], "--ds.packing_samples: GPU-only"),
    "dynamic_batch": (["--", "--train.dynamic_batch_enable"],
                      "--train.dynamic_batch_enable: GPU-only: OpenRLHF turns sample packing on with it"),
    "agent": (["--", "--train.agent_func_path", "AGENT"], "--train.agent_func_path: multi-turn agents: an agent's "
                                                          "rewards come from the agent"),
    "ring_attention": (["--", "--ds.ring_attn_size", "2"],
                       "--ds.ring_attn_size 2: ring attention shards each sequence"),
    "image_key": (["--", "--data.image_key", "images"], "--data.image_key: vision-language training: ngrpo writes "
                                                        "text-only prompts"),
    "max_images": (["--", "--data.max_images_per_prompt=2"], "--data.max_images_per_prompt 2: vision-language"),
    "vision_model": ([], "a vision-language model (its config has a vision_config)"),
    "wandb_key": (["--", "--logger.wandb.key", FAKE_KEY], "--logger.wandb.key: the W&B API key would be stored in the "
                                                          "run's manifest"),
    "wandb_project_alone": (["--", "--logger.wandb.project", "p"],
                            "--logger.wandb.project: OpenRLHF's W&B logger is off without a key; turn it on with "
                            "--wandb PROJECT"),
    "wandb_without_key": (["--wandb", "p"], "--wandb: set WANDB_API_KEY to your W&B API key"),
    "async_in_the_lean_layout": (["--", "--train.async_enable"], "--train.async_enable: OpenRLHF's async trainer is a "
                                                                 "Ray actor of its own"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_before_ray(case, tmp_path, tiny_model_dir, monkeypatch):
    """One line naming the flag and why; before Ray's node starts and before the run directory is made."""
    args, expected = REFUSED[case]
    model = tiny_model_dir
    if case == "vision_model":
        model = tmp_path / "vlm"
        shutil.copytree(tiny_model_dir, model)
        config = json.loads((model / "config.json").read_text())
        config["vision_config"] = {"hidden_size": 32}  # what OpenRLHF's is_vlm_model looks for
        (model / "config.json").write_text(json.dumps(config))
        expected = f"{model}: {expected}"
    if case == "agent":
        (tmp_path / "agent.py").write_text(AGENT)
        args = [str(tmp_path / "agent.py") if a == "AGENT" else a for a in args]
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NGRPO_CPU_LAYOUT", "lean") if case == "async_in_the_lean_layout" else \
        monkeypatch.delenv("NGRPO_CPU_LAYOUT", raising=False)

    def no_ray(*a, **k):
        raise AssertionError("Ray's node was started before the refusal")

    monkeypatch.setattr(training, "start_ray_early", no_ray)
    run = tmp_path / "run"
    result = invoke("train", "--model", model, "--data", write_problems(tmp_path / "d.jsonl"), "--output", run, *CPU,
                    *args)
    assert result.exit_code != 0
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"Error: {expected}"), result.output
    assert "Traceback" not in result.output and not run.exists()
    assert FAKE_KEY not in result.output  # a key on the command line is never echoed


def test_wandb_on_resume_comes_from_the_launch(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    result = invoke("train", "--resume", run, "--wandb", "p")
    assert result.exit_code != 0 and "--wandb is the launch's choice" in result.output


# ------------------------------------------------------------------ old log-probs: the decision for each feature


def test_async_and_dynamic_batching_never_reuse_old_log_probs(monkeypatch):
    """With everything else allowing reuse (cpu-tiny: one optimizer step a rollout), async training
    (rollouts one step off-policy) and dynamic batching turn it off, by OpenRLHF's parsed arguments."""
    recipe = build_recipe("ngrpo", "cpu-tiny", {})
    monkeypatch.setitem(patch_config._active, "config",
                        training.build_patch_config(recipe, device="cpu", max_steps=None, reward_file=None))
    groups = SimpleNamespace(critic_model_group=None, initial_model_group=None)
    argv = training.build_openrlhf_argv(recipe, model="Qwen/Qwen2.5-Math-7B", layout=training.Layout.for_device("cpu"))

    def decision(*extra):
        args = training.parse_with_openrlhf(training.materialise_argv(argv + list(extra), "/tmp/ngrpo-parse"))
        return old_log_probs.deferral_blocker(args, groups)

    assert decision() is None
    assert decision("--train.async_enable").startswith("asynchronous training: its rollouts are generated one step")
    assert decision("--train.dynamic_batch_enable").startswith("dynamic batching")


# ------------------------------------------------------------------ async training, with the group filter

# Right for even answers: a group is all-correct (the filter drops it) or all-wrong (ngrpo's virtual
# sample gives it a negative advantage, where GRPO's would be 0): every step trains on something.
EVEN_ANSWERS = textwrap.dedent('''
    import torch

    def reward_func(queries, prompts, labels, **kwargs):
        t = torch.tensor([1.0 if int(label) % 2 == 0 else 0.0 for label in labels])
        return {"rewards": t, "scores": t, "extra_logs": {}}
''')


@pytest.mark.pipeline
def test_async_training_with_ngrpo_and_the_group_filter(tmp_path, tiny_model_dir):
    """--train.async_enable: OpenRLHF's generator actor runs ngrpo's refill loop one rollout ahead of
    the trainer. Checked: 2 steps trained with ngrpo's estimator, the old log-probs computed by a
    separate forward (never reused from an off-policy rollout), the filter dropping all-correct
    groups in the generator actor, the last step checkpointed, and the weights moved."""
    reward = tmp_path / "even.py"
    reward.write_text(EVEN_ANSWERS)
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "NGRPO_CPU_LAYOUT"}
    proc = ngrpo("train", "--model", tiny_model_dir, "--data", write_problems(tmp_path / "d.jsonl"), "--output", run,
                 *CPU, "--reward-file", reward, "--max-steps", "2", "--", "--train.async_enable", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--train.async_enable: CPU mode uses the upstream process layout" in proc.stderr
    manifest = rundir.read_manifest(run)
    assert manifest["status"] == "finished" and manifest["global_step"] == 2
    log = launch_log(run)
    assert "[ngrpo] old log-probs: from a separate policy forward (asynchronous training" in log
    assert "reused from the training forward" not in log
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["ngrpo/old_log_probs_reused"] == 0.0
        assert r["ngrpo/frac_all_correct"] == 0.0  # the filter kept none of them
        assert r["ngrpo/frac_all_wrong"] == 1.0
        assert r["ngrpo/adv_sum_all_wrong"] < 0  # ngrpo's estimator: GRPO gives all-wrong groups 0
        assert r["policy_loss"] != 0.0
    # OpenRLHF's pass rate is samples kept per prompt drawn, x 100: 400 with 4 samples a prompt and
    # nothing dropped. Lower: the filter dropped groups and the refill loop drew more prompts.
    assert min(r["dynamic_filtering_pass_rate"] for r in rows) < 400
    assert (run / rundir.CHECKPOINTS / "_actor" / "global_step2").is_dir()  # the last --max-steps step
    base, final = weights(Path(tiny_model_dir)), weights(run / rundir.FINAL_MODEL)
    assert base.keys() == final.keys()
    assert any(not base[k].equal(final[k]) for k in base)


# ------------------------------------------------------------------ logging: TensorBoard and W&B


def wandb_records(run_file: Path, cwd: Path) -> list:
    """The records of a .wandb transaction log, read by wandb's own reader (`wandb leet inspect`)."""
    wandb_cli = Path(sys.executable).with_name("wandb")
    out = subprocess.run([str(wandb_cli), "leet", "inspect", "--json", str(run_file)], cwd=cwd, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "WANDB_MODE": "offline"})
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def wandb_steps(records: list) -> dict:
    """{train/global_step: the history row} of the rows that carry training metrics."""
    rows = [r["history"]["item"] for r in records if r["type"] == "history"]
    return {int(row["train/global_step"]): row for row in rows if "train/policy_loss" in row}


@pytest.mark.pipeline
def test_wandb_offline_gets_ngrpos_metrics_and_a_resume_continues_it(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("WANDB_")},
           "WANDB_MODE": "offline", "WANDB_API_KEY": FAKE_KEY}
    proc = ngrpo("train", "--model", tiny_model_dir, "--data", write_problems(tmp_path / "d.jsonl"), "--output", run,
                 *CPU, "--max-steps", "2", "--wandb", "ngrpo-test", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = rundir.read_manifest(run)
    wandb_run = manifest["launch"]["wandb"]
    assert wandb_run["project"] == "ngrpo-test" and wandb_run["run_name"] == "run"
    assert list(run.glob("tensorboard/*/events.out.tfevents.*"))  # TensorBoard as always
    (first,) = run.glob("wandb/offline-run-*/run-*.wandb")
    records = wandb_records(first, tmp_path)
    (meta,) = [r["run"] for r in records if r["type"] == "run"]
    assert (meta["project"], meta["display_name"], meta["run_id"]) == ("ngrpo-test", "run", wandb_run["run_id"])
    steps = wandb_steps(records)
    assert sorted(steps) == [1, 2]
    for row in metrics(run):  # ngrpo's diagnostics, the same numbers as metrics.jsonl's
        logged = steps[row["step"]]
        for key in ("ngrpo/accuracy", "ngrpo/frac_all_wrong", "ngrpo/adv_sum_all_wrong", "ngrpo/old_log_probs_reused",
                    "clip_frac_low", "policy_loss"):
            assert logged[f"train/{key}"] == pytest.approx(row[key]), key
    # the key: in no file of the run (manifest, command line, W&B config) and in no output
    for path in run.rglob("*"):
        if path.is_file():
            assert FAKE_KEY.encode() not in path.read_bytes(), path
    assert FAKE_KEY not in proc.stdout + proc.stderr

    proc = ngrpo("train", "--resume", run, "--max-steps", "3", env=env)  # no --wandb: the launch's
    assert proc.returncode == 0, proc.stderr[-3000:]
    (second,) = set(run.glob("wandb/offline-run-*/run-*.wandb")) - {first}
    records = wandb_records(second, tmp_path)
    (meta,) = [r["run"] for r in records if r["type"] == "run"]
    assert (meta["project"], meta["run_id"]) == ("ngrpo-test", wandb_run["run_id"])  # the same W&B run
    steps, last = wandb_steps(records), metrics(run)[-1]
    assert sorted(steps) == [3] and last["step"] == 3
    assert steps[3]["train/ngrpo/frac_all_wrong"] == pytest.approx(last["ngrpo/frac_all_wrong"])
