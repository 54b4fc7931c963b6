"""The GPU run's shape on CPU: `--preset paper-cpu` is `--preset paper` with only sizes and the device changed.

Most of the suite trains with `cpu-tiny` (one optimizer step per rollout, ZeRO-2, no gradient
checkpointing, CPU mode's speed-ups on). A GPU run uses `--preset paper`: 4 optimizer steps per
rollout, ZeRO-3, gradient checkpointing, grpo's reference model, validation every 7 steps. Here:

  * the OpenRLHF command lines of `--preset paper --device cuda` and `--preset paper-cpu --device
    cpu`, built as `ngrpo train` builds them, differ in exactly the flags of ALLOWED_DIFFERENCES
    (sizes, device, layout), so any other structural difference fails;
  * two real 3-step CPU runs (ngrpo, grpo) with `--preset paper-cpu`, in OpenRLHF's own process
    layout and with every CPU speed-up that has a switch turned off (SPEEDUPS_OFF), show from the
    run's files that the structure ran: 4 optimizer steps a step, validation at the configured
    step, ZeRO-3 and gradient checkpointing in DeepSpeed and OpenRLHF, the reference model's KL,
    weights that moved.
"""
import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ngrpo_cli import train_cmd
from pipelines.launch import gpu_run, training
from pipelines.launch.recipes import ALGOS, build_recipe

REPO_ROOT = Path(__file__).resolve().parents[1]
ALGOS_CHECKED = ("ngrpo", "grpo")
GPUS_PER_NODE = 8  # the paper's node (docs/RUNNING.md "GPU runs"); `ngrpo train` takes all visible GPUs
OPTIMIZER_STEPS_PER_ROLLOUT = 4  # the paper: 1024 prompts per rollout, mini-batches of 256
CPU_EVAL_EVERY = 2  # paper-cpu validates every 2 of its 3 steps (the paper: every 7)

# The only flags in which the two command lines may differ, and why. Anything else (a loss, a
# clip range, an estimator, a filter, the KL, ZeRO, checkpointing, epochs, micro-batches, ...)
# must be the same in the CPU run as in the GPU run.
ALLOWED_DIFFERENCES = {
    # sizes (pipelines/launch/recipes.py PAPER_CPU)
    "--rollout.batch_size": "size: prompts per rollout, 1024 -> 8",
    "--rollout.n_samples_per_prompt": "size: responses per prompt (G), 8 -> 4",
    "--train.batch_size": "size: samples per optimizer step, 256 x 8 -> 2 x 4 (still a quarter of the rollout)",
    "--rollout.max_new_tokens": "size: response budget, 3072 -> 96 tokens",
    "--data.max_len": "size: prompt + response budget, 1024 + 3072 -> 128 + 96 tokens",
    "--actor.adam.lr": "size: a learning rate for a tiny random model and 3 steps, 1e-6 -> 1e-4 (as cpu-tiny)",
    "--eval.steps": "size: validate every 7 steps (the authors) -> every 2 of a 3-step run",
    # `ngrpo train`'s checkpoint defaults per device
    "--ckpt.save_steps": "device default of ngrpo train: a checkpoint every 20 steps on GPU, 10 on CPU",
    "--ckpt.max_num": "device default of ngrpo train: 3 checkpoints kept on GPU, 2 on CPU",
    # layout: 8 GPUs with every model colocated vs one logical GPU per model on a CPU
    "--actor.num_gpus_per_node": "layout: the policy on 8 GPUs -> 1 logical GPU",
    "--ref.num_gpus_per_node": "layout: grpo's reference model on 8 GPUs -> 1 logical GPU",
    "--vllm.num_engines": "layout: one vLLM engine per GPU -> 1",
    "--train.colocate_all": "layout: GPU models share the GPUs (hybrid engine); CPU models each have a logical GPU",
    "--vllm.enable_sleep": "layout: colocated vLLM frees GPU memory while the policy trains",
    "--ds.enable_sleep": "layout: colocated DeepSpeed models offload while vLLM generates",
    "--vllm.gpu_memory_utilization": "layout: vLLM's share of a colocated GPU (CPU: KV cache sized to the rollout)",
    # device
    "--ds.attn_implementation": "device: sdpa on GPU (flash_attention_2 with flash-attn), eager on CPU",
    "--vllm.sync_backend": "device: weights reach vLLM over NCCL on GPU, over gloo on CPU (cpu_mode.py)",
}
# Recipe fields paper-cpu may change from paper (dapo's overlong buffer is a third of the budget).
SIZE_FIELDS = {"prompts_per_step", "mini_batch_prompts", "samples_per_prompt", "max_prompt_len", "max_response_len",
               "lr", "overlong_buffer"}


def cli_argv(algo, preset, device, model="MODEL", eval_every=None):
    """The OpenRLHF flags `ngrpo train --algo ALGO --preset PRESET --device DEVICE` writes, built
    as ngrpo_cli/train_cmd.py's _preflight builds them: the device's checkpoint defaults, and the
    paper's validation every 7 steps on GPU (other presets validate only when given --eval-data,
    with --eval-every EVAL_EVERY)."""
    if preset == "paper" and device == "cuda":
        eval_every = eval_every or train_cmd.PAPER_VALIDATION_EVERY
    layout = training.Layout.for_device(device, gpus_per_node=GPUS_PER_NODE if device == "cuda" else None)
    return training.build_openrlhf_argv(build_recipe(algo, preset), model=model, layout=layout,
                                        save_steps=10 if device == "cpu" else 20,
                                        keep_checkpoints=2 if device == "cpu" else 3, eval_every=eval_every)


def parse_flags(argv):
    """{flag: value}: a tuple of the values that follow it, or True for a switch. A flag given
    twice is an error here (argparse would silently take the last)."""
    out, flag = {}, None
    for arg in argv:
        if arg.startswith("--"):
            assert arg not in out, f"{arg} given twice"
            flag, out[arg] = arg, ()
        else:
            assert flag is not None, f"value {arg!r} before any flag"
            out[flag] += (arg,)
    return {k: v if v else True for k, v in out.items()}


def flag_diff(a: dict, b: dict) -> dict:
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


@pytest.fixture
def no_flash_attn(monkeypatch):
    """The default GPU install: no flash-attn usable, so sdpa and padded micro-batches (with it,
    a GPU run adds packing and dynamic batching: pipelines/launch/gpu_run.py)."""
    monkeypatch.setattr(gpu_run, "flash_attn_usable", lambda: False)


def _shapes(algo):
    gpu = parse_flags(cli_argv(algo, "paper", "cuda"))
    cpu = parse_flags(cli_argv(algo, "paper-cpu", "cpu", eval_every=CPU_EVAL_EVERY))
    return gpu, cpu


@pytest.mark.parametrize("algo", ALGOS_CHECKED)
def test_paper_cpu_differs_from_the_gpu_run_only_in_allowed_flags(algo, no_flash_attn):
    gpu, cpu = _shapes(algo)
    diff = flag_diff(gpu, cpu)
    expected = {f for f in ALLOWED_DIFFERENCES if f in gpu or f in cpu}
    unexpected = {f: diff[f] for f in set(diff) - expected}
    assert not unexpected, f"{algo}: flags that differ between the GPU run and paper-cpu (GPU, CPU): {unexpected}"
    assert set(diff) == expected, f"{algo}: allowed differences that are not different: {expected - set(diff)}"


def test_every_allowed_difference_occurs(no_flash_attn):
    """No stale rows: each flag of the table differs for at least one of the checked algorithms."""
    seen = set()
    for algo in ALGOS_CHECKED:
        seen |= set(flag_diff(*_shapes(algo)))
    assert seen == set(ALLOWED_DIFFERENCES), set(ALLOWED_DIFFERENCES) - seen


@pytest.mark.parametrize("algo", ALGOS_CHECKED)
@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_both_shapes_have_the_paper_structure(algo, device, no_flash_attn):
    flags = dict(zip(("cuda", "cpu"), _shapes(algo)))[device]
    value = lambda f: flags[f][0]
    samples = int(value("--rollout.batch_size")) * int(value("--rollout.n_samples_per_prompt"))
    assert int(value("--train.batch_size")) * OPTIMIZER_STEPS_PER_ROLLOUT == samples
    assert value("--train.max_epochs") == "1"
    ranks = int(value("--actor.num_nodes")) * int(value("--actor.num_gpus_per_node"))
    per_rank = int(value("--train.batch_size")) // ranks
    assert per_rank % int(value("--train.micro_batch_size")) == 0
    assert per_rank // int(value("--train.micro_batch_size")) > 1, "no gradient accumulation"
    assert value("--ds.zero_stage") == "3"
    assert flags["--actor.gradient_checkpointing_enable"] is True
    assert value("--eval.steps") == str(7 if device == "cuda" else CPU_EVAL_EVERY)
    assert value("--eval.temperature") == "0.0" and value("--eval.n_samples_per_prompt") == "1"
    assert "--eval.dataset" in flags
    assert "--ds.packing_samples" not in flags and "--train.dynamic_batch_enable" not in flags
    if algo == "grpo":
        assert flags["--algo.kl.use_loss"] is True
        assert (value("--algo.kl.init_coef"), value("--algo.kl.estimator")) == ("0.001", "k3")
        assert "--ref.num_nodes" in flags and "--ref.num_gpus_per_node" in flags
        assert "--algo.dynamic_filtering_enable" not in flags
    else:
        assert value("--algo.kl.init_coef") == "0"
        assert not [f for f in flags if f.startswith("--ref.")] and "--algo.kl.use_loss" not in flags
        assert flags["--actor.eps_clip_low_high"] == ("0.16", "0.24")
        assert flags["--algo.dynamic_filtering_enable"] is True


@pytest.mark.parametrize("algo", ALGOS)
def test_paper_cpu_recipe_changes_only_sizes(algo):
    paper, small = dataclasses.asdict(build_recipe(algo, "paper")), dataclasses.asdict(build_recipe(algo, "paper-cpu"))
    changed = {k for k in paper if paper[k] != small[k]}
    assert changed <= SIZE_FIELDS, changed - SIZE_FIELDS
    assert small["prompts_per_step"] // small["mini_batch_prompts"] == OPTIMIZER_STEPS_PER_ROLLOUT
    # what the workers' patch is told: the same but the device
    configs = [dataclasses.asdict(training.build_patch_config(build_recipe(algo, p), device=d, max_steps=None,
                                                              reward_file="R"))
               for p, d in (("paper", "cuda"), ("paper-cpu", "cpu"))]
    assert flag_diff(*configs) == {"device": ("cuda", "cpu")}


def _argv_printed(output):
    line = next(line for line in output.splitlines() if "openrlhf.cli.train_ppo_ray" in line)
    argv = shlex.split(line)
    return argv[argv.index("openrlhf.cli.train_ppo_ray") + 1:]


@pytest.mark.slow
def test_cli_dry_run_builds_the_same_command_lines(tmp_path, tiny_model_dir, data_layout_dir, no_flash_attn):
    """cli_argv is what `ngrpo train --dry-run` prints for both shapes, and OpenRLHF's own parser
    accepts both (the dry run runs it)."""
    from click.testing import CliRunner

    from ngrpo_cli.main import cli

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"id": str(i), "problem": f"{i}+1?", "answer": str(i + 1)}) + "\n"
                            for i in range(1024)))
    run = tmp_path / "run"
    for algo in ALGOS_CHECKED:
        for preset, device, extra in (("paper", "cuda", ["--gpus-per-node", str(GPUS_PER_NODE), "--data-dir",
                                                        str(data_layout_dir)]),
                                      ("paper-cpu", "cpu", ["--eval-data", str(data), "--eval-every",
                                                            str(CPU_EVAL_EVERY)])):
            result = CliRunner().invoke(cli, ["train", "--model", str(tiny_model_dir), "--algo", algo, "--data",
                                              str(data), "--output", str(run), "--preset", preset, "--device", device,
                                              *extra, "--dry-run"], catch_exceptions=False)
            assert result.exit_code == 0, result.output
            assert "OpenRLHF's parser accepted the command line." in result.output
            printed = parse_flags(_argv_printed(result.output))
            built = cli_argv(algo, preset, device, model=printed["--actor.model_name_or_path"][0],
                             eval_every=CPU_EVAL_EVERY if device == "cpu" else None)
            assert flag_diff(printed, parse_flags(training.materialise_argv(built, run))) == {}, (algo, preset)


# ---------------------------------------------------------------------------------------------
# Two real 3-step CPU runs with --preset paper-cpu
# ---------------------------------------------------------------------------------------------
MAX_STEPS = 3
# CPU mode's optional speed-ups that can be switched off today, switched off (openrlhf_patch/
# cpu_mode.py and cpu_layout.py; a value set here wins over CPU mode's default):
SPEEDUPS_OFF = {
    # OpenRLHF's process layout: a PPOTrainer actor, a policy actor, a reference actor (grpo), and
    # vLLM's engine core in a process it spawns; not the trainer and the policy in the driver, the
    # engine core in a thread, the driver's imports frozen out of garbage collection.
    "NGRPO_CPU_LAYOUT": "upstream",
    # OpenRLHF's @torch.compile'd compute_entropy compiles (inductor), as on GPU.
    "TORCHDYNAMO_DISABLE": "0",
    # vLLM's defaults: its own worker process for the model, one core reserved for its scheduler.
    "VLLM_ENABLE_V1_MULTIPROCESSING": "1",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "1",
    # Ray's default for an actor: one OpenMP thread (CPU mode gives each process every core).
    "OMP_NUM_THREADS": "1",
}
COIN_REWARD = '''
import torch

def reward_func(queries, prompts, labels, **kwargs):
    r = [1.0 if len(q[len(p):]) % 2 == 0 else 0.0 for q, p in zip(queries, prompts)]
    t = torch.tensor(r)
    return {"rewards": t, "scores": t, "extra_logs": {}}
'''
EVAL_SET = "paper_cpu_eval"


def _problems(path: Path, n: int, offset: int = 0) -> Path:
    path.write_text("".join(json.dumps({"id": str(i), "problem": f"What is {i} + {i % 7}?", "answer": str(i + i % 7)})
                            + "\n" for i in range(offset, offset + n)))
    return path


@pytest.fixture(scope="module")
def paper_cpu_runs(tmp_path_factory, tiny_model_dir):
    """{algo: {"run", "log", "seconds"}}: `ngrpo train --preset paper-cpu` for 3 steps, each in
    a fresh process, with SPEEDUPS_OFF, the coin reward (fixtures_runs.COIN_REWARD: a random
    model's responses give mixed, all-wrong and all-correct groups), validation every 2 steps on
    8 problems, and a checkpoint at every step (DeepSpeed's optimizer-step count per step)."""
    root = tmp_path_factory.mktemp("paper_cpu")
    data = _problems(root / "train.jsonl", 64)
    eval_data = _problems(root / f"{EVAL_SET}.jsonl", 8, offset=1000)
    reward = root / "coin_reward.py"
    reward.write_text(COIN_REWARD)
    out = {"model": tiny_model_dir}
    for algo in ALGOS_CHECKED:
        run, log = root / algo, root / f"{algo}.log"
        cmd = [sys.executable, "-m", "ngrpo_cli.main", "train", "--model", str(tiny_model_dir), "--algo", algo,
               "--data", str(data), "--output", str(run), "--device", "cpu", "--preset", "paper-cpu",
               "--reward-file", str(reward), "--max-steps", str(MAX_STEPS), "--eval-data", str(eval_data),
               "--eval-every", str(CPU_EVAL_EVERY), "--save-steps", "1", "--keep-checkpoints", str(MAX_STEPS),
               "--long-prompts", "drop"]  # as --preset paper (none is too long here)
        # the run's own inductor cache: shows that OpenRLHF's torch.compile ran (TORCHDYNAMO_DISABLE=0)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **SPEEDUPS_OFF, "TORCHINDUCTOR_CACHE_DIR": str(root / f"inductor_{algo}")}
        env.pop("RAY_ADDRESS", None)
        start = time.monotonic()
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=2400)
        seconds = time.monotonic() - start
        log.write_text(proc.stdout + proc.stderr)
        launch = run / "logs" / "launch-1.log"
        assert proc.returncode == 0, (f"ngrpo train --preset paper-cpu --algo {algo} failed after {seconds:.0f} s:\n"
                                      f"{(proc.stdout + proc.stderr)[-4000:]}\n--- launch log tail:\n"
                                      f"{launch.read_text()[-8000:] if launch.exists() else '(none)'}")
        out[algo] = {"run": run, "log": log, "seconds": seconds, "inductor": root / f"inductor_{algo}"}
        print(f"paper-cpu {algo} run: {seconds:.1f} s", file=sys.stderr)
    return out


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _launch_log(entry):
    return (entry["run"] / "logs" / "launch-1.log").read_text()


def _model_states(run, step):
    from pipelines.export import safe_torch_load

    files = sorted((run / "checkpoints" / "_actor" / f"global_step{step}").glob("*model_states.pt"))
    assert files, f"no DeepSpeed model states in {run}/checkpoints/_actor/global_step{step}"
    return safe_torch_load(files[0], mmap=True, allow_unsafe_pickle=True)


@pytest.mark.parametrize("algo", ALGOS_CHECKED)
@pytest.mark.pipeline
@pytest.mark.slow
def test_paper_cpu_run_trains_three_steps_of_four_optimizer_steps(paper_cpu_runs, algo):
    run = paper_cpu_runs[algo]["run"]
    manifest = json.loads((run / "ngrpo_run.json").read_text())
    assert (manifest["status"], manifest["global_step"], manifest["preset"]) == ("finished", MAX_STEPS, "paper-cpu")
    metrics = _jsonl(run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    # DeepSpeed's own count of optimizer steps, saved with each step's checkpoint: 4 per step, each
    # of 2 micro-batches of 4 samples (8 samples = 2 prompts x 4), as the paper's 2048 = 256 x 8.
    for step in (1, 2, 3):
        states = _model_states(run, step)
        assert states["global_steps"] == OPTIMIZER_STEPS_PER_ROLLOUT * step, (step, states["global_steps"])
        assert states["global_samples"] == OPTIMIZER_STEPS_PER_ROLLOUT * step * 8
        ds = states["ds_config"]  # DeepSpeed derives 2 accumulation steps from these
        assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], states["dp_world_size"]) == (8, 4, 1)
        assert states["skipped_steps"] == 0


@pytest.mark.parametrize("algo", ALGOS_CHECKED)
@pytest.mark.pipeline
@pytest.mark.slow
def test_paper_cpu_run_computes_old_log_probs_with_a_forward(paper_cpu_runs, algo):
    """With 4 optimizer steps per rollout the old log-probs cannot be the training forward's own:
    the configuration rules the reuse out before the first rollout (openrlhf_patch/old_log_probs.py),
    and every step computed them with OpenRLHF's separate policy forward."""
    entry = paper_cpu_runs[algo]
    assert [m["ngrpo/old_log_probs_reused"] for m in _jsonl(entry["run"] / "metrics.jsonl")] == [0.0] * MAX_STEPS
    lines = [line for line in _launch_log(entry).splitlines() if "[ngrpo] old log-probs: " in line]
    assert len(lines) == 1, lines
    assert "from a separate policy forward" in lines[0] and "4 optimizer steps per rollout" in lines[0], lines


@pytest.mark.parametrize("algo", ALGOS_CHECKED)
@pytest.mark.pipeline
@pytest.mark.slow
def test_paper_cpu_run_validates_at_the_configured_steps(paper_cpu_runs, algo):
    run = paper_cpu_runs[algo]["run"]
    evals = _jsonl(run / "eval_metrics.jsonl")
    assert [e["step"] for e in evals] == [s for s in range(1, MAX_STEPS + 1) if s % CPU_EVAL_EVERY == 0]
    for e in evals:
        assert 0.0 <= e[f"eval_{EVAL_SET}_pass1"] <= 1.0
        assert e["eval_num_samples"] == 8.0  # 8 problems, one greedy answer each


@pytest.mark.parametrize("algo", ALGOS_CHECKED)
@pytest.mark.pipeline
@pytest.mark.slow
def test_paper_cpu_run_used_zero3_and_gradient_checkpointing_in_openrlhf_layout(paper_cpu_runs, algo):
    from pipelines.export import Source, checkpoint_zero_stage

    entry = paper_cpu_runs[algo]
    actor = entry["run"] / "checkpoints" / "_actor"
    assert checkpoint_zero_stage(Source("deepspeed", actor, tag=f"global_step{MAX_STEPS}")) == 3
    assert _model_states(entry["run"], MAX_STEPS)["ds_config"]["zero_optimization"]["stage"] == 3
    log = _launch_log(entry)
    # OpenRLHF's launcher prints its parsed arguments (strategy.print(args))
    assert re.search(r"gradient_checkpointing_enable=True", log), "OpenRLHF's args do not show gradient checkpointing"
    assert re.search(r"zero_stage=3", log)
    # OpenRLHF's own layout (NGRPO_CPU_LAYOUT=upstream): the trainer and the policy are Ray actors
    assert "CPU layout" not in log
    for actor_class in ("PPOTrainer", "PolicyModelActor", "RolloutRayActor"):
        assert f"({actor_class} pid=" in log, actor_class
    assert ("(ReferenceModelActor pid=" in log) == (algo == "grpo")
    # the speed-ups switched off took effect: vLLM ran the model in its own worker process beside
    # the engine core, and OpenRLHF's torch.compile'd code was compiled
    assert "(EngineCore pid=" in log and "(Worker pid=" in log
    assert list(entry["inductor"].rglob("*.so")), f"nothing compiled into {entry['inductor']}"


@pytest.mark.pipeline
@pytest.mark.slow
def test_paper_cpu_grpo_run_has_a_reference_model_kl(paper_cpu_runs):
    metrics = _jsonl(paper_cpu_runs["grpo"]["run"] / "metrics.jsonl")
    kl = [m.get("kl") for m in metrics]
    assert None not in kl, metrics[0].keys()
    assert all(abs(k) > 0 for k in kl[1:]), kl  # after step 1 the policy has left the reference
    assert all(m.get("kl", 0.0) == 0.0 for m in _jsonl(paper_cpu_runs["ngrpo"]["run"] / "metrics.jsonl"))


@pytest.mark.parametrize("algo", ALGOS_CHECKED)
@pytest.mark.pipeline
@pytest.mark.slow
def test_paper_cpu_run_moved_the_weights(paper_cpu_runs, algo):
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    run = paper_cpu_runs[algo]["run"]
    base = {k: v.float() for k, v in load_file(str(paper_cpu_runs["model"] / "model.safetensors")).items()}
    masters = get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints" / "_actor"))
    assert set(masters) == set(base)
    unchanged = [k for k in base if torch.equal(base[k], masters[k])]
    assert not unchanged, f"{algo}: 12 optimizer steps left {unchanged} unchanged"
    assert all(torch.isfinite(t).all() for t in masters.values())
    final = load_file(str(run / "final_model" / "model.safetensors"))
    assert any(not torch.equal(base[k], final[k].float()) for k in base), f"{algo}: the final model is the base model"
