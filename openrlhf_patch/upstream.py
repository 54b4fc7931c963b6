"""Every OpenRLHF name ngrpo wraps, replaces or relies on: the one list to read when porting.

Two tables:
  * SYMBOLS, the names: one that moved or vanished in another OpenRLHF version is reported at
    once, naming what is missing, instead of failing deep inside a worker or, worse, leaving a
    patch silently inactive;
  * COPIES, the upstream bodies ngrpo carries a copy (or a port) of, each with the sha256 of
    upstream's source text as installed when the copy was made (OpenRLHF 0.11.2). A name can stay
    while its body changes: then ngrpo's copy would quietly run the old algorithm. A changed hash
    names the function and the copy to port again.

The driver runs `check()` in `install.apply()` after the version check; a worker checks a module's
names and copies when it imports that module, right before patching it (`checked`; on a cluster a
node may have another OpenRLHF than the driver).

The hashed text is read from the installed module's file, not from the live object (ngrpo's
patches replace some of these functions in place, and a worker checks a module again after the
first of its patches): the function's lines, decorators included, as `inspect.getsource` gives
them for the unpatched function, dedented (textwrap.dedent) with trailing whitespace stripped
(`normalised_source`).
"""
import ast
import hashlib
import importlib
import inspect
import textwrap
from typing import Dict, List, NamedTuple, Optional


class Symbol(NamedTuple):
    module: str
    attribute: str   # dotted inside the module: "Class.method"
    role: str        # wrapped | replaced | subclassed | called | run


SYMBOLS = (
    # openrlhf_patch/advantages.py, policy_loss.py, sampling.py, run_logger.py, engines.py
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
           "wrapped"),  # and called by sampling.py; cpu/tokenizer_once.py wraps it
    Symbol("openrlhf.trainer.ppo_utils.samples_generator", "SamplesGenerator._process_response_into_experience",
           "wrapped"),  # a heartbeat per response; and called by sampling.py
    Symbol("openrlhf.trainer.ppo_utils.samples_generator", "_collect_prompt_batch", "called"),
    Symbol("openrlhf.utils.deepspeed.deepspeed", "get_train_ds_config", "wrapped"),
    # openrlhf_patch/old_log_probs.py
    Symbol("openrlhf.trainer.ppo_utils.experience_maker", "RemoteExperienceMaker.make_experience_batch", "wrapped"),
    # these two on the instance, while make_experience_batch runs without the policy's forward
    Symbol("openrlhf.trainer.ppo_utils.experience_maker", "RemoteExperienceMaker.make_experience", "wrapped"),
    Symbol("openrlhf.trainer.ppo_utils.experience_maker", "RemoteExperienceMaker._dispatch_forward", "wrapped"),
    Symbol("openrlhf.trainer.ray.ppo_actor", "ActorPPOTrainer.ppo_train", "wrapped"),
    # openrlhf_patch/cpu/cpu_mode.py
    Symbol("openrlhf.utils.distributed_util", "stateless_init_process_group", "replaced"),
    Symbol("openrlhf.trainer.ray.ppo_actor", "stateless_init_process_group", "replaced"),
    Symbol("openrlhf.trainer.ray.ppo_actor", "ActorPPOTrainer.broadcast_to_vllm", "wrapped"),  # and heartbeat.py's heartbeat
    Symbol("openrlhf.trainer.ray.ppo_actor", "torch_dist_barrier_and_cuda_sync", "called"),
    Symbol("openrlhf.trainer.ppo_utils.replay_buffer", "NaiveReplayBuffer.__init__", "wrapped"),
    Symbol("openrlhf.utils.deepspeed.deepspeed", "init_device_mesh", "wrapped"),
    # openrlhf_patch/cpu/cpu_layout.py and openrlhf_patch/cpu/cpu_vllm_worker.py
    Symbol("openrlhf.trainer.ray.launcher", "RayActorGroup._initiate_actors", "wrapped"),
    Symbol("openrlhf.trainer.ppo_trainer", "PPOTrainer", "replaced"),
    Symbol("openrlhf.trainer.ray.vllm_worker_wrap", "WorkerWrap", "replaced"),  # by name: cpu_mode.py
    # openrlhf_patch/remote_code.py: trust_remote_code as the run decided it, not upstream's True
    Symbol("openrlhf.utils.utils", "AutoTokenizer", "wrapped"),
    Symbol("openrlhf.utils.utils", "is_vlm_model", "replaced"),
    Symbol("openrlhf.utils.utils", "get_tokenizer", "called"),
    Symbol("openrlhf.models.actor", "AutoModelForCausalLM", "wrapped"),
    Symbol("openrlhf.models.actor", "AutoModelForImageTextToText", "wrapped"),
    Symbol("openrlhf.models.model", "AutoConfig", "wrapped"),
    Symbol("openrlhf.trainer.ray.vllm_engine", "RolloutRayActor", "wrapped"),
    Symbol("openrlhf.trainer.ray.vllm_engine", "create_vllm_engines", "called"),
    # pipelines/launch/training.py and pipelines/launch/warmup.py
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


class Copy(NamedTuple):
    module: str
    qualname: str  # dotted inside the module: "Class.method"
    ngrpo: str     # ngrpo's copy (or the code that depends on this body): what to port again
    sha256: str    # of upstream's normalised source, OpenRLHF 0.11.2


COPIES = (
    Copy("openrlhf.trainer.ppo_utils.experience_maker", "RemoteExperienceMaker.compute_advantages_and_returns",
         "openrlhf_patch/advantages.py: _core_advantages",
         "12128e83ceac9ad99bf65242cd41937eba2daa8a22d2ac1fb88ca24105be62b7"),
    Copy("openrlhf.trainer.ppo_utils.samples_generator", "SamplesGenerator._generate_vllm",
         "openrlhf_patch/sampling.py: make_generate_vllm",
         "e247285073a12d7a9d1ef8b6b792735dac3416453a6d901a69eecc60a6eb04b6"),
    # The policy's log-probs are NaN stand-ins where reuse skips its forward: what make_experience
    # computes from them decides which settings deferral_blocker must refuse.
    Copy("openrlhf.trainer.ppo_utils.experience_maker", "RemoteExperienceMaker.make_experience",
         "openrlhf_patch/old_log_probs.py: deferral_blocker and _policy_forward_left_out (what reads the "
         "policy's log-probs)",
         "b9aad8fe97a836d45d94c8165d30ff49b46bc11c5491ef6b87cba6ade8e74d22"),
    Copy("openrlhf.trainer.ray.ppo_actor", "ActorPPOTrainer.broadcast_to_vllm",
         "openrlhf_patch/cpu/cpu_mode.py: broadcast_to_vllm_in_buckets (its gloo path)",
         "008380438e5ac7e368cb93eeba196f3528690b15cf5d66cb4f1674b9cea3a76e"),
    Copy("openrlhf.trainer.ray.vllm_worker_wrap", "WorkerWrap.init_process_group",
         "openrlhf_patch/cpu/cpu_vllm_worker.py: CPUWorkerWrap.init_process_group",
         "5287f1c43b6186861bed45bd53efb24d8e22f58f83805775bdf7ed0bb7328a96"),
    Copy("openrlhf.trainer.ray.vllm_worker_wrap", "WorkerWrap.update_weight",
         "openrlhf_patch/cpu/cpu_vllm_worker.py: CPUWorkerWrap.update_weight",
         "8cae8477f5ac204c259ea76ec86524d6c210bfd8375ae37de8cd69d46f4dbfd9"),
    Copy("openrlhf.trainer.ray.launcher", "RayActorGroup._initiate_actors",
         "openrlhf_patch/cpu/cpu_layout.py: _patch_actor_groups (how rank 0 of the policy is built)",
         "f312a900f770a5da334a7c80d30d04efa79f0e1bbb1ebd60afa44da8de4c2328"),
    Copy("openrlhf.utils.utils", "is_vlm_model",
         "openrlhf_patch/remote_code.py: make_is_vlm_model",
         "40700cf9728470079810692d548b0d966901a702743582f1bc9a2a7f2ebd01c3"),
)


def normalised_source(text: str) -> str:
    """TEXT dedented, each line's trailing whitespace stripped, without leading or trailing blank
    lines: what the hashes are taken of."""
    lines = [line.rstrip() for line in textwrap.dedent(text).splitlines()]
    return "\n".join(lines).strip("\n") + "\n"


def source_sha256(text: str) -> str:
    return hashlib.sha256(normalised_source(text).encode("utf-8")).hexdigest()


def _definition(tree: ast.AST, qualname: str):
    node = tree
    for part in qualname.split("."):
        for child in getattr(node, "body", []):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and child.name == part:
                node = child
                break
        else:
            return None
    return node


def installed_source(module_name: str, qualname: str, _parsed: Optional[Dict[str, tuple]] = None) -> str:
    """The source of QUALNAME (decorators included) as written in the installed MODULE_NAME's file:
    what `inspect.getsource` gives for the unpatched function. Raises LookupError naming what
    cannot be found or read."""
    parsed = {} if _parsed is None else _parsed  # module -> (text, tree), within one check
    if module_name not in parsed:
        try:
            text = inspect.getsource(importlib.import_module(module_name))
        except (ImportError, OSError, TypeError) as err:
            raise LookupError(f"the source of {module_name} cannot be read ({type(err).__name__}: {err})") from None
        parsed[module_name] = (text, ast.parse(text))
    text, tree = parsed[module_name]
    node = _definition(tree, qualname)
    if node is None:
        raise LookupError(f"{module_name} defines no {qualname}")
    first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    return "\n".join(text.splitlines()[first - 1:node.end_lineno]) + "\n"


def changed(copies=None) -> List[str]:
    """One message for every entry of COPIES whose upstream source is not the one ngrpo's copy was
    made from (or cannot be found)."""
    copies = COPIES if copies is None else copies
    out, parsed = [], {}
    for copy in copies:
        name = f"{copy.module}: {copy.qualname}"
        try:
            digest = source_sha256(installed_source(copy.module, copy.qualname, parsed))
        except LookupError as err:
            out.append(f"{name}: {err}; ngrpo's copy in {copy.ngrpo} must be ported again")
            continue
        if digest != copy.sha256:
            out.append(f"{name}: the upstream source changed (sha256 {digest}, ngrpo's copy was made from "
                       f"{copy.sha256}): port ngrpo's copy in {copy.ngrpo} again from the new source, then "
                       "record the new hash in openrlhf_patch/upstream.py COPIES")
    return out


class UpstreamMismatch(RuntimeError):
    pass


def check(symbols=None, copies=None) -> None:
    """UpstreamMismatch listing every name of SYMBOLS this OpenRLHF lacks and every body of COPIES
    whose source changed (by default all of both)."""
    gone = missing(SYMBOLS if symbols is None else symbols)
    moved = changed(copies)
    problems = []
    if gone:
        problems.append("this OpenRLHF lacks what ngrpo's patch relies on (openrlhf_patch/upstream.py):\n  "
                        + "\n  ".join(gone))
    if moved:
        problems.append("this OpenRLHF's source differs from what ngrpo copied (openrlhf_patch/upstream.py "
                        "COPIES):\n  " + "\n  ".join(moved))
    if problems:
        raise UpstreamMismatch("\n".join(problems))


def checked(module_name: str, patch):
    """PATCH(module), preceded by the check of every name of SYMBOLS and every body of COPIES in
    that module."""

    def check_then_patch(module):
        check([s for s in SYMBOLS if s.module == module_name], [c for c in COPIES if c.module == module_name])
        patch(module)

    return check_then_patch


def patch_on_import(patches: dict) -> None:
    """Each patch of {module: patch} when its module is imported (openrlhf_patch/on_import.py),
    right after the check of that module's names and copied bodies."""
    from openrlhf_patch.on_import import when_imported

    for module, patch in patches.items():
        when_imported(module, checked(module, patch))
