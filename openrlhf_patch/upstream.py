"""Every OpenRLHF name ngrpo wraps, replaces or relies on: the one list to read when porting.

The driver runs `check()` in `install.apply()` after the version check; a worker checks a module's
names when it imports that module, right before patching it (`checked`; on a cluster a node may
have another OpenRLHF than the driver). A name that moved or vanished in another OpenRLHF version
is reported at once, naming what is missing, instead of failing deep inside a worker or, worse,
leaving a patch silently inactive.
"""
import importlib
from typing import List, NamedTuple


class Symbol(NamedTuple):
    module: str
    attribute: str   # dotted inside the module: "Class.method"
    role: str        # wrapped | replaced | subclassed | called | run


SYMBOLS = (
    # openrlhf_patch/hooks.py
    Symbol("openrlhf.trainer.ppo_utils.experience_maker", "RemoteExperienceMaker.compute_advantages_and_returns",
           "wrapped"),
    Symbol("openrlhf.trainer.ppo_utils.experience_maker", "RemoteExperienceMaker.get_cumulative_returns", "called"),
    Symbol("openrlhf.trainer.ppo_utils.experience", "make_experience_batch", "called"),
    Symbol("openrlhf.trainer.ppo_utils.experience", "split_experience_batch", "called"),
    Symbol("openrlhf.models.utils", "compute_reward", "called"),
    Symbol("openrlhf.trainer.ppo_utils.length_penalty", "apply_length_penalties", "called"),
    Symbol("openrlhf.trainer.ray.ppo_actor", "PolicyLoss", "subclassed"),
    Symbol("openrlhf.trainer.ray.ppo_actor", "ActorPPOTrainer.training_step", "wrapped"),
    Symbol("openrlhf.trainer.ray.ppo_actor", "ActorPPOTrainer._init_vllm_sync_group", "wrapped"),
    Symbol("openrlhf.trainer.ppo_trainer", "TensorboardLogger", "subclassed"),
    Symbol("openrlhf.trainer.ppo_utils.samples_generator", "SamplesGenerator.generate_samples", "wrapped"),
    Symbol("openrlhf.trainer.ppo_utils.samples_generator", "SamplesGenerator._generate_vllm", "replaced"),
    Symbol("openrlhf.trainer.ppo_utils.samples_generator", "SamplesGenerator._dispatch_prompts_to_vllm",
           "wrapped"),  # and called by hooks.py; tokenizer_once.py wraps it
    Symbol("openrlhf.trainer.ppo_utils.samples_generator", "SamplesGenerator._process_response_into_experience",
           "called"),
    Symbol("openrlhf.trainer.ppo_utils.samples_generator", "_collect_prompt_batch", "called"),
    Symbol("openrlhf.utils.deepspeed.deepspeed", "get_train_ds_config", "wrapped"),
    # openrlhf_patch/old_log_probs.py
    Symbol("openrlhf.trainer.ppo_utils.experience_maker", "RemoteExperienceMaker.make_experience_batch", "wrapped"),
    Symbol("openrlhf.trainer.ppo_utils.experience_maker", "RemoteExperienceMaker.split_rollout_samples", "called"),
    Symbol("openrlhf.trainer.ppo_utils.experience_maker", "RemoteExperienceMaker.make_experience", "called"),
    Symbol("openrlhf.trainer.ppo_utils.experience_maker", "RemoteExperienceMaker._dispatch_forward", "replaced"),
    Symbol("openrlhf.trainer.ppo_utils.experience_maker", "RemoteExperienceMaker._flatten_results", "called"),
    Symbol("openrlhf.trainer.ray.ppo_actor", "ActorPPOTrainer.ppo_train", "wrapped"),
    # openrlhf_patch/cpu_mode.py
    Symbol("openrlhf.utils.distributed_util", "stateless_init_process_group", "replaced"),
    Symbol("openrlhf.trainer.ray.ppo_actor", "stateless_init_process_group", "replaced"),
    Symbol("openrlhf.trainer.ray.ppo_actor", "ActorPPOTrainer.broadcast_to_vllm", "wrapped"),
    Symbol("openrlhf.trainer.ray.ppo_actor", "torch_dist_barrier_and_cuda_sync", "called"),
    Symbol("openrlhf.trainer.ppo_utils.replay_buffer", "NaiveReplayBuffer.__init__", "wrapped"),
    Symbol("openrlhf.utils.deepspeed.deepspeed", "init_device_mesh", "wrapped"),
    # pipelines/training.py and pipelines/warmup.py
    Symbol("openrlhf.cli.train_ppo_ray", "train", "run"),
    Symbol("openrlhf.utils.config", "hierarchize", "wrapped"),
    Symbol("openrlhf.cli.train_sft", "train", "run"),
)


def missing(symbols=SYMBOLS) -> List[str]:
    """'module: attribute (role)' for every symbol that cannot be found."""
    out = []
    for sym in symbols:
        try:
            obj = importlib.import_module(sym.module)
            for part in sym.attribute.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as err:
            out.append(f"{sym.module}: {sym.attribute} ({sym.role}; {type(err).__name__})")
    return out


class UpstreamMismatch(RuntimeError):
    pass


def check(symbols=SYMBOLS) -> None:
    gone = missing(symbols)
    if gone:
        raise UpstreamMismatch("this OpenRLHF lacks what ngrpo's patch relies on (openrlhf_patch/upstream.py):\n  "
                               + "\n  ".join(gone))


def checked(module_name: str, patch):
    """PATCH(module), preceded by the check of every name of SYMBOLS in that module."""

    def check_then_patch(module):
        check([s for s in SYMBOLS if s.module == module_name])
        patch(module)

    return check_then_patch


def patch_on_import(patches: dict) -> None:
    """Each patch of {module: patch} when its module is imported (openrlhf_patch/on_import.py),
    right after the check of that module's names."""
    from openrlhf_patch.on_import import when_imported

    for module, patch in patches.items():
        when_imported(module, checked(module, patch))
