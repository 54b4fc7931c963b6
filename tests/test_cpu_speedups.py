"""`--cpu-speedups on|off` (openrlhf_patch/cpu/speedups.py): one switch for every optional CPU part,
and a part on an unchecked library version turns itself off in one line."""
import pytest

from openrlhf_patch import touchpoints
from openrlhf_patch.cpu import cpu_layout, cpu_mode, speedups
from pipelines.launch import training

# cpu-speedup touchpoints the switch does not cover, and why: they serve every device or
# `ngrpo eval`, not a CPU training run's layout.
NOT_SWITCHED = {
    "pipelines/launch/training.py:local_node_kwargs": "no prestarted Ray workers: every device's private node",
    "pipelines/evaluate/evaluation.py:VLLMBackend.__init__": "ngrpo eval's engine",
    "pipelines/evaluate/evaluation.py:_vllm_temp_folder": "ngrpo eval's engine",
    "openrlhf_patch/cpu/cpu_mode.py:bound_onednn_caches": "ngrpo eval's engine",
    "pipelines/datasets/grading.py:_init_worker": "the grader pool, every device",
    "ngrpo_cli/main.py:main": "the CLI's exit, every command",
}


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    # set, then removed: monkeypatch then restores the variable's absence after the test, also when
    # the CLI under test set it itself (--cpu-speedups writes os.environ for the run's processes)
    monkeypatch.setenv(speedups.ENV, "on")
    monkeypatch.delenv(speedups.ENV)
    monkeypatch.delenv(cpu_layout.LAYOUT_ENV, raising=False)
    speedups._decided.clear()
    yield
    speedups._decided.clear()


def test_every_cpu_speedup_touchpoint_is_in_exactly_one_part_or_named_outside_the_switch():
    unplaced, doubled = [], []
    for entry in touchpoints.TOUCHPOINTS:
        if entry.kind != "cpu-speedup":
            continue
        parts = [p for p, (_, sites) in speedups.PARTS.items() if entry.site.startswith(sites)]
        if len(parts) > 1:
            doubled.append((entry.site, parts))
        if not parts and entry.site not in NOT_SWITCHED:
            unplaced.append(f"{entry.site} {entry.target}")
    assert (unplaced, doubled) == ([], [])
    # and every part names at least one entry: a renamed site cannot leave a part empty
    assert {p: len(speedups.entries(p)) > 0 for p in speedups.PARTS} == {p: True for p in speedups.PARTS}


def test_the_switch_reads_the_environment(monkeypatch):
    assert speedups.enabled()
    monkeypatch.setenv(speedups.ENV, "off")
    assert not speedups.enabled()
    assert [p for p in speedups.PARTS if speedups.on(p)] == []
    monkeypatch.setenv(speedups.ENV, "fast")
    with pytest.raises(ValueError, match="NGRPO_CPU_SPEEDUPS='fast': use one of on, off"):
        speedups.enabled()


def test_off_keeps_only_what_cpu_needs(monkeypatch):
    for key in cpu_mode.CPU_ENV:
        monkeypatch.delenv(key, raising=False)
    on_env = cpu_mode.cpu_env()
    assert set(cpu_mode.CPU_ENV) <= set(on_env)
    assert cpu_layout.lean_layout()
    argv = ["--actor.num_nodes", "1", "--actor.num_gpus_per_node", "1", "--vllm.num_engines", "1",
            "--vllm.tensor_parallel_size", "1", "--algo.kl.init_coef", "0", "--algo.advantage.estimator", "group_norm"]
    assert training.early_node_kwargs(argv, "cpu") is not None

    monkeypatch.setenv(speedups.ENV, "off")
    off_env = cpu_mode.cpu_env()
    assert {k: off_env[k] for k in cpu_mode.CPU_ENV if k in off_env} == {"VLLM_TARGET_DEVICE": "cpu",
                                                                          "DS_ACCELERATOR": "cpu"}
    assert not cpu_layout.lean_layout()  # OpenRLHF's own layout: trainer and policy actors, vLLM's processes
    assert training.early_node_kwargs(argv, "cpu") is None  # Ray's own node, started by the launch


def test_off_leaves_the_weight_sync_and_tokenizer_to_upstream(monkeypatch):
    cpu_mode.ensure_flash_attn_importable()  # OpenRLHF imports flash_attn; CPU mode provides it
    from openrlhf.trainer.ray.ppo_actor import ActorPPOTrainer

    class Trainer(ActorPPOTrainer):  # a subclass: the patch lands on it, not on OpenRLHF's class
        def broadcast_to_vllm(self):
            return "upstream"

    key = ("openrlhf.trainer.ray.ppo_actor.ActorPPOTrainer.broadcast_to_vllm",
           "openrlhf_patch/cpu/cpu_mode.py:patch_weight_sync")
    upstream = Trainer.broadcast_to_vllm
    monkeypatch.setenv(speedups.ENV, "off")
    cpu_mode.patch_weight_sync(Trainer)
    assert Trainer.broadcast_to_vllm is upstream
    monkeypatch.setenv(speedups.ENV, "on")
    speedups._decided.clear()
    cpu_mode.patch_weight_sync(Trainer)
    try:
        assert key in touchpoints.markers(Trainer.broadcast_to_vllm)
        assert Trainer.broadcast_to_vllm.__wrapped__ is upstream
    finally:
        touchpoints.undo(key[0], owner=Trainer, site=key[1])
    assert Trainer.broadcast_to_vllm is upstream


def test_a_part_on_an_unchecked_version_turns_itself_off_in_one_line(monkeypatch, capsys):
    real = touchpoints.installed_version
    monkeypatch.setattr(touchpoints, "installed_version", lambda lib: "9.9.9" if lib == "ray" else real(lib))
    assert not speedups.on("early-ray-node")
    assert speedups.on("tokenizer-once")  # openrlhf only: still on
    assert not speedups.on("early-ray-node")  # decided once per process
    err = capsys.readouterr().err
    assert err == f"[ngrpo] CPU speed-up early-ray-node off: ray 9.9.9 (checked on {touchpoints.CHECKED_ON['ray']})\n"


def test_the_cli_flag_sets_the_switch_for_the_whole_run(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from ngrpo_cli.main import cli

    seen = {}
    monkeypatch.setattr("ngrpo_cli.train_cmd._resume", lambda *a, **k: seen.update(value=speedups.enabled()))
    result = CliRunner().invoke(cli, ["train", "--resume", str(tmp_path), "--cpu-speedups", "off"])
    assert result.exit_code == 0, result.output
    assert seen == {"value": False}
    with pytest.raises(KeyError, match="no CPU speed-up 'fast-io'"):
        speedups.on("fast-io")


@pytest.mark.pipeline
def test_a_run_with_the_switch_off_trains_the_same_model_in_openrlhfs_own_layout(tmp_path, tiny_model_dir):
    """The same 2-step tiny NGRPO run with the speed-ups on and off (reproducible rollouts): the
    step metrics and the final weights are bit-identical, and the off run used OpenRLHF's layout
    (the trainer in its own Ray actor) and Ray's own node. The CI's one training run with the
    switch off."""
    import json

    from test_faults import ngrpo, write_problems

    data = write_problems(tmp_path / "data.jsonl", n=16)
    out = {}
    for switch in ("on", "off"):
        run = tmp_path / switch
        proc = ngrpo("train", "--model", tiny_model_dir, "--data", data, "--output", run, "--algo", "ngrpo",
                     "--device", "cpu", "--preset", "cpu-tiny", "--max-steps", 2, "--seed", 0,
                     "--reproducible-rollouts", "--cpu-speedups", switch)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        log = "".join(p.read_text(errors="replace") for p in sorted((run / "logs").glob("launch-*.log")))
        out[switch] = {"loss": [m["policy_loss"] for m in steps], "length": [m["rollout/response_length_mean"] for m in steps],
                       "weights": (run / "final_model" / "model.safetensors").read_bytes(),
                       "trainer actor": "PPOTrainer pid=" in log,
                       "early node": "started while the command line was checked" in proc.stderr + log}
    on, off = out["on"], out["off"]
    assert len(on["loss"]) == 2 and off["loss"] == on["loss"] and off["length"] == on["length"]
    assert off["weights"] == on["weights"]
    assert (on["trainer actor"], on["early node"]) == (False, True)
    assert (off["trainer actor"], off["early node"]) == (True, False)
