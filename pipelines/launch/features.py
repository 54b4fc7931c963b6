"""OpenRLHF features under ngrpo's patch: each one tested, GPU-only, or refused before Ray starts.

Any OpenRLHF flag can follow `--` on `ngrpo train`. Most change sizes or schedules the patch does
not depend on; the ones below change how rollouts are made, rewarded, batched or synced, which the
patch (the estimator, the loss hook, the old-log-prob decision, the group filter, the reward
checks) does depend on. `check` runs in the preflight on the whole OpenRLHF command line (the
recipe's flags and the user's), and again on a resume's rebuilt one, before Ray's node starts:
a refusal is one line naming the flag and why. docs/FEATURES.md is this table for readers;
tests/test_openrlhf_features.py holds each row's test (and checks that every row names one).

Statuses: `tested` (a CPU training run of >= 2 steps with ngrpo's estimator checks it), `gpu-only`
(needs flash-attn's CUDA kernels: refused on CPU and on a GPU without a usable flash-attn; not
tested by this project, which has no GPU), `refused` (cannot work with the patch, or with OpenRLHF
0.11.2 as ngrpo runs it: refused everywhere).
"""
import dataclasses
import importlib.util
import json
import os
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence


class FeatureRefused(ValueError):
    """A flag ngrpo cannot run with its patch; the message is one line naming it and why."""


@dataclasses.dataclass(frozen=True)
class Feature:
    flag: str
    status: str  # tested | refused | gpu-only
    reason: str
    test: str    # in tests/test_openrlhf_features.py


# The value ngrpo gives OpenRLHF's --logger.wandb.key (which is what turns OpenRLHF's W&B logger on):
# never the key itself, which wandb reads from WANDB_API_KEY (OpenRLHF then skips its wandb.login).
# The command line is stored in the run's manifest and handed to W&B as the run's config.
WANDB_KEY_FROM_ENV = "env:WANDB_API_KEY"
WANDB_MODES_WITHOUT_KEY = ("offline", "disabled", "dryrun")

_FLASH_ATTN = ("OpenRLHF packs samples with flash-attention's varlen kernels: it sets attn_implementation "
               "flash_attention_2 and unpads with flash_attn.bert_padding (models/actor.py), which have no CPU "
               "implementation")

FEATURES = (
    Feature("--train.async_enable", "tested",
            "OpenRLHF's generator actor makes the next rollout while the trainer steps: rollouts are one step "
            "off-policy, so old log-probs always come from a separate policy forward (never reused); on CPU the "
            "run uses the upstream process layout (a trainer actor of its own), which the async trainer needs",
            "test_async_training_with_ngrpo_and_the_group_filter"),
    Feature("--ds.lora.rank", "refused",
            "OpenRLHF 0.11.2 syncs the LoRA-wrapped policy to vLLM under PEFT's parameter names "
            "(base_model.model...lora_A...), which vLLM rejects at the first weight sync ('There is no module or "
            "parameter named base_model', OpenRLHF issues #991 and #1081); ngrpo always generates with vLLM",
            "test_refused_before_ray[lora]"),
    Feature("--ds.packing_samples", "gpu-only", _FLASH_ATTN, "test_refused_before_ray[packing]"),
    Feature("--train.dynamic_batch_enable", "gpu-only",
            "OpenRLHF turns sample packing on with it (cli/train_ppo_ray.py), and packing needs flash-attention's "
            "varlen kernels", "test_refused_before_ray[dynamic_batch]"),
    Feature("--train.agent_func_path", "refused",
            "multi-turn agents: an agent's rewards come from the agent (OpenRLHF replaces the reward URL with "
            "'agent' and its agent executor returns them), so ngrpo's reward entry, its reward checks and its "
            "correctness-based group filter never see them", "test_refused_before_ray[agent]"),
    Feature("--ds.ring_attn_size", "refused",
            "ring attention shards each sequence over several GPUs and needs flash-attn and ring_flash_attn; "
            "nothing here has tested the patch's loss and clip measures on sequence-sharded log-probs",
            "test_refused_before_ray[ring_attention]"),
    Feature("--data.image_key", "refused",
            "vision-language training: ngrpo writes text-only prompts and its reward and filter grade text; "
            "the same for --data.max_images_per_prompt > 0, --actor.freeze_visual_encoder and a model whose "
            "config has a vision part (vision_config)", "test_refused_before_ray[image_key]"),
    Feature("--logger.wandb.key", "refused",
            "the W&B API key would be stored in the run's manifest and sent to W&B in the run's config: export "
            "WANDB_API_KEY and pass --wandb PROJECT", "test_refused_before_ray[wandb_key]"),
)

BY_FLAG = {f.flag: f for f in FEATURES}
_VLM_FLAGS = ("--data.image_key", "--data.max_images_per_prompt", "--actor.freeze_visual_encoder")
_WANDB_ONLY = ("--logger.wandb.project", "--logger.wandb.group", "--logger.wandb.org")
_KNOWN = tuple(BY_FLAG) + _VLM_FLAGS + _WANDB_ONLY


def flag_values(argv: Sequence[str]) -> Dict[str, List[str]]:
    """{flag: its values at its last occurrence} (argparse keeps the last one), an abbreviation of
    one of the flags here read as that flag."""
    from pipelines.launch.resume import flag_values as read

    return read(list(argv), known=_KNOWN, last_only=True)


def _int(values: List[str], default: int) -> int:
    try:
        return int(values[-1]) if values else default
    except ValueError:
        return default  # OpenRLHF's parser reports a bad number


def _refuse(flag: str, why: str, value: Optional[str] = None) -> None:
    shown = f"{flag} {value}" if value is not None else flag
    raise FeatureRefused(f"{shown}: {why}")


def model_has_vision(model_path: str) -> bool:
    """OpenRLHF's own test (utils.is_vlm_model: the model's config has a vision_config), read from
    its config.json: no transformers import before Ray's node starts."""
    config = Path(model_path) / "config.json"
    try:
        return "vision_config" in json.loads(config.read_text())
    except (OSError, ValueError):
        return False


def check(argv: Sequence[str], *, device: str, model_path: Optional[str] = None,
          flash_attn_usable: Optional[Callable[[], bool]] = None, log: Callable[[str], None] = print,
          environ=os.environ) -> None:
    """Refuse (FeatureRefused, one line) what ARGV, OpenRLHF's whole command line, asks for that
    cannot run with the patch on DEVICE. An async CPU run gets the upstream process layout
    (NGRPO_CPU_LAYOUT=upstream in ENVIRON, which the run's Ray processes inherit), said in LOG."""
    flags = flag_values(argv)
    on = lambda flag: flag in flags  # noqa: E731

    if _int(flags.get("--ds.lora.rank", []), 0) > 0:
        _refuse("--ds.lora.rank", BY_FLAG["--ds.lora.rank"].reason, flags["--ds.lora.rank"][-1])
    if on("--train.agent_func_path"):
        _refuse("--train.agent_func_path", BY_FLAG["--train.agent_func_path"].reason)
    if _int(flags.get("--ds.ring_attn_size", []), 1) > 1:
        _refuse("--ds.ring_attn_size", BY_FLAG["--ds.ring_attn_size"].reason, flags["--ds.ring_attn_size"][-1])
    vlm = "vision-language training: ngrpo writes text-only prompts and its reward and group filter grade text"
    if on("--data.image_key"):
        _refuse("--data.image_key", vlm)
    if _int(flags.get("--data.max_images_per_prompt", []), 0) > 0:
        _refuse("--data.max_images_per_prompt", vlm, flags["--data.max_images_per_prompt"][-1])
    if on("--actor.freeze_visual_encoder"):
        _refuse("--actor.freeze_visual_encoder", vlm)
    if model_path and model_has_vision(model_path):
        raise FeatureRefused(f"{model_path}: a vision-language model (its config has a vision_config); {vlm}")
    for flag in ("--ds.packing_samples", "--train.dynamic_batch_enable"):
        if not on(flag):
            continue
        if device == "cpu":
            also = " (ngrpo's --packing sets it)" if flag == "--ds.packing_samples" else ""
            _refuse(flag, f"GPU-only: {BY_FLAG[flag].reason}, and there is no flash-attn on CPU: leave it out{also}")
        usable = flash_attn_usable or _flash_attn_usable
        if not usable():
            _refuse(flag, f"needs a flash-attn built for the installed torch (none is usable here): "
                          f"{BY_FLAG[flag].reason}; leave it out to train with sdpa attention and padded micro-batches")
    _check_wandb(flags, environ)
    if on("--train.async_enable") and device == "cpu":
        from openrlhf_patch.cpu.cpu_layout import LAYOUT_ENV

        if environ.get(LAYOUT_ENV, "") == "lean":
            _refuse("--train.async_enable", f"OpenRLHF's async trainer is a Ray actor of its own, which cannot drive "
                                            f"a policy held in the driver ({LAYOUT_ENV}=lean): unset {LAYOUT_ENV}")
        if environ.get(LAYOUT_ENV) != "upstream":
            environ[LAYOUT_ENV] = "upstream"
            log(f"--train.async_enable: CPU mode uses the upstream process layout ({LAYOUT_ENV}=upstream: a trainer "
                "and a policy actor of their own), which OpenRLHF's async trainer needs")


def _check_wandb(flags: Dict[str, List[str]], environ) -> None:
    key = flags.get("--logger.wandb.key")
    if key is not None and key != [WANDB_KEY_FROM_ENV]:
        raise FeatureRefused(f"--logger.wandb.key: {BY_FLAG['--logger.wandb.key'].reason}")
    if key is None:
        for flag in _WANDB_ONLY:
            if flag in flags:
                raise FeatureRefused(f"{flag}: OpenRLHF's W&B logger is off without a key; turn it on with "
                                     "--wandb PROJECT (the key comes from WANDB_API_KEY)")
        return
    if importlib.util.find_spec("wandb") is None:
        raise FeatureRefused("--wandb: the wandb package is not installed in this environment "
                             "(pip install wandb, or rerun install.sh)")
    mode = environ.get("WANDB_MODE", "").strip().lower()
    if not environ.get("WANDB_API_KEY") and mode not in WANDB_MODES_WITHOUT_KEY:
        raise FeatureRefused("--wandb: set WANDB_API_KEY to your W&B API key (ngrpo reads it from the environment "
                             "only, and stores it nowhere), or WANDB_MODE=offline to log to RUN_DIR/wandb/ only")


def _flash_attn_usable() -> bool:
    from pipelines.launch import gpu_run

    return gpu_run.flash_attn_usable()
