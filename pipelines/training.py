"""`ngrpo train`: a recipe becomes an OpenRLHF `train_ppo_ray` command line, run in this process.

There is no second trainer: the run is OpenRLHF's own launcher (`openrlhf.cli.train_ppo_ray`, its
parser and `train()`), started after `ray.init` so that every Ray worker runs ngrpo's patch hook.

A run directory holds everything about one run:
    ngrpo_run.json      manifest: model, algorithm, resolved recipe, OpenRLHF argv, patch config, status
    data/train.jsonl    the training prompts, with the full chat prompt the model sees, and answers
    checkpoints/        DeepSpeed checkpoints (OpenRLHF's ckpt.path; `_actor/global_stepN`)
    final_model/        the trained policy as a Hugging Face folder (OpenRLHF's ckpt.output_dir)
    metrics.jsonl       one JSON line of metrics per training step (OpenRLHF's + NGRPO diagnostics)
"""
import contextlib
import dataclasses
import json
import os
import runpy
import shlex
import sys
import time
from pathlib import Path
from typing import List, Optional

from openrlhf_patch.config import PatchConfig
from openrlhf_patch.hooks import PATCHED_ESTIMATORS
from pipelines import gpu_run
from pipelines.prompts import build_prompt

MANIFEST = "ngrpo_run.json"
OPENRLHF_MODULE = "openrlhf.cli.train_ppo_ray"
DEFAULT_REWARD_FILE = str(Path(__file__).with_name("reward.py"))


@dataclasses.dataclass
class Layout:
    """Where the models run. GPU default: one node, every model colocated on all its GPUs."""

    device: str = "cuda"
    nodes: int = 1
    gpus_per_node: int = 8
    vllm_engines: Optional[int] = None  # default: one engine per tensor-parallel slice of the GPUs
    vllm_tensor_parallel: int = 1
    colocate: bool = True
    vllm_gpu_memory_utilization: float = 0.5

    @classmethod
    def for_device(cls, device: str, **overrides):
        if device == "cpu":
            base = cls(device="cpu", gpus_per_node=1, vllm_engines=1, colocate=False)
        else:
            import torch

            base = cls(device="cuda", gpus_per_node=max(torch.cuda.device_count(), 1))
        return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})

    @property
    def num_vllm_engines(self) -> int:
        if self.vllm_engines is not None:
            return self.vllm_engines
        return max(self.nodes * self.gpus_per_node // self.vllm_tensor_parallel, 1)


def detect_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _filter_range(mode: str, group_size: int, max_reward: float):
    """OpenRLHF keeps a group iff LO < mean score < HI. With rewards in {0, R_max} the means of a
    group lie on a grid of step R_max/G, so half a step inside each end separates exactly the
    all-wrong (mean 0) and all-correct (mean R_max) groups from the mixed ones."""
    half_step = 0.5 * max_reward / group_size
    return {
        "drop_all_correct": (-half_step, max_reward - half_step),
        "drop_all_correct_and_all_wrong": (half_step, max_reward - half_step),
        "drop_all_wrong": (half_step, max_reward + half_step),
    }[mode]


def openrlhf_estimator(estimator: str) -> str:
    """The estimator name OpenRLHF's parser is given. ngrpo's own estimators run inside OpenRLHF's
    group path (group_norm), whose group step the patch replaces."""
    return "group_norm" if estimator in PATCHED_ESTIMATORS else estimator


def build_openrlhf_argv(recipe: dict, *, model: str, train_file: str, run_dir: str, layout: Layout,
                        reward_file: str = DEFAULT_REWARD_FILE, save_steps: int = 1,
                        keep_checkpoints: int = 3, extra: List[str] = ()) -> List[str]:
    r = recipe
    group_size = r["samples_per_prompt"]
    run_dir = Path(run_dir)
    argv = {
        "--actor.model_name_or_path": model,
        "--data.prompt_dataset": train_file,
        "--data.input_key": "prompt",
        "--data.label_key": "answer",
        "--reward.remote_url": reward_file,
        "--ckpt.path": run_dir / "checkpoints",
        "--ckpt.output_dir": run_dir / "final_model",
        "--ckpt.save_steps": save_steps,
        "--ckpt.max_num": keep_checkpoints,
        "--rollout.batch_size": r["prompts_per_step"],
        "--rollout.n_samples_per_prompt": group_size,
        "--train.batch_size": r["mini_batch_prompts"] * group_size,
        "--train.micro_batch_size": r["micro_train_batch_size"],
        "--rollout.micro_batch_size": r["micro_rollout_batch_size"],
        "--train.max_epochs": r["ppo_epochs"],
        "--train.num_episodes": r["episodes"],
        "--data.max_len": r["max_prompt_len"] + r["max_response_len"],
        "--rollout.max_new_tokens": r["max_response_len"],
        "--rollout.temperature": r["temperature"],
        "--rollout.top_p": r["top_p"],
        "--actor.adam.lr": r["lr"],
        "--actor.adam.weight_decay": r["weight_decay"],
        "--actor.max_norm": r["max_grad_norm"],
        "--actor.lr_scheduler": "constant_with_warmup" if r["lr_warmup_ratio"] > 0 else "constant",
        "--actor.lr_warmup_ratio": r["lr_warmup_ratio"],
        "--actor.eps_clip_low_high": [r["eps_clip_low"], r["eps_clip_high"]],
        "--actor.loss_agg_mode": r["loss_agg"],
        "--actor.entropy_coef": r["entropy_coef"],
        "--algo.advantage.estimator": openrlhf_estimator(r["estimator"]),
        "--algo.advantage.gamma": r["gamma"],
        "--algo.advantage.lambd": r["gae_lambda"],
        "--ds.zero_stage": r["zero_stage"],
        "--train.seed": r["seed"],
        "--logger.logging_steps": 1,
        # ngrpo's metrics.jsonl and progress lines ride on OpenRLHF's TensorBoard logger (hooks.py).
        "--logger.tensorboard_dir": run_dir / "tensorboard",
        "--actor.num_nodes": layout.nodes,
        "--actor.num_gpus_per_node": layout.gpus_per_node,
        "--vllm.num_engines": layout.num_vllm_engines,
        "--vllm.tensor_parallel_size": layout.vllm_tensor_parallel,
    }
    flags = []
    if r["kl_mode"] == "none" or r["kl_coef"] == 0:
        argv["--algo.kl.init_coef"] = 0
    else:
        argv["--algo.kl.init_coef"] = r["kl_coef"]
        argv["--algo.kl.estimator"] = r["kl_estimator"]
        argv["--ref.num_nodes"] = layout.nodes
        argv["--ref.num_gpus_per_node"] = layout.gpus_per_node
        if r["kl_mode"] == "loss":
            flags.append("--algo.kl.use_loss")
    if r["estimator"] == "gae":
        argv["--critic.adam.lr"] = r["critic_lr"]
        argv["--critic.num_nodes"] = layout.nodes
        argv["--critic.num_gpus_per_node"] = layout.gpus_per_node
    if r["group_filter"] != "none":
        flags.append("--algo.dynamic_filtering_enable")
        argv["--algo.dynamic_filtering_range"] = list(_filter_range(r["group_filter"], group_size, r["max_reward"]))
    if r["overlong_buffer"]:
        argv["--reward.overlong_buffer_len"] = r["overlong_buffer"]
        argv["--reward.overlong_penalty_factor"] = 1.0
    if layout.device == "cpu":
        # No flash-attention or CUDA graphs on CPU; weights reach vLLM through gloo (cpu_mode.py).
        argv["--ds.attn_implementation"] = "eager"
        argv["--vllm.sync_backend"] = "gloo"
        flags.append("--vllm.enforce_eager")
    elif layout.colocate:
        flags += ["--train.colocate_all", "--vllm.enable_sleep", "--ds.enable_sleep"]
        argv["--vllm.gpu_memory_utilization"] = layout.vllm_gpu_memory_utilization
    # --- GPU without a usable flash-attn (the default GPU install): sdpa (pipelines/gpu_run.py) ---
    if layout.device != "cpu" and not gpu_run.flash_attn_usable():
        argv["--ds.attn_implementation"] = "sdpa"

    out = []
    for key, value in argv.items():
        out.append(key)
        if isinstance(value, list):
            out.extend(str(v) for v in value)
        else:
            out.append(str(value))
    return out + flags + list(extra)


def build_patch_config(recipe: dict, *, device: str, run_dir: Optional[str], max_steps: Optional[int]) -> PatchConfig:
    estimator = recipe["estimator"]
    return PatchConfig(
        estimator=estimator if estimator in PATCHED_ESTIMATORS else None,
        virtual_samples=recipe["virtual_samples"],
        max_reward=recipe["max_reward"],
        w_reinforce_lambda=recipe["w_reinforce_lambda"],
        device=device,
        run_dir=str(run_dir) if run_dir else None,
        max_steps=max_steps,
        seed=recipe["seed"],
        answer_extraction=recipe["answer_extraction"],
    )


def command_line(argv: List[str]) -> str:
    return " ".join(shlex.quote(a) for a in [sys.executable, "-m", OPENRLHF_MODULE, *argv])


class _ParsedOnly(Exception):
    pass


@contextlib.contextmanager
def _argv(argv):
    saved = sys.argv
    sys.argv = [OPENRLHF_MODULE, *argv]
    try:
        yield
    finally:
        sys.argv = saved


def parse_with_openrlhf(argv: List[str]):
    """Run OpenRLHF's own parser and post-parse checks on `argv`, stopping before training.

    The parser lives inline under `if __name__ == "__main__"` in train_ppo_ray, so the module is
    run as __main__ with `ray.is_initialized` (the first thing `train()` calls) raising once the
    checks passed. Returns the validated hierarchical args; raises SystemExit (argparse) or
    AssertionError (OpenRLHF's checks) for a bad command line.
    """
    import ray

    from openrlhf_patch.cpu_mode import ensure_flash_attn_importable

    ensure_flash_attn_importable()  # the launcher imports OpenRLHF's models, which import flash_attn
    import openrlhf.utils.config as openrlhf_config

    captured = {}
    hierarchize, is_initialized = openrlhf_config.hierarchize, ray.is_initialized

    def capture(args):
        captured["args"] = hierarchize(args)
        return captured["args"]

    def stop(*a, **k):
        raise _ParsedOnly()

    openrlhf_config.hierarchize, ray.is_initialized = capture, stop
    try:
        with _argv(argv), contextlib.redirect_stdout(sys.stderr):
            runpy.run_module(OPENRLHF_MODULE, run_name="__main__")
    except _ParsedOnly:
        return captured["args"]
    finally:
        openrlhf_config.hierarchize, ray.is_initialized = hierarchize, is_initialized
    raise RuntimeError("OpenRLHF's launcher returned without reaching train(); cannot validate the command line")


def logical_gpus_needed(args) -> int:
    """GPUs the OpenRLHF layout asks Ray for; on CPU they are logical (too few would hang)."""
    per = lambda group: group.num_nodes * group.num_gpus_per_node
    total = per(args.actor) + args.vllm.num_engines * args.vllm.tensor_parallel_size
    if args.algo.kl.init_coef > 0:
        total += per(args.ref)
    if args.critic.model_name_or_path:
        total += per(args.critic)
    return total


def run_openrlhf(argv: List[str], patch_config: PatchConfig) -> None:
    """Start Ray with ngrpo's worker hook and run OpenRLHF's launcher in this process."""
    import ray

    from openrlhf_patch import install

    install.apply(patch_config, role="driver")
    args = parse_with_openrlhf(argv)
    env = {
        # what OpenRLHF's own ray.init would set (train() skips it once Ray is up)
        "TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM", "true"),
        "NCCL_DEBUG": os.environ.get("NCCL_DEBUG", "WARN"),
        "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": os.environ.get("RAY_ENABLE_ZERO_COPY_TORCH_TENSORS", "1"),
        **patch_config.to_env(),
        # read by the reward file inside the rollout actors (pipelines/reward.py)
        "NGRPO_ANSWER_EXTRACTION": patch_config.answer_extraction,
    }
    # --- GPU: torch asks NVML, not the CUDA driver, before Ray sets CUDA_VISIBLE_DEVICES (gpu_run.py) ---
    if patch_config.device != "cpu":
        env.update(gpu_run.GPU_WORKER_ENV)
    init_kwargs = {}
    if patch_config.device == "cpu":
        from openrlhf_patch import cpu_mode

        env.update(cpu_mode.cpu_env())
        gpus = logical_gpus_needed(args)
        init_kwargs = dict(num_gpus=gpus, num_cpus=max(os.cpu_count() or 1, 2 * gpus + 2))
    ray.init(address=os.environ.get("RAY_ADDRESS"), runtime_env={"worker_process_setup_hook": install.HOOK,
             "env_vars": env}, **init_kwargs)
    try:
        with _argv(argv):
            runpy.run_module(OPENRLHF_MODULE, run_name="__main__")
    finally:
        ray.shutdown()


# ---------------------------------------------------------------------------------------------
# Run directories
# ---------------------------------------------------------------------------------------------
def write_training_file(problems, path: Path) -> int:
    """The prompts OpenRLHF reads: the paper's full chat prompt (so no template is applied later)."""
    from pipelines.data import write_jsonl_atomic

    write_jsonl_atomic(({"id": p["id"], "prompt": build_prompt(p["problem"]), "answer": p["answer"]}
                        for p in problems), path)
    return len(problems)


def read_manifest(run_dir) -> dict:
    path = Path(run_dir) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} is not an ngrpo run directory: {MANIFEST} is missing")
    return json.loads(path.read_text())


def write_manifest(run_dir, manifest: dict) -> None:
    path = Path(run_dir) / MANIFEST
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, default=str))
    os.replace(tmp, path)


def checkpoint_step(run_dir) -> int:
    """The step of the DeepSpeed checkpoint OpenRLHF resumes from (its `latest` tag), 0 if none."""
    latest = Path(run_dir) / "checkpoints" / "_actor" / "latest"
    if not latest.exists():
        return 0
    tag = latest.read_text().strip()
    if not tag.startswith("global_step") or not tag[len("global_step"):].isdigit():
        raise ValueError(f"{latest}: unexpected checkpoint tag {tag!r} (expected global_stepN)")
    return int(tag[len("global_step"):])


def truncate_metrics(run_dir, step: int) -> None:
    """Forget logged steps after `step` (a resumed run repeats them from its checkpoint)."""
    path = Path(run_dir) / "metrics.jsonl"
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        path.write_text("".join(line + "\n" for line in lines if json.loads(line)["step"] <= step))


def last_logged_step(run_dir) -> int:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]
    return max(steps, default=0)


def execute_run(run_dir, manifest: dict, resume: bool = False) -> dict:
    argv = list(manifest["openrlhf_argv"])
    patch_config = PatchConfig(**manifest["patch_config"])
    if resume:
        argv.append("--ckpt.load_enable")
        start = checkpoint_step(run_dir)
        truncate_metrics(run_dir, start)
        patch_config = dataclasses.replace(patch_config, start_step=start)
    manifest.update(status="running", started=time.time())
    write_manifest(run_dir, manifest)
    try:
        run_openrlhf(argv, patch_config)
    except BaseException:
        manifest["status"] = "failed"
        write_manifest(run_dir, manifest)
        raise
    manifest.update(status="finished", finished=time.time(), global_step=last_logged_step(run_dir))
    write_manifest(run_dir, manifest)
    return manifest
