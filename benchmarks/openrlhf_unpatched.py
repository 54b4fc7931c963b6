"""Run a prepared ngrpo run directory through OpenRLHF *without* ngrpo's patch: the baseline of
benchmarks/train_step.py and of tests/test_upstream_parity.py.

"Without the patch" means OpenRLHF 0.11.2 as released, with only what it needs to run on a CPU at
all (openrlhf_patch.cpu.cpu_mode: no CUDA calls, gloo weight sync, vLLM's CPU engine arguments) and the
same optimizer choice ngrpo makes on CPU (torch AdamW); OpenRLHF's own group_norm advantages, its
own loss, generation loop and logger. The reward is the same file (ngrpo's math-verify reward).

    python benchmarks/openrlhf_unpatched.py RUN_DIR LOG_FILE

RUN_DIR is a finished `ngrpo train` run of a recipe whose estimator is OpenRLHF's own (grpo, dr_grpo,
rloo, ppo); its argv is rerun in RUN_DIR/unpatched/. Each of OpenRLHF's "Global step N: {...}"
lines becomes a line of RUN_DIR/unpatched/steps.jsonl.

One thing is added to upstream, in the workers: torch's RNG is seeded with the run's seed, as
ngrpo's worker hook does (openrlhf_patch/install.worker_setup). OpenRLHF's trainer actor has no
torch.distributed group, so its prompt sampler is otherwise unseeded and the data order would
differ from run to run; the seed changes no computation, only fixes that order.
"""
import ast
import json
import os
import re
import runpy
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def worker_setup():
    """Ray's worker_process_setup_hook for the baseline: CPU mode only."""
    from openrlhf_patch import config, optimizer
    from openrlhf_patch.cpu import cpu_mode

    cfg = config.PatchConfig.from_env()
    config.activate(cfg)  # read by the optimizer choice below; no ngrpo hook is installed
    cpu_mode.apply_cpu_patches()
    if cfg.seed is not None:
        import torch

        torch.manual_seed(cfg.seed)  # the prompt order, as ngrpo's hook (see the docstring)
    if cfg.reproducible_rollouts:  # the same rollouts in every launch, on both sides of a comparison
        from openrlhf_patch import reproducible_rollouts, upstream

        upstream.patch_on_import(reproducible_rollouts.patches(cfg.seed or 0))
    from openrlhf.utils.deepspeed import deepspeed as ds_strategy

    ds_strategy.get_train_ds_config = optimizer.wrap_train_ds_config(ds_strategy.get_train_ds_config)


def main(run_dir: Path, log_file: Path, save_steps: str = "100000"):
    import ray

    from openrlhf_patch.cpu import cpu_mode
    from pipelines.launch import rundir, training

    manifest = rundir.read_manifest(run_dir)
    out = run_dir / "unpatched"
    shutil.rmtree(out, ignore_errors=True)
    (out / rundir.TRAIN_DATA).parent.mkdir(parents=True)
    shutil.copyfile(run_dir / rundir.TRAIN_DATA, out / rundir.TRAIN_DATA)
    argv = training.materialise_argv(manifest["openrlhf_argv"], out)
    if manifest["patch_config"]["estimator"] is not None:
        raise SystemExit(f"{run_dir}: its estimator ({manifest['patch_config']['estimator']}) is ngrpo's; the "
                         "baseline runs recipes whose estimator is OpenRLHF's own (grpo, dr_grpo, rloo, ppo)")
    argv[argv.index("--ckpt.save_steps") + 1] = save_steps  # default: no checkpoint, compare training alone

    from openrlhf_patch.config import PatchConfig

    patch_config = PatchConfig(**{**manifest["patch_config"], "run_dir": str(out)})
    os.environ.update(patch_config.to_env())
    worker_setup()
    args = training.parse_with_openrlhf(argv)
    kwargs = training.ray_init_kwargs(patch_config, args)
    kwargs["runtime_env"]["worker_process_setup_hook"] = "openrlhf_unpatched.worker_setup"
    env = kwargs["runtime_env"]["env_vars"]
    env.update(cpu_mode.cpu_env())
    # this file is the workers' hook module: a local run's workers find it on PYTHONPATH
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(HERE), env.get("PYTHONPATH", "")] if p)
    # OpenRLHF's step lines go to the driver's stdout through Ray's log forwarding
    fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    ray.init(**kwargs)
    try:
        sys.argv = [training.OPENRLHF_MODULE, *argv]
        runpy.run_module(training.OPENRLHF_MODULE, run_name="__main__")
    finally:
        ray.shutdown()
    steps = []
    for line in open(log_file, errors="replace"):
        m = re.search(r"Global step (\d+): (\{.*\})\s*$", line)
        if m:
            steps.append({"global_step": int(m.group(1)), **ast.literal_eval(m.group(2))})
    (out / "steps.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve(), *sys.argv[3:4])
