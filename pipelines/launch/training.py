"""`ngrpo train`: a recipe becomes an OpenRLHF `train_ppo_ray` command line, run in this process.

There is no second trainer: the run is OpenRLHF's own launcher (`openrlhf.cli.train_ppo_ray`, its
parser and `train()`), started after `ray.init` so that every Ray worker runs ngrpo's patch hook.
The run directory's layout and files are pipelines/launch/rundir.py's.
"""
import contextlib
import dataclasses
import os
import runpy
import shlex
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional

from openrlhf_patch import touchpoints
from openrlhf_patch.algorithms import ESTIMATOR_OPTIONS
from openrlhf_patch.config import PatchConfig
from openrlhf_patch.cpu import early_ray
from pipelines.launch import gpu_memory, gpu_run, rundir
from pipelines.datasets.prompts import build_prompt
from pipelines.launch.recipes import UPSTREAM_ESTIMATORS, Recipe

OPENRLHF_MODULE = "openrlhf.cli.train_ppo_ray"
DEFAULT_REWARD_FILE = str(Path(__file__).resolve().parents[1] / "reward.py")
# OpenRLHF loads its reward file by path inside the rollout actors, which may sit on any node of a
# cluster. So it gets a path relative to the Ray working_dir ngrpo ships with every launch
# (RUN_DIR/ray_code/), holding this shim onto pipelines.reward and a copy of a user's reward file.
REWARD_ENTRY = "ngrpo_reward.py"
USER_REWARD_COPY = "user_reward.py"
RAY_CODE_DIR = "ray_code"


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


def openrlhf_estimator(estimator: str) -> str:
    """The estimator name OpenRLHF's parser is given: OpenRLHF's own estimators by name; ngrpo's
    run inside OpenRLHF's group path (group_norm), whose group step the patch replaces."""
    return estimator if estimator in UPSTREAM_ESTIMATORS else "group_norm"


def build_openrlhf_argv(recipe: Recipe, *, model: str, layout: Layout, save_steps: int = 1, keep_checkpoints: int = 3, eval_every: Optional[int] = None,
                        extra: List[str] = ()) -> List[str]:
    """OpenRLHF's flags for RECIPE. Paths inside the run directory are written with
    rundir.RUN_DIR_TOKEN (see materialise_argv), so that the manifest keeps no absolute path to them."""
    argv, flags = _core_flags(recipe, model, layout, save_steps, keep_checkpoints), []
    _algorithm_flags(recipe, layout, argv, flags)
    _batching_flags(recipe, layout, argv, flags)
    if eval_every:
        # greedy, one answer per problem, as the NGRPO authors validate
        argv.update({"--eval.dataset": f"{rundir.RUN_DIR_TOKEN}/{rundir.EVAL_DATA}", "--eval.steps": eval_every,
                     "--eval.n_samples_per_prompt": 1, "--eval.temperature": 0.0})
    _device_flags(layout, argv, flags)
    out = []
    for key, value in argv.items():
        out.append(key)
        if isinstance(value, list):
            out.extend(str(v) for v in value)
        else:
            out.append(str(value))
    return out + flags + list(extra)


def _core_flags(r: Recipe, model: str, layout: Layout, save_steps: int, keep_checkpoints: int) -> dict:
    """The flags every run sets: model, data, reward entry, checkpoints, batch shape, sampling,
    optimizer, loss, estimator, logging and the actor/vLLM layout."""
    group_size = r.samples_per_prompt
    run = rundir.RUN_DIR_TOKEN
    return {
        "--actor.model_name_or_path": model,
        "--data.prompt_dataset": f"{run}/{rundir.TRAIN_DATA}",
        "--data.input_key": "prompt",
        "--data.label_key": "answer",
        # Always ngrpo's reward entry; it calls a user's --reward-file itself (pipelines/reward.py).
        "--reward.remote_url": REWARD_ENTRY,
        "--ckpt.path": f"{run}/{rundir.CHECKPOINTS}",
        "--ckpt.output_dir": f"{run}/{rundir.FINAL_MODEL}",
        "--ckpt.save_steps": save_steps,
        "--ckpt.max_num": keep_checkpoints,
        "--rollout.batch_size": r.prompts_per_step,
        "--rollout.n_samples_per_prompt": group_size,
        "--train.batch_size": r.mini_batch_prompts * group_size,
        "--train.micro_batch_size": r.micro_train_batch_size,
        "--rollout.micro_batch_size": r.micro_rollout_batch_size,
        "--train.max_epochs": r.ppo_epochs,
        "--train.num_episodes": r.episodes,
        "--data.max_len": r.max_prompt_len + r.max_response_len,
        "--rollout.max_new_tokens": r.max_response_len,
        "--rollout.temperature": r.temperature,
        "--rollout.top_p": r.top_p,
        "--actor.adam.lr": r.lr,
        "--actor.adam.weight_decay": r.weight_decay,
        "--actor.adam.betas": list(r.adam_betas),
        "--actor.max_norm": r.max_grad_norm,
        "--actor.lr_scheduler": "constant_with_warmup" if r.lr_warmup_ratio > 0 else "constant",
        "--actor.lr_warmup_ratio": r.lr_warmup_ratio,
        "--actor.eps_clip_low_high": [r.eps_clip_low, r.eps_clip_high],
        "--actor.loss_agg_mode": r.loss_agg,
        "--actor.entropy_coef": r.entropy_coef,
        "--algo.advantage.estimator": openrlhf_estimator(r.estimator),
        "--algo.advantage.gamma": r.gamma,
        "--algo.advantage.lambd": r.gae_lambda,
        "--ds.zero_stage": r.zero_stage,
        "--train.seed": r.seed,
        "--logger.logging_steps": 1,
        # ngrpo's metrics.jsonl and progress lines ride on OpenRLHF's TensorBoard logger (openrlhf_patch/run_logger.py);
        # --wandb adds OpenRLHF's W&B logger (wandb_argv), which is handed the same metrics.
        "--logger.tensorboard_dir": f"{run}/tensorboard",
        "--actor.num_nodes": layout.nodes,
        "--actor.num_gpus_per_node": layout.gpus_per_node,
        "--vllm.num_engines": layout.num_vllm_engines,
        "--vllm.tensor_parallel_size": layout.vllm_tensor_parallel,
    }


def _algorithm_flags(r: Recipe, layout: Layout, argv: dict, flags: list) -> None:
    """KL (in the reward or the loss), PPO's critic, the group filter and overlong shaping."""
    if r.kl_mode == "none" or r.kl_coef == 0:
        argv["--algo.kl.init_coef"] = 0
    else:
        argv["--algo.kl.init_coef"] = r.kl_coef
        argv["--algo.kl.estimator"] = r.kl_estimator
        argv["--ref.num_nodes"] = layout.nodes
        argv["--ref.num_gpus_per_node"] = layout.gpus_per_node
        if r.kl_mode == "loss":
            flags.append("--algo.kl.use_loss")
    if r.estimator == "gae":
        # The authors' critic: constant lr, no warm-up, AdamW with weight decay (OpenRLHF's default
        # is a cosine schedule with 3 % warm-up and no weight decay).
        argv.update({"--critic.adam.lr": r.critic_lr, "--critic.adam.weight_decay": r.critic_weight_decay,
                     "--critic.adam.betas": list(r.adam_betas), "--critic.lr_scheduler": "constant",
                     "--critic.lr_warmup_ratio": 0, "--critic.num_nodes": layout.nodes,
                     "--critic.num_gpus_per_node": layout.gpus_per_node})
    if r.group_filter != "none":
        # Turns OpenRLHF's refill path on; which groups stay is decided by ngrpo's filter
        # (sampling.make_generate_vllm, by correctness), not by OpenRLHF's mean-reward range.
        flags.append("--algo.dynamic_filtering_enable")
    if r.overlong_buffer:
        argv["--reward.overlong_buffer_len"] = r.overlong_buffer
        argv["--reward.overlong_penalty_factor"] = 1.0


def _batching_flags(r: Recipe, layout: Layout, argv: dict, flags: list) -> None:
    """Gradient checkpointing, packing and dynamic batching."""
    if r.gradient_checkpointing:
        flags.append("--actor.gradient_checkpointing_enable")
    # --uniform-groups mask-aux/skip need fixed micro-batches (openrlhf_patch/uniform_groups.py): no packing by default
    packing = r.packing if r.packing is not None else (
        layout.device != "cpu" and r.uniform_groups == "keep" and gpu_run.flash_attn_usable())
    if packing:
        # OpenRLHF packs with flash-attention's varlen kernels; dynamic batching by tokens per GPU.
        tokens = r.max_tokens_per_gpu or gpu_memory.DEFAULT_MAX_TOKENS_PER_GPU
        flags += ["--ds.packing_samples", "--train.dynamic_batch_enable"]
        argv.update({"--train.max_tokens_per_gpu": tokens, "--rollout.max_tokens_per_gpu": tokens})


def _device_flags(layout: Layout, argv: dict, flags: list) -> None:
    """Attention implementation, weight-sync backend, eager vLLM and colocation per device."""
    if layout.device == "cpu":
        # No flash-attention or CUDA graphs on CPU; weights reach vLLM through gloo (cpu_mode.py).
        argv["--ds.attn_implementation"] = "eager"
        argv["--vllm.sync_backend"] = "gloo"
        flags.append("--vllm.enforce_eager")
    else:
        # flash-attention where a wheel matching the installed torch exists, else PyTorch's sdpa
        argv["--ds.attn_implementation"] = "flash_attention_2" if gpu_run.flash_attn_usable() else "sdpa"
        flags.append("--vllm.enforce_eager")  # as OpenRLHF's examples with sleep mode: no CUDA graphs
        if layout.colocate:
            flags += ["--train.colocate_all", "--vllm.enable_sleep", "--ds.enable_sleep"]
            argv["--vllm.gpu_memory_utilization"] = layout.vllm_gpu_memory_utilization


def wandb_argv(project: str, run_name: str) -> List[str]:
    """OpenRLHF's flags for `ngrpo train --wandb PROJECT`, recorded with the launch's flags after `--`
    (a resume rebuilds them from there). OpenRLHF's W&B logger turns on with a key; it gets a
    placeholder, never the key (the command line is stored in the manifest and handed to W&B as the
    run's config): wandb reads the key from WANDB_API_KEY (pipelines/launch/features.py checks it is set).
    The W&B logger gets the same step metrics as the TensorBoard one, ngrpo's diagnostics included."""
    from pipelines.launch.features import WANDB_KEY_FROM_ENV

    return ["--logger.wandb.key", WANDB_KEY_FROM_ENV, "--logger.wandb.project", project,
            "--logger.wandb.run_name", run_name]


def materialise_argv(argv: List[str], run_dir) -> List[str]:
    """ARGV with rundir.RUN_DIR_TOKEN replaced by RUN_DIR (absolute)."""
    run_dir = str(Path(run_dir).resolve())
    return [a.replace(rundir.RUN_DIR_TOKEN, run_dir) for a in argv]


def build_patch_config(recipe: Recipe, *, device: str, max_steps: Optional[int], reward_file: str,
                       trust_remote_code: bool = False, max_samples: Optional[int] = None,
                       max_generated_tokens: Optional[int] = None) -> PatchConfig:
    """The settings the workers' patch needs (the run directory is filled in at launch)."""
    return PatchConfig(
        estimator=None if recipe.estimator in UPSTREAM_ESTIMATORS else recipe.estimator,  # None: OpenRLHF's
        estimator_options={name: getattr(recipe, name) for name in ESTIMATOR_OPTIONS},
        group_filter=recipe.group_filter,
        device=device,
        max_steps=max_steps,
        max_samples=max_samples,
        max_generated_tokens=max_generated_tokens,
        seed=recipe.seed,
        answer_extraction=recipe.answer_extraction,
        reward_file=reward_file,
        old_log_probs=recipe.old_log_probs,
        reproducible_rollouts=recipe.reproducible_rollouts,
        trust_remote_code=trust_remote_code,
        uniform_groups=recipe.uniform_groups,
        sgpo=sgpo_settings(recipe),
    )


def sgpo_settings(recipe: Recipe) -> dict:
    """SGPO's judge settings for the workers (openrlhf_patch.judge.JudgeSettings), the prompt's text
    read here; {} when SGPO is off. JudgeError names an unreadable --judge-prompt."""
    if not recipe.graded_negatives:
        return {}
    from openrlhf_patch import judge

    return {"url": recipe.judge_url, "model": recipe.judge_model, "prompt": judge.load_prompt(recipe.judge_prompt),
            "timeout": recipe.judge_timeout, "workers": recipe.judge_workers,
            "max_fail_share": recipe.judge_max_fail_share, "beta": recipe.sgpo_beta, "gamma": recipe.sgpo_gamma,
            "unit": recipe.rts_unit, "max_reward": recipe.max_reward}


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

    from openrlhf_patch.cpu.cpu_mode import ensure_flash_attn_importable

    ensure_flash_attn_importable()  # the launcher imports OpenRLHF's models, which import flash_attn
    import openrlhf.utils.config as openrlhf_config

    captured = {}
    hierarchize, is_initialized = openrlhf_config.hierarchize, ray.is_initialized

    def capture(args):
        captured["args"] = hierarchize(args)
        return captured["args"]

    parsing_thread = threading.get_ident()

    def stop(*a, **k):
        if threading.get_ident() != parsing_thread:  # Ray's node starting beside the parse (early_ray)
            return is_initialized(*a, **k)
        raise _ParsedOnly()

    try:
        with touchpoints.patched("openrlhf.utils.config.hierarchize", capture), \
                touchpoints.patched("ray.is_initialized", stop), _argv(argv), contextlib.redirect_stdout(sys.stderr):
            runpy.run_module(OPENRLHF_MODULE, run_name="__main__")
    except _ParsedOnly:
        return captured["args"]
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


def _ship_code(patch_config: PatchConfig) -> dict:
    """Ray's runtime_env parts that bring ngrpo's code to every node: its packages as py_modules (a
    node with only OpenRLHF installed still runs the patch and the reward), and a working_dir with
    the reward entry and a copy of a user's reward file."""
    import shutil

    import openrlhf_patch
    import pipelines

    code = Path(patch_config.run_dir) / RAY_CODE_DIR
    code.mkdir(parents=True, exist_ok=True)
    (code / REWARD_ENTRY).write_text("from pipelines.reward import reward_func  # noqa: F401  (ngrpo's reward entry)\n")
    if patch_config.reward_file and patch_config.reward_file != DEFAULT_REWARD_FILE:
        shutil.copyfile(patch_config.reward_file, code / USER_REWARD_COPY)
    packages = [str(Path(m.__file__).parent) for m in (openrlhf_patch, pipelines)]
    return {"py_modules": packages, "working_dir": str(code)}


PRIVATE_RAY_SYSTEM_CONFIG = {"enable_worker_prestart": False, "prestart_worker_first_driver": False}


def local_node_kwargs(device: str, logical_gpus: int) -> dict:
    """ray.init's node settings for a run's private local Ray instance ("local": never whatever
    cluster a `ray start` left registered on the machine). The node is the run's alone, on the
    loopback address and with token authentication: early_ray makes it so, early or not (the
    launch's early_ray.take before its ray.init)."""
    kwargs = {
        "address": "local",
        "include_dashboard": False,  # a private instance: its dashboard costs seconds and memory
        # Ray prestarts a plain worker per CPU for tasks; every actor of a run needs a worker with
        # ngrpo's runtime env, which Ray starts anew, so those would only take memory and CPU
        # while the actors start. A copy: ray.init writes its session's spilling directory into
        # the dict it is given.
        "_system_config": dict(PRIVATE_RAY_SYSTEM_CONFIG),
    }
    if device == "cpu":
        # logical GPUs: Ray places OpenRLHF's actors by them
        kwargs.update(num_gpus=logical_gpus, num_cpus=max(os.cpu_count() or 1, 2 * logical_gpus + 2))
    return kwargs


def ray_init_kwargs(patch_config: PatchConfig, args) -> dict:
    """How this launch starts or joins Ray. Without RAY_ADDRESS a run gets a private local Ray
    instance (local_node_kwargs); an existing cluster decides its own resources."""
    from openrlhf_patch import install

    env = {
        # what OpenRLHF's own ray.init would set (train() skips it once Ray is up)
        "TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM", "true"),
        "NCCL_DEBUG": os.environ.get("NCCL_DEBUG", "WARN"),
        "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": os.environ.get("RAY_ENABLE_ZERO_COPY_TORCH_TENSORS", "1"),
        **patch_config.to_env(),
        # read by ngrpo's reward file inside the rollout actors (pipelines/reward.py)
        "NGRPO_ANSWER_EXTRACTION": patch_config.answer_extraction,
        "NGRPO_RUN_DIR": patch_config.run_dir or "",
    }
    if patch_config.reward_file and patch_config.reward_file != DEFAULT_REWARD_FILE:
        env.update(NGRPO_USER_REWARD_FILE=patch_config.reward_file, NGRPO_USER_REWARD_COPY=USER_REWARD_COPY)
    runtime_env = {"worker_process_setup_hook": install.HOOK, "env_vars": env, **_ship_code(patch_config)}
    address = os.environ.get("RAY_ADDRESS")
    if address:
        kwargs = {"address": address}
    else:
        kwargs = local_node_kwargs(patch_config.device, logical_gpus_needed(args))
    kwargs["runtime_env"] = runtime_env
    if patch_config.device == "cpu":
        from openrlhf_patch.cpu import cpu_layout, cpu_mode

        from openrlhf_patch.cpu import speedups

        env.update(cpu_mode.cpu_env())
        env[speedups.ENV] = "on" if speedups.enabled() else "off"  # every process of the run decides alike
        env[cpu_layout.LAYOUT_ENV] = "lean" if cpu_layout.lean_layout() else "upstream"  # reaches a cluster's workers too
        # sizes the vLLM engines' KV cache to one rollout (cpu_mode.kv_cache_bytes)
        env[cpu_mode.ROLLOUT_SEQUENCES_ENV] = str(args.rollout.batch_size * args.rollout.n_samples_per_prompt)
    else:
        # Ray runs the worker hook before it sets CUDA_VISIBLE_DEVICES: CUDA must not be
        # initialised then, or every actor lands on GPU 0 (pipelines/launch/gpu_run.py).
        env.update(gpu_run.GPU_WORKER_ENV)
    return kwargs


def early_node_kwargs(argv: List[str], device: str) -> Optional[dict]:
    """The node settings ray_init_kwargs will give a CPU run's private Ray instance, read from the
    flags ngrpo wrote (OpenRLHF's parser takes seconds to import); None where Ray is not started
    early: GPU runs, a cluster (RAY_ADDRESS), or a command line without the flags."""
    from openrlhf_patch.cpu import speedups

    if device != "cpu" or os.environ.get("RAY_ADDRESS") or not speedups.on("early-ray-node"):
        return None
    gpus = logical_gpus_from_argv(argv)
    return None if gpus is None else local_node_kwargs(device, gpus)


def start_ray_early(argv: List[str], device: str) -> None:
    """Start the run's private Ray node in the background (openrlhf_patch/cpu/early_ray.py) where
    early_node_kwargs gives its settings; the launch takes it, or `early_ray.discard()` stops it."""
    node = early_node_kwargs(argv, device)
    if node is not None:
        early_ray.start(node)


def logical_gpus_from_argv(argv: List[str]) -> Optional[int]:
    """logical_gpus_needed() for the flags in ARGV, with OpenRLHF's defaults for what ngrpo leaves
    out (the rest of the group sizes; a critic only for gae). None when a flag ngrpo always
    writes is missing. The launch compares the result with OpenRLHF's parse (early_ray.take)."""
    import argparse
    from types import SimpleNamespace as NS

    class Parser(argparse.ArgumentParser):
        def error(self, message):  # a bad value is OpenRLHF's parser's to report, in the checks
            raise ValueError(message)

    parser = Parser(add_help=False)
    for flag in ("--actor.num_nodes", "--actor.num_gpus_per_node", "--vllm.num_engines", "--vllm.tensor_parallel_size"):
        parser.add_argument(flag, type=int)
    for group in ("ref", "critic"):
        parser.add_argument(f"--{group}.num_nodes", type=int, default=1)
        parser.add_argument(f"--{group}.num_gpus_per_node", type=int, default=8)
    parser.add_argument("--algo.kl.init_coef", type=float)
    parser.add_argument("--algo.advantage.estimator")
    parser.add_argument("--critic.model_name_or_path")
    try:
        got = vars(parser.parse_known_args(argv)[0])
    except ValueError:
        return None
    if None in (got["actor.num_nodes"], got["actor.num_gpus_per_node"], got["vllm.num_engines"],
                got["vllm.tensor_parallel_size"], got["algo.kl.init_coef"], got["algo.advantage.estimator"]):
        return None
    group = lambda name: NS(num_nodes=got[f"{name}.num_nodes"], num_gpus_per_node=got[f"{name}.num_gpus_per_node"])
    critic = group("critic")
    # OpenRLHF's rule: a critic only for gae, from the actor's model when none is named
    critic.model_name_or_path = (got["critic.model_name_or_path"] or "actor") if got["algo.advantage.estimator"] == "gae" else None
    args = NS(actor=group("actor"), ref=group("ref"), critic=critic,
              vllm=NS(num_engines=got["vllm.num_engines"], tensor_parallel_size=got["vllm.tensor_parallel_size"]),
              algo=NS(kl=NS(init_coef=got["algo.kl.init_coef"])))
    return logical_gpus_needed(args)


def run_openrlhf(argv: List[str], patch_config: PatchConfig) -> None:
    """Start Ray with ngrpo's worker hook and run OpenRLHF's launcher in this process."""
    from openrlhf_patch.cpu import cpu_mode
    from openrlhf_patch import install

    install.apply(patch_config, role="driver")
    args = parse_with_openrlhf(argv)
    # The launch log (pipelines/console.py) is the run's record: keep every worker's lines, which
    # Ray would otherwise fold into "[repeated Nx across cluster]" (Ray reads RAY_DEDUP_LOGS once,
    # at import, into this module constant).
    import ray._private.ray_logging  # noqa: F401 - what the entry resolves

    touchpoints.patch("ray._private.ray_logging.RAY_DEDUP_LOGS", os.environ.get("RAY_DEDUP_LOGS", "0") == "1",
                      reinstall=True)
    kwargs = ray_init_kwargs(patch_config, args)
    private_cpu_node = patch_config.device == "cpu" and kwargs.get("address") == "local"
    with cpu_mode.vllm_scratch_dir(kwargs["runtime_env"]["env_vars"]) if private_cpu_node else contextlib.nullcontext():
        _launch(argv, kwargs, patch_config)


def _launch(argv: List[str], kwargs: dict, patch_config: PatchConfig) -> None:
    import ray

    from openrlhf_patch.cpu import cpu_layout

    import signal

    main_thread = threading.current_thread() is threading.main_thread()
    sigterm = signal.getsignal(signal.SIGTERM) if main_thread else None
    early = early_ray.take(kwargs)  # the node `ngrpo train` started while it checked the command line
    if early is not None:
        early.init(kwargs)
        print("[ngrpo] Ray's node was started while the command line was checked", file=sys.stderr, flush=True)
    else:
        ray.init(**kwargs)
    if sigterm is _sigterm_as_interrupt:
        # ray.init gives a driver its own SIGTERM handler (sys.exit), which would end the launch as
        # "failed: SystemExit: 15" instead of interrupted with its checkpoint kept
        signal.signal(signal.SIGTERM, sigterm)
    try:
        lean = patch_config.device == "cpu" and cpu_layout.lean_layout()
        if lean:
            cpu_layout.run_trainer_in_driver(patch_config.seed)
            cpu_layout.freeze_imported_objects()
        # On a cluster the policy stays on the nodes Ray places it on.
        policy_here = cpu_layout.policy_in_driver() if lean and kwargs["address"] == "local" else contextlib.nullcontext()
        with policy_here, _argv(argv):
            runpy.run_module(OPENRLHF_MODULE, run_name="__main__")
    finally:
        ray.shutdown()
        if early is not None:
            early.release()


def write_training_file(problems, path: Path, abstention: bool = False) -> int:
    """The prompts OpenRLHF reads: the paper's full chat prompt (so no template is applied later);
    with ABSTENTION (UCPO, GRPO-UC) the prompt that offers \\boxed{\\text{I don't know}}."""
    from pipelines.datasets.data import write_jsonl_atomic

    write_jsonl_atomic(({"id": p["id"], "prompt": build_prompt(p["problem"], abstention), "answer": p["answer"],
                         "datasource": p.get("source") or "default"} for p in problems), path)
    return len(problems)


def planned_steps(manifest: dict) -> Optional[int]:
    """Training steps the run will make: --max-steps, capped by the data (no filtering assumed) and
    by --max-samples (a step generates at least prompts_per_step x samples_per_prompt responses, so
    the budget allows at most that many steps; a filter that drops groups ends it sooner)."""
    recipe = manifest.get("recipe") or {}
    prompts = max(recipe.get("prompts_per_step", 1), 1)
    per_episode = manifest.get("num_problems", 0) // prompts
    total = per_episode * recipe.get("episodes", 1) or None
    max_steps = manifest.get("max_steps")
    by_samples = None
    if manifest.get("max_samples"):
        per_step = prompts * max(recipe.get("samples_per_prompt", 1), 1)
        by_samples = -(-manifest["max_samples"] // per_step)
    return min(filter(None, (total, max_steps, by_samples)), default=None)


def generated_counts(run_dir, step: int) -> tuple:
    """(responses, response tokens) generated up to STEP: metrics.jsonl's cumulative
    ngrpo/generated_samples and ngrpo/generated_tokens at that step (0, 0 before the first)."""
    rows = [r for r in rundir.read_step_log(Path(run_dir) / rundir.METRICS).rows if r.get("step") == step]
    if step <= 0 or not rows:
        return 0, 0
    row = rows[-1]
    return tuple(int(round(row.get(key) or 0)) for key in ("ngrpo/generated_samples", "ngrpo/generated_tokens"))


def budget_spent(manifest: dict, run_dir, step: int) -> Optional[str]:
    """The --max-samples / --max-generated-tokens budget a run already used up at STEP, named; else None."""
    samples, tokens = generated_counts(run_dir, step)
    for flag, key, used in (("--max-samples", "max_samples", samples),
                            ("--max-generated-tokens", "max_generated_tokens", tokens)):
        if manifest.get(key) is not None and used >= manifest[key]:
            return f"{flag} {manifest[key]} ({used} generated)"
    return None


class RunFailed(RuntimeError):
    """A launch that did not train: the message says why, in one paragraph, and names the log."""


def root_cause(err: BaseException) -> BaseException:
    """The exception a Ray worker raised, under Ray's RayTaskError wrappers (one per actor hop)."""
    seen = set()
    while getattr(err, "cause", None) is not None and id(err) not in seen:
        seen.add(id(err))
        err = err.cause
    return err


def describe_failure(err: BaseException) -> str:
    from openrlhf_patch.engines import EngineDiedError, EngineStartError, engine_death
    from openrlhf_patch.reward_checks import RewardError

    cause = root_cause(err)
    if isinstance(cause, RewardError):
        return str(cause).strip()  # written for the user, with the reward file's own traceback
    if isinstance(cause, EngineStartError):
        return f"{type(cause).__name__}: {str(cause).strip()}"  # written for the user, with vLLM's reason
    died = str(cause).strip() if isinstance(cause, EngineDiedError) else engine_death(cause)
    if died:
        return died  # one line: "vLLM engine N died: " and Ray's cause
    lines = [line for line in str(cause).strip().splitlines() if line.strip()]
    return f"{type(cause).__name__}: {lines[-1] if lines else ''}"


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM (a scheduler stopping the job) ends the launch like Ctrl-C: Ray is shut down, the run
    is marked interrupted and keeps its last checkpoint."""
    import signal

    previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _sigterm_as_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def usable_checkpoint(run_dir, log=print) -> int:
    """The step to resume from: the `latest` checkpoint when every file of it loads, else the
    newest complete earlier one. The damaged one is moved to checkpoints/damaged/ (outside the
    folders OpenRLHF rotates, so nothing is deleted) and `latest` names the one used. 0 when
    there is no checkpoint at all."""
    from pipelines.export import ExportError, Source, check_deepspeed_files, checkpoint_zero_stage, safe_torch_load

    ckpt = Path(run_dir) / rundir.CHECKPOINTS
    roles = [d for d in (ckpt / "_actor", ckpt / "_critic") if d.is_dir()]
    latest = rundir.checkpoint_step(run_dir)
    if not roles or latest == 0:
        return 0

    def problem(step):
        for role in roles:
            src = Source("deepspeed", role, tag=f"global_step{step}", step=step)
            if not src.tag_dir.is_dir():
                return f"{src.tag_dir} is missing"
            try:
                check_deepspeed_files(src, checkpoint_zero_stage(src))
                for path in sorted(src.tag_dir.glob("*.pt")):
                    safe_torch_load(path, mmap=True)
            except ExportError as err:
                return str(err)
        return None

    why = problem(latest)
    if why is None:
        return latest
    steps = sorted({int(p.name[len("global_step"):]) for p in roles[0].glob("global_step*")
                    if p.name[len("global_step"):].isdigit() and int(p.name[len("global_step"):]) < latest}, reverse=True)
    fallback = next((s for s in steps if problem(s) is None), None)
    if fallback is None:
        raise RunFailed(f"the latest checkpoint (step {latest}) is damaged ({why}) and no earlier complete one is left; "
                        f"start the run again (ngrpo train --overwrite)")
    aside = ckpt / "damaged" / time.strftime("%Y%m%d-%H%M%S")
    for role in roles:
        damaged = role / f"global_step{latest}"
        if damaged.exists():
            (aside / role.name).mkdir(parents=True, exist_ok=True)
            damaged.rename(aside / role.name / damaged.name)
        (role / "latest").write_text(f"global_step{fallback}")
    log(f"the latest checkpoint (step {latest}) is damaged: {why}; resuming from the previous complete one, step "
        f"{fallback} (the damaged one is kept in {aside})")
    return fallback


def _copy_reward_file(run_dir: Path, manifest: dict, reward_file: str) -> None:
    """The launch keeps a copy of the user's reward file in the run, with its sha256 in the
    manifest: a resume runs that copy, never a path the manifest names (pipelines/launch/resume.py)."""
    import shutil

    from pipelines.launch.resume import sha256_file

    copy = run_dir / rundir.REWARD_COPY
    shutil.copyfile(reward_file, copy)
    manifest["reward_file"] = {"origin": str(reward_file), "sha256": sha256_file(copy)}


def _mark_failed(run_dir: Path, manifest: dict, error: str) -> None:
    manifest.update(status="failed", error=error, global_step=rundir.completed_steps(run_dir))
    rundir.write_manifest(run_dir, manifest)


def _fail_if_stalled(stall, run_dir: Path, manifest: dict) -> None:
    """When the stall watchdog stopped the launch: the run's leftover processes killed, the run
    marked failed, and RunFailed with the watchdog's one line."""
    stalled = stall.stop()
    if stalled:
        stall.reap()
        _mark_failed(run_dir, manifest, stalled)
        raise RunFailed(f"training failed: {stalled}") from None


def execute_run(run_dir, manifest: dict, resume: bool = False, verbose: bool = False,
                patch_config: Optional[PatchConfig] = None) -> dict:
    """Launch (or resume) the run of RUN_DIR's manifest; the manifest's status follows it.
    A resume gets PATCH_CONFIG and the manifest's command line as pipelines/launch/resume.py rebuilt
    them from the recorded recipe (never the stored settings as they are).
    Raises KeyboardInterrupt (Ctrl-C, SIGTERM) or RunFailed."""
    from pipelines.console import launch_console

    run_dir = Path(run_dir).resolve()
    argv = materialise_argv(manifest["openrlhf_argv"], run_dir)
    if resume and patch_config is None:
        raise ValueError("a resume runs the patch settings pipelines.launch.resume rebuilt, not the stored ones")
    patch_config = dataclasses.replace(patch_config or PatchConfig(**manifest["patch_config"]), run_dir=str(run_dir))
    if not resume and patch_config.reward_file and patch_config.reward_file != DEFAULT_REWARD_FILE:
        _copy_reward_file(run_dir, manifest, patch_config.reward_file)
    start = 0
    if resume:
        argv.append("--ckpt.load_enable")
        start = usable_checkpoint(run_dir, log=lambda msg: print(msg, file=sys.stderr))
        rundir.truncate_step_log(run_dir / rundir.METRICS, start)
        rundir.truncate_step_log(run_dir / rundir.EVAL_METRICS, start)
        rundir.truncate_step_log(run_dir / rundir.GROUPS, start)
        samples, tokens = generated_counts(run_dir, start)
        patch_config = dataclasses.replace(patch_config, start_step=start, start_generated_samples=samples,
                                           start_generated_tokens=tokens)
    (run_dir / rundir.PROGRESS).unlink(missing_ok=True)
    manifest.update(status="running", started=time.time(), error=None)
    rundir.write_manifest(run_dir, manifest)
    log = None
    from pipelines.launch import disk_full, watchdog

    # before launch_console takes the terminal: the watchdog warns there
    stall = watchdog.Watchdog(run_dir, watchdog.timeout_of(patch_config),
                              on_hard_stop=lambda line: _mark_failed(run_dir, manifest, line)).start()
    try:
        with sigterm_as_interrupt(), launch_console(run_dir, total_steps=planned_steps(manifest), start_step=start,
                                                    verbose=verbose) as log:
            manifest.setdefault("logs", []).append(str(log.relative_to(run_dir)))
            rundir.write_manifest(run_dir, manifest)
            stall.announce()
            from pipelines.launch import judge_server

            with judge_server.serving(patch_config, run_dir) as serving_config:  # SGPO's own judge, if asked
                run_openrlhf(argv, serving_config)
    except KeyboardInterrupt:
        _fail_if_stalled(stall, run_dir, manifest)
        manifest.update(status="interrupted", global_step=rundir.completed_steps(run_dir))
        rundir.write_manifest(run_dir, manifest)
        raise
    except BaseException as err:
        from openrlhf_patch.reward_checks import RewardError
        from pipelines.console import log_tail

        _fail_if_stalled(stall, run_dir, manifest)
        full = disk_full.diagnose(err, run_dir)
        if full is not None:  # one line; the manifest first (it has room kept), then the leftovers go
            _mark_failed(run_dir, manifest, full.message(run_dir))
            disk_full.clean_up(full, run_dir)
            raise RunFailed(f"training failed: {manifest['error']}") from None
        manifest.update(status="failed", error=describe_failure(err), global_step=rundir.completed_steps(run_dir))
        rundir.write_manifest(run_dir, manifest)
        # the error first; the end of the log only where the error is not already the user's own
        tail = "" if isinstance(root_cause(err), RewardError) or log is None else "\n" + log_tail(log)
        raise RunFailed(f"training failed: {manifest['error']}{tail}\n(full log: {log})") from err
    finally:
        stall.stop()
    completed = rundir.completed_steps(run_dir)
    if completed <= start:
        manifest.update(status="failed", error="no training step was made", global_step=completed)
        rundir.write_manifest(run_dir, manifest)
        raise RunFailed(f"training failed: OpenRLHF finished without making a training step (from step {start}); "
                        f"the data loader had no batch to give\n(full log: {log})")
    manifest.update(status="finished", finished=time.time(), global_step=completed)
    rundir.write_manifest(run_dir, manifest)
    return manifest
