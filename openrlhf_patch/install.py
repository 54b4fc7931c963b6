"""Putting the patch into OpenRLHF, in the driver and in every Ray worker.

`apply(config)` is idempotent and is called
  * in the driver, before OpenRLHF's launcher runs, and
  * in every Ray worker process through `worker_setup`, which `ray.init(runtime_env=
    {"worker_process_setup_hook": "openrlhf_patch.install.worker_setup"})` runs at worker start.
The worker is where it matters: advantages are computed in the PPOTrainer actor and the loss in
PolicyModelActor, so a driver-only patch would never take effect.
"""
import os
import sys

from openrlhf_patch import config as patch_config
from openrlhf_patch.config import PatchConfig

# Versions whose internals (method names, signatures) the hooks were written and tested against.
SUPPORTED_OPENRLHF_VERSIONS = ("0.11.2",)
HOOK = "openrlhf_patch.install.worker_setup"

_state = {"applied": None}


class UnsupportedOpenRLHFVersion(RuntimeError):
    pass


class CudaInitialisedInHook(RuntimeError):
    pass


def check_openrlhf_version(version=None) -> str:
    if version is None:
        from importlib.metadata import PackageNotFoundError, version as dist_version

        try:
            version = dist_version("openrlhf")
        except PackageNotFoundError:
            raise UnsupportedOpenRLHFVersion(
                "openrlhf is not installed: run `bash install.sh` (CPU) or `NGRPO_PROFILE=gpu bash install.sh`"
            )
    if version not in SUPPORTED_OPENRLHF_VERSIONS:
        raise UnsupportedOpenRLHFVersion(
            f"openrlhf {version} is not supported by this ngrpo: its patch was written and tested against "
            f"openrlhf {', '.join(SUPPORTED_OPENRLHF_VERSIONS)}. Install that version "
            f"(pip install --no-deps openrlhf=={SUPPORTED_OPENRLHF_VERSIONS[-1]}); other versions may "
            "compute advantages elsewhere, and a silently inactive patch would train plain GRPO."
        )
    return version


def apply(config: PatchConfig = None, role: str = "driver") -> PatchConfig:
    """Patch OpenRLHF in this process with CONFIG (else the one in the environment). Returns the
    active config; a second call is a no-op."""
    if _state["applied"] is not None:
        return _state["applied"]
    config = config or PatchConfig.from_env()
    if config is None:
        raise RuntimeError(f"openrlhf_patch.install.apply() needs the run's PatchConfig (or {patch_config.ENV_VAR} set)")
    check_openrlhf_version()
    from openrlhf_patch.cpu import cpu_mode
    from openrlhf_patch import upstream

    # First: OpenRLHF imports flash_attn at module level (the stub goes in only where it is missing).
    cpu_mode.ensure_flash_attn_importable()
    if role == "driver":
        upstream.check()  # the driver imports every module of the list anyway: report all at once
    patch_config.activate(config)
    if config.device == "cpu":
        cpu_mode.apply_cpu_patches()
    upstream.patch_on_import(HOOK_PATCHES)
    from openrlhf_patch import remote_code

    remote_code.install(config.trust_remote_code)  # OpenRLHF hard-codes trust_remote_code=True
    if config.reproducible_rollouts:  # after HOOK_PATCHES: it wraps whichever generation loop runs
        from openrlhf_patch import reproducible_rollouts

        upstream.patch_on_import(reproducible_rollouts.patches(config.seed or 0))

    _state["applied"] = config
    print(
        f"[ngrpo] patch active in {role} pid {os.getpid()}{_node()}: estimator={config.estimator or 'openrlhf'} "
        f"options={config.estimator_options} group_filter={config.group_filter} device={config.device} "
        f"trust_remote_code={config.trust_remote_code}",
        file=sys.stderr,
        flush=True,
    )
    return config


_EM = "openrlhf.trainer.ppo_utils.experience_maker.RemoteExperienceMaker"
_AT = "openrlhf.trainer.ray.ppo_actor.ActorPPOTrainer"
_SG = "openrlhf.trainer.ppo_utils.samples_generator.SamplesGenerator"


def _wrap(target: str, owner, make) -> None:
    """Install MAKE(OWNER's current TARGET attribute) through the touchpoint table, as the entry of
    the calling _patch_* function (it raises, naming the target, when upstream has renamed it; a
    second apply finds its marker and changes nothing)."""
    from openrlhf_patch import touchpoints

    site = f"openrlhf_patch/install.py:{sys._getframe(1).f_code.co_name}"
    touchpoints.patch(target, make(getattr(owner, target.rsplit(".", 1)[1])), owner=owner, site=site)


def _patch_experience_maker(experience_maker):
    from openrlhf_patch import advantages, old_log_probs

    maker = experience_maker.RemoteExperienceMaker
    _wrap(f"{_EM}.compute_advantages_and_returns", maker, advantages.wrap_compute_advantages)
    _wrap(f"{_EM}.make_experience_batch", maker, old_log_probs.wrap_make_experience_batch)


def _patch_ppo_actor(ppo_actor):
    from openrlhf_patch import engines, heartbeat, old_log_probs, policy_loss

    # ActorPPOTrainer builds its loss from the name imported into ppo_actor.
    _wrap("openrlhf.trainer.ray.ppo_actor.PolicyLoss", ppo_actor, policy_loss.make_policy_loss_class)
    trainer = ppo_actor.ActorPPOTrainer
    _wrap(f"{_AT}.training_step", trainer, policy_loss.wrap_training_step)
    _wrap(f"{_AT}.ppo_train", trainer, old_log_probs.wrap_ppo_train)
    _wrap(f"{_AT}._init_vllm_sync_group", trainer, engines.wrap_init_vllm_sync_group)
    # two layers: the heartbeat of a weight sync, and a dead engine named
    _wrap(f"{_AT}.broadcast_to_vllm", trainer, lambda upstream: engines.wrap_engine_calls(
        heartbeat.wrap_with_heartbeat(upstream, "weight sync", after="step end")))
    if patch_config.active().uniform_groups != "keep":  # keep: OpenRLHF's training step, nothing installed
        from openrlhf_patch import uniform_groups

        uniform_groups.patch_ppo_actor(ppo_actor)


def _patch_ppo_trainer(ppo_trainer):
    from openrlhf_patch import run_logger

    # The trainer builds its TensorBoard logger from the name imported into ppo_trainer.
    _wrap("openrlhf.trainer.ppo_trainer.TensorboardLogger", ppo_trainer, run_logger.make_run_logger_class)


def _patch_samples_generator(samples_generator):
    from openrlhf_patch import engines, heartbeat, sampling
    from openrlhf_patch.cpu import speedups, tokenizer_once

    generator = samples_generator.SamplesGenerator
    # two layers: --max-steps and the budgets, progress and heartbeat; and a dead engine named
    _wrap(f"{_SG}.generate_samples", generator,
          lambda upstream: engines.wrap_engine_calls(sampling.wrap_generate_samples(upstream)))
    if speedups.on("tokenizer-once"):
        _wrap(f"{_SG}._dispatch_prompts_to_vllm", generator, tokenizer_once.wrap_dispatch_prompts)
    # every response processed (training rollouts and validation alike) is progress for the watchdog
    _wrap(f"{_SG}._process_response_into_experience", generator,
          lambda upstream: heartbeat.wrap_with_heartbeat(upstream, "generation"))
    # ngrpo's refill loop only where a group filter needs it: without one, OpenRLHF's own loop
    # generates (the rewards are checked before the advantages, advantages.wrap_compute_advantages).
    # SGPO grades all-wrong groups there too (it sees each group whole, before the advantages).
    wanted = patch_config.active().group_filter != "none" or bool(patch_config.active().sgpo)
    if wanted:  # a second apply finds the replacement in place (its touchpoint marker)
        _wrap(f"{_SG}._generate_vllm", generator, lambda upstream: sampling.make_generate_vllm())


def _patch_deepspeed_strategy(ds_strategy):
    from openrlhf_patch import optimizer

    # DeepspeedStrategy builds its DeepSpeed config from the name imported into its module.
    _wrap("openrlhf.utils.deepspeed.deepspeed.get_train_ds_config", ds_strategy, optimizer.wrap_train_ds_config)


# module -> ngrpo's hook patch, applied when (if ever) the process imports it: the vLLM rollout
# actor never imports the PPO actor or DeepSpeed, the policy actor never the trainer.
HOOK_PATCHES = {
    "openrlhf.trainer.ppo_utils.experience_maker": _patch_experience_maker,
    "openrlhf.trainer.ray.ppo_actor": _patch_ppo_actor,
    "openrlhf.trainer.ppo_trainer": _patch_ppo_trainer,
    "openrlhf.trainer.ppo_utils.samples_generator": _patch_samples_generator,
    "openrlhf.utils.deepspeed.deepspeed": _patch_deepspeed_strategy,
}


def _node() -> str:
    """' on node ID' inside a Ray worker (which node of a cluster the patch runs on), else ''."""
    try:
        import ray

        return f" on node {ray.get_runtime_context().get_node_id()}" if ray.is_initialized() else ""
    except Exception:  # noqa: BLE001 - a log detail only
        return ""


def worker_setup() -> None:
    """Ray's worker_process_setup_hook: runs once in every worker process of the run."""
    config = PatchConfig.from_env()
    if config is not None:
        apply(config, role="ray-worker")
        if config.seed is not None:
            # OpenRLHF's PPOTrainer actor has no torch.distributed group, so its prompt loader
            # falls back to an unseeded RandomSampler: without this the data order differs
            # between two runs with the same --seed (resume is unaffected: the loader's state
            # is checkpointed).
            import torch

            torch.manual_seed(config.seed)  # lazy for CUDA: queued until CUDA is initialised
        check_cuda_uninitialised()


def check_cuda_uninitialised() -> None:
    """The hook must leave CUDA alone: Ray runs it before it sets CUDA_VISIBLE_DEVICES, so a CUDA
    context made here would see (and could allocate on) every GPU of the node, and the worker
    would keep that view for good."""
    import torch

    if torch.cuda.is_initialized():
        raise CudaInitialisedInHook(
            "ngrpo's Ray worker hook (openrlhf_patch.install.worker_setup) initialised CUDA, before Ray set "
            "CUDA_VISIBLE_DEVICES for this worker. Something that openrlhf_patch.install.apply() imports or runs "
            "made a CUDA call (a tensor on cuda, torch.cuda.current_device(), a CUDA RNG seed): move it out of the "
            "hook, into code that runs inside the Ray actor. GPU runs also need PYTORCH_NVML_BASED_CUDA_CHECK=1 "
            "in the Ray runtime env (pipelines.launch.gpu_run.GPU_WORKER_ENV), so that torch.cuda.is_available() does not "
            "initialise the CUDA driver either."
        )


def active_config():
    """The config this process was patched with (None if unpatched); for probes and tests."""
    return _state["applied"]
