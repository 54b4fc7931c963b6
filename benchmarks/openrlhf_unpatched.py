"""Run a prepared ngrpo run directory through OpenRLHF *without* ngrpo's patch: the baseline of
benchmarks/train_step.py.

"Without the patch" means OpenRLHF 0.11.2 as released, with only what it needs to run on a CPU at
all (openrlhf_patch.cpu_mode: no CUDA calls, gloo weight sync, vLLM's CPU engine arguments) and the
same optimizer choice ngrpo makes on CPU (torch AdamW); OpenRLHF's own group_norm advantages, its
own loss, generation loop and logger. The reward is the same file (ngrpo's math-verify reward).

    python benchmarks/openrlhf_unpatched.py RUN_DIR LOG_FILE

RUN_DIR is a finished `ngrpo train --algo grpo` run; its argv is rerun in RUN_DIR/unpatched/.
Each of OpenRLHF's "Global step N: {...}" lines becomes a line of RUN_DIR/unpatched/steps.jsonl.
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
    from openrlhf_patch import config, cpu_mode, hooks

    cfg = config.PatchConfig.from_env()
    config.activate(cfg)  # read by the optimizer choice below; no ngrpo hook is installed
    cpu_mode.apply_cpu_patches()
    from openrlhf.utils.deepspeed import deepspeed as ds_strategy

    ds_strategy.get_train_ds_config = hooks.wrap_train_ds_config(ds_strategy.get_train_ds_config)


def main(run_dir: Path, log_file: Path):
    import ray

    from openrlhf_patch import cpu_mode
    from pipelines import rundir, training

    manifest = rundir.read_manifest(run_dir)
    out = run_dir / "unpatched"
    shutil.rmtree(out, ignore_errors=True)
    (out / rundir.TRAIN_DATA).parent.mkdir(parents=True)
    shutil.copyfile(run_dir / rundir.TRAIN_DATA, out / rundir.TRAIN_DATA)
    argv = training.materialise_argv(manifest["openrlhf_argv"], out)
    if argv[argv.index("--algo.advantage.estimator") + 1] != "group_norm":
        raise SystemExit(f"{run_dir}: not a grpo run (the baseline runs OpenRLHF's own group_norm)")
    argv[argv.index("--ckpt.save_steps") + 1] = "100000"  # no checkpoint: compare training alone

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
    main(Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve())
