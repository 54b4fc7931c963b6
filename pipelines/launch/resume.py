"""`ngrpo train --resume`: a run directory is data, not instructions.

A run directory can be copied, shared or edited by anyone, so a resume does not replay what its
manifest says to run. It rebuilds OpenRLHF's command line from the recorded recipe and settings
(pipelines.launch.training.build_openrlhf_argv, as the first launch did), and refuses, naming the field,
every path that would make the resume read or write outside the run directory:

* the paths ngrpo's own flags name (data, checkpoints, TensorBoard, final model) must resolve
  inside the run, symlinks included, and so must every file under checkpoints/;
* the user's OpenRLHF flags after `--` (recorded at launch) may name paths only inside the run;
* the one path outside is the recorded base model, checked again for custom code
  (--trust-remote-code must be given again to resume a run that was launched with it);
* the reward file is the copy the first launch put in the run (rundir.REWARD_COPY), and its
  sha256 must equal the one recorded at launch.
"""
import dataclasses
import hashlib
import os
from pathlib import Path
from typing import List, Optional

from pipelines.launch import rundir

# OpenRLHF 0.11.2's flags whose value is a path it reads or writes (a test holds this list to the
# flags of OpenRLHF's parser whose names look like paths, so a new one cannot slip by).
MODEL_FLAGS = ("--actor.model_name_or_path", "--critic.model_name_or_path", "--reward.model_name_or_path")
RUN_PATH_FLAGS = ("--ckpt.path", "--ckpt.output_dir", "--data.prompt_dataset", "--eval.dataset",
                  "--logger.tensorboard_dir", "--train.agent_func_path")
# Relative to the Ray working_dir ngrpo ships (RUN_DIR/ray_code): always ngrpo's reward entry.
REWARD_ENTRY_FLAG = "--reward.remote_url"
# Flags whose value merely looks like a path by name: a metric name, booleans, W&B names.
NOT_PATH_FLAGS = ("--ckpt.best_metric_key", "--ckpt.load_enable", "--ckpt.save_hf", "--ckpt.save_steps",
                  "--critic.save_value_network", "--data.dataloader_num_workers", "--data.image_key",
                  "--data.input_key", "--data.label_key", "--ds.adam_offload", "--ds.load_in_4bit", "--logger.wandb.key",
                  "--logger.wandb.project", "--logger.wandb.run_name", "--ref.offload", "--reward.offload")


class ResumeRefused(Exception):
    """The run directory asks for something a resume does not do; the message names the field."""


def sha256_file(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def inside(run_dir: Path, path, what: str) -> Path:
    """PATH resolved (symlinks followed, relative to the current folder as OpenRLHF would read it),
    or ResumeRefused when that leaves RUN_DIR."""
    resolved = Path(os.path.abspath(Path(path).expanduser())).resolve()
    if resolved != run_dir and run_dir not in resolved.parents:
        raise ResumeRefused(f"{run_dir / rundir.MANIFEST}: {what} is {path}, which resolves to {resolved}, "
                            f"outside the run directory; a resume reads and writes only inside {run_dir}")
    return resolved


def canonical_flag(word: str, known=()) -> str:
    """The flag OpenRLHF's argparse reads WORD as, among KNOWN: an exact name, or an abbreviation of
    exactly one of them (argparse accepts unique prefixes; an ambiguous one fails its parse)."""
    if word in known:
        return word
    matches = [flag for flag in known if flag.startswith(word)]
    return matches[0] if len(matches) == 1 else word


def flag_values(argv: List[str], known=(), last_only: bool = False) -> dict:
    """{flag: [values]} of ARGV: the words after each `--flag` (or its `=value`) up to the next flag,
    an abbreviation of one of KNOWN read as that flag. LAST_ONLY: the values of a flag's last
    occurrence (what argparse keeps); else those of every occurrence."""
    out, current = {}, None
    for word in argv:
        if word.startswith("--"):
            name, eq, value = word.partition("=")
            current = canonical_flag(name, known)
            if last_only or current not in out:
                out[current] = []
            if eq:
                out[current].append(value)
        elif current is not None:
            out[current].append(word)
    return out


def _launch_settings(manifest: dict) -> dict:
    launch = manifest.get("launch")
    if not isinstance(launch, dict):
        raise ResumeRefused("the manifest has no 'launch' record (it was made by an older ngrpo): a resume rebuilds "
                            "the command line from it; start the run again with `ngrpo train --overwrite`")
    for key in ("save_steps", "keep_checkpoints"):
        if not isinstance(launch.get(key), int) or isinstance(launch.get(key), bool) or launch[key] < 1:
            raise ResumeRefused(f"the manifest's launch.{key} is {launch.get(key)!r}, not a positive whole number")
    eval_every = manifest.get("eval_every")
    if eval_every is not None and (not isinstance(eval_every, int) or eval_every < 1):
        raise ResumeRefused(f"the manifest's eval_every is {eval_every!r}, not a positive whole number or null")
    extra = launch.get("openrlhf_extra", [])
    if not isinstance(extra, list) or not all(isinstance(a, str) for a in extra):
        raise ResumeRefused("the manifest's launch.openrlhf_extra is not a list of strings")
    return {"save_steps": launch["save_steps"], "keep_checkpoints": launch["keep_checkpoints"],
            "eval_every": eval_every, "extra": extra}


def recorded_recipe(manifest: dict):
    """The manifest's recipe as a validated Recipe; ResumeRefused when it is missing or not valid."""
    from pipelines.launch.recipes import Recipe, RecipeError

    recipe_fields = manifest.get("recipe")
    if not isinstance(recipe_fields, dict):
        raise ResumeRefused("the manifest has no recipe")
    try:
        values = dict(recipe_fields)
        if isinstance(values.get("adam_betas"), list):
            values["adam_betas"] = tuple(values["adam_betas"])
        return Recipe(**values).validate()
    except (TypeError, RecipeError) as err:
        raise ResumeRefused(f"the manifest's recipe is not valid: {err}") from None


def rebuild_argv(run_dir: Path, manifest: dict) -> List[str]:
    """OpenRLHF's command line for resuming RUN_DIR (with rundir.RUN_DIR_TOKEN, as stored), rebuilt
    from the recorded recipe, layout and launch settings; ResumeRefused for any path outside."""
    from pipelines.launch import training

    recipe = recorded_recipe(manifest)
    try:
        layout = training.Layout(**manifest["layout"])
    except (KeyError, TypeError) as err:
        raise ResumeRefused(f"the manifest's layout is missing or not valid ({err})") from None
    launch = _launch_settings(manifest)
    model = manifest.get("model")
    if not isinstance(model, str) or not model:
        raise ResumeRefused("the manifest names no base model")
    argv = training.build_openrlhf_argv(recipe, model=model, layout=layout, save_steps=launch["save_steps"],
                                        keep_checkpoints=launch["keep_checkpoints"],
                                        eval_every=launch["eval_every"], extra=launch["extra"])
    check_paths(run_dir, argv, model)
    return argv


def check_paths(run_dir: Path, argv: List[str], model: str) -> None:
    """Every path ARGV names must be inside RUN_DIR, the base model MODEL excepted; and so must
    everything under the run's checkpoints/ folder (DeepSpeed unpickles what it finds there)."""
    from pipelines.launch import training

    run_dir = run_dir.resolve()
    flags = flag_values(training.materialise_argv(argv, run_dir),
                        known=MODEL_FLAGS + RUN_PATH_FLAGS + (REWARD_ENTRY_FLAG,))
    for flag, values in flags.items():
        if flag in MODEL_FLAGS:
            for value in values:
                if value != model:
                    inside(run_dir, value, f"{flag} (only the base model {model} may be outside the run)")
        elif flag in RUN_PATH_FLAGS:
            for value in values:
                inside(run_dir, value, flag)
        elif flag == REWARD_ENTRY_FLAG and values != [training.REWARD_ENTRY]:
            raise ResumeRefused(f"{run_dir / rundir.MANIFEST}: {flag} is {' '.join(values)}; a run's reward is "
                                f"always ngrpo's entry {training.REWARD_ENTRY} (a reward file of your own is "
                                "--reward-file, copied into the run at launch)")
    for name in (rundir.CHECKPOINTS, "data", rundir.FINAL_MODEL, "tensorboard", rundir.LOGS, training.RAY_CODE_DIR,
                 rundir.REWARD_COPY, rundir.METRICS, rundir.EVAL_METRICS, rundir.PROGRESS, rundir.GROUPS):
        if os.path.lexists(run_dir / name):
            inside(run_dir, run_dir / name, name)
    for top, dirs, files in os.walk(run_dir / rundir.CHECKPOINTS):
        for name in dirs + files:
            path = Path(top, name)
            if path.is_symlink():
                inside(run_dir, path, str(path.relative_to(run_dir)))


def reward_file_for_resume(run_dir: Path, manifest: dict) -> Optional[str]:
    """The reward file a resume runs: None for ngrpo's own reward, else the run's copy, whose
    sha256 must be the one recorded at launch."""
    record = manifest.get("reward_file")
    if record is None:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("sha256"), str):
        raise ResumeRefused("the manifest's reward_file record is not valid (it needs sha256)")
    copy = run_dir / rundir.REWARD_COPY
    inside(run_dir, copy, rundir.REWARD_COPY)
    if not copy.is_file():
        raise ResumeRefused(f"{copy} is missing: the run's copy of its reward file (from {record.get('origin')}) "
                            "is what a resume runs")
    got = sha256_file(copy)
    if got != record["sha256"]:
        raise ResumeRefused(f"{copy} has changed since the launch (sha256 {got[:12]}..., recorded "
                            f"{record['sha256'][:12]}...): a resume runs only the reward file the run was started with")
    return str(copy)


# PatchConfig fields a resume takes from the recipe and the run, never from the stored settings.
_DERIVED = ("estimator", "estimator_options", "group_filter", "device", "seed", "answer_extraction", "old_log_probs",
            "reproducible_rollouts", "reward_file", "trust_remote_code", "run_dir", "start_step", "max_steps",
            "max_samples", "max_generated_tokens", "start_generated_samples", "start_generated_tokens")


def rebuild_patch_config(run_dir: Path, manifest: dict, trust_remote_code: bool):
    """The patch settings of a resume: what the recipe gives, plus the recorded run options
    (e.g. --max-dropped-groups), each of the type its field declares."""
    from openrlhf_patch.config import PatchConfig
    from pipelines.launch import training

    recipe = recorded_recipe(manifest)
    if recipe.graded_negatives:  # SGPO: the judge prompt the run started with, from the run's own copy
        from openrlhf_patch import judge

        copy = Path(run_dir) / judge.PROMPT_COPY
        if not copy.is_file():
            raise ResumeRefused(f"the run's copy of its judge prompt ({judge.PROMPT_COPY}) is missing")
        recipe = dataclasses.replace(recipe, judge_prompt=str(copy))
    reward_file = reward_file_for_resume(run_dir, manifest) or training.DEFAULT_REWARD_FILE
    device = manifest.get("device")
    if device not in ("cpu", "cuda"):
        raise ResumeRefused(f"the manifest's device is {device!r}, not cpu or cuda")
    budgets = {}
    for key in ("max_samples", "max_generated_tokens"):  # recorded as max_steps is, at the manifest's top
        value = manifest.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ResumeRefused(f"the manifest's {key} is {value!r}, not a positive integer")
        budgets[key] = value
    config = training.build_patch_config(recipe, device=device, max_steps=manifest.get("max_steps"),
                                         reward_file=reward_file, trust_remote_code=trust_remote_code, **budgets)
    stored = manifest.get("patch_config") or {}
    defaults = PatchConfig()
    kept = {}
    for field in dataclasses.fields(PatchConfig):
        if field.name in _DERIVED or field.name not in stored:
            continue
        value, default = stored[field.name], getattr(defaults, field.name)
        ok_types = (type(default),) if default is not None else (int, float, type(None))
        if isinstance(default, float):
            ok_types = (int, float)
        if not isinstance(value, ok_types) or isinstance(value, bool) != isinstance(default, bool):
            raise ResumeRefused(f"the manifest's patch_config.{field.name} is {value!r}, not of type {type(default).__name__}")
        kept[field.name] = value
    return dataclasses.replace(config, **kept)


def check_model(manifest: dict, trust_remote_code: bool) -> None:
    """The recorded base model again, as a launch checks it: no custom code unless
    --trust-remote-code is given to this resume (a manifest's word is not the user's), and
    no pickled weights."""
    from pipelines.models import ModelError, check_remote_code, check_weights_format

    if manifest.get("trust_remote_code") and not trust_remote_code:
        raise ResumeRefused(f"the run was launched with --trust-remote-code (its model {manifest['model']} runs its "
                            "own code); pass --trust-remote-code to this resume too to allow that again")
    try:
        check_remote_code(manifest["model"], trust_remote_code)
        check_weights_format(manifest["model"])
    except ModelError as err:
        raise ResumeRefused(str(err)) from None
