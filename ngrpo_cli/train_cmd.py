"""`ngrpo train`: NGRPO and its baselines through OpenRLHF's Ray + vLLM + DeepSpeed pipeline."""
import dataclasses
import os
import typing
from pathlib import Path

import click

from pipelines.launch.recipes import ALGOS, PRESETS, SETTINGS, Recipe, algo_defaults

# The NGRPO authors validate greedily every 7 steps on these (their ray_trainer and train scripts).
PAPER_VALIDATION = ("math-test", "aime2025", "amc23")
PAPER_VALIDATION_EVERY = 7


def _flag_type(f: dataclasses.Field):
    """The click type of a Recipe field, from its annotation and choices."""
    choices = f.metadata.get("choices")
    if choices and all(isinstance(c, int) for c in choices):
        return click.IntRange(min(choices), max(choices))
    if choices:
        return click.Choice(choices)
    kind = typing.get_type_hints(Recipe)[f.name]
    if typing.get_origin(kind) is typing.Union:  # Optional[int]
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    if typing.get_origin(kind) is tuple:
        return float
    return kind


def _default_text(name: str, default) -> str:
    if isinstance(default, tuple):
        default = " ".join(map(str, default))
    text = f"default: {default}"
    per_algo = algo_defaults(name)
    if per_algo:
        text += "; " + ", ".join(f"--algo {a}: {v}" for a, v in per_algo.items())
    for preset, values in PRESETS.items():
        if name in values:
            text += f"; --preset {preset}: {values[name]}"
    return f"[{text}]"


def _recipe_options(func):
    """One flag per Recipe field: --eps-clip-low 0.16, --group-filter none, --adam-betas 0.9 0.999, ..."""
    for f in reversed(dataclasses.fields(Recipe)):
        flag = Recipe.flag(f.name)
        help_text = f"{f.metadata['help']} {_default_text(f.name, f.default)}"
        if _flag_type(f) is bool:
            option = click.option(f"{flag}/--no-{flag[2:]}", f.name, default=None, help=help_text, show_default=False)
        else:
            nargs = 2 if isinstance(f.default, tuple) else 1
            option = click.option(flag, f.name, type=_flag_type(f), nargs=nargs, default=None, help=help_text,
                                  show_default=False)
        func = option(func)
    return func


def _load_yaml_config(path):
    import yaml

    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise click.ClickException(f"{path}: expected a mapping of recipe settings, got {type(data).__name__}")
    settings = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in SETTINGS and name not in ("algo", "preset"):
            raise click.ClickException(f"{path}: unknown setting {key!r}; valid: algo, preset, {', '.join(SETTINGS)}")
        settings[name] = value
    return settings


TRAIN_EPILOG = (
    "Logs: every run writes TensorBoard events to RUN_DIR/tensorboard/ (view them with `tensorboard --logdir "
    "RUN_DIR/tensorboard`), one line of metrics per step to RUN_DIR/metrics.jsonl and the launch log to "
    "RUN_DIR/logs/. --wandb PROJECT also logs the same metrics to Weights & Biases; the key comes from "
    "WANDB_API_KEY only, and WANDB_MODE=offline keeps the W&B run in RUN_DIR/wandb/. OpenRLHF features after `--` "
    "(LoRA, packing, async training, ...): docs/FEATURES.md."
)


def _set_cpu_speedups(value):
    """--cpu-speedups: set for this process and, through the environment, every process of the run."""
    from openrlhf_patch.cpu import speedups

    if value is not None:
        os.environ[speedups.ENV] = value
        speedups._decided.clear()
    return value


@click.command("train", context_settings={"show_default": True}, epilog=TRAIN_EPILOG)
@click.option("--model", help="Base model: a local Hugging Face folder, a GGUF file, a built-in model "
                              "(smollm2-135m-instruct) or a Hub id (e.g. Qwen/Qwen2.5-Math-7B).")
@click.option("--algo", type=click.Choice(ALGOS), default=None,
              help="Algorithm recipe (docs/ALGORITHM.md §5).  [default: ngrpo]")
@click.option("--data", "data_path", type=click.Path(exists=True, dir_okay=False),
              help="Training problems: a JSONL from `ngrpo prepare-data` (id, problem, answer).")
@click.option("--output", "run_dir", type=click.Path(file_okay=False), help="Run directory to create.")
@click.option("--resume", "resume_dir", type=click.Path(exists=True, file_okay=False),
              help="Continue RUN_DIR from its last checkpoint, with the same data order.")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False),
              help="YAML file of recipe settings (flags given here win).")
@click.option("--preset", type=click.Choice(["auto", *PRESETS]), default="auto",
              help="Base settings: paper (docs/ALGORITHM.md §5), paper-cpu (the paper's structure, 4 optimizer "
                   "steps a rollout, ZeRO-3, gradient checkpointing, at CPU sizes) or cpu-tiny (small batches and "
                   "lengths for a laptop, one optimizer step a rollout); auto = paper on GPU, cpu-tiny on CPU.")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", help="auto: cuda if available, else cpu mode.")
@click.option("--max-steps", type=click.IntRange(min=1), default=None,
              help="Stop after this many training steps (a final model is still saved).")
@click.option("--max-samples", type=click.IntRange(min=1), default=None, metavar="N",
              help="Stop once N responses were generated, counting the groups the filter dropped (the step "
                   "that reaches N is the last, and is checkpointed): equal budgets across algorithms. A resume "
                   "continues the count.")
@click.option("--max-generated-tokens", type=click.IntRange(min=1), default=None, metavar="T",
              help="Stop once T response tokens were generated, dropped groups included (as --max-samples).")
@click.option("--save-steps", type=click.IntRange(min=1), default=None,
              help="DeepSpeed checkpoint every N steps, and always at the last --max-steps step. A stopped run "
                   "resumes from its last checkpoint, so up to N - 1 steps are trained again.  [default: 10 on CPU, "
                   "20 on GPU]")
@click.option("--keep-checkpoints", type=click.IntRange(min=1), default=None,
              help="Checkpoints kept (the oldest go first).  [default: 2 on CPU, 3 on GPU]")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use only the first N training problems.")
@click.option("--reward-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="OpenRLHF reward file (reward_func). Default: ngrpo's math-verify reward.")
@click.option("--eval-data", default=None, metavar="B1,B2,...",
              help="Validation sets (benchmark names or files, as `ngrpo eval --benchmarks`), answered greedily every "
                   "--eval-every steps by OpenRLHF's own evaluation; logged to RUN_DIR/eval_metrics.jsonl per set.  "
                   f"[default: {','.join(PAPER_VALIDATION)} with --preset paper on GPU, else none]")
@click.option("--data-dir", type=click.Path(file_okay=False, exists=True), default=None, envvar="NGRPO_DATA_DIR",
              help="Read validation sets given by name from local files laid out like the shared data folder "
                   "instead of the Hub.  [env: NGRPO_DATA_DIR]")
@click.option("--eval-every", type=click.IntRange(min=0), default=None,
              help="Validate every N steps; 0 turns validation off.  [default: 7, as the NGRPO authors]")
@click.option("--nodes", type=int, default=None, help="Nodes in the Ray cluster.  [default: 1]")
@click.option("--gpus-per-node", type=int, default=None, help="GPUs per node for the actor (and reference/critic).  [default: all visible]")
@click.option("--vllm-engines", type=int, default=None, help="vLLM engines.  [default: one per GPU / tensor-parallel size]")
@click.option("--vllm-tp", type=int, default=None, help="Tensor-parallel size of each vLLM engine.  [default: 1]")
@click.option("--colocate/--no-colocate", default=None, help="Colocate actor, reference and vLLM on the same GPUs (with sleep mode).  [default: colocate on GPU]")
@click.option("--long-prompts", type=click.Choice(["refuse", "drop"]), default=None,
              help="Prompts longer than --max-prompt-len are counted, then: refuse the data, or leave them out (as "
                   "the NGRPO authors' training does).  [default: drop with --preset paper, else refuse]")
@click.option("--overwrite", is_flag=True, help="Replace a finished run, or one with checkpoints, in --output; or write "
                                               "into an --output folder that holds other files.")
@click.option("--trust-remote-code", is_flag=True,
              help="Let a model whose config names custom code (auto_map) run that code, in every process of the "
                   "run (without it such a model is refused, and OpenRLHF and vLLM get trust_remote_code=False). "
                   "A resume of such a run needs it again.")
@click.option("--max-dropped-groups", type=click.IntRange(min=1), default=512,
              help="Stop the run when the group filter drops this many groups in a row (the reward never gives "
                   "the groups the filter keeps).")
@click.option("--stall-timeout", type=click.FloatRange(min=0), default=None, metavar="SECONDS",
              help="Stop the run when it makes no progress for this long (no response generated, no training "
                   "micro-batch, weight sync, logged step or checkpoint byte written), with one line naming the "
                   "stalled stage and process; a warning comes at half of it. 0 turns the watchdog off; a resume "
                   "keeps the run's value.  [default: 1800 on GPU, 600 on CPU]")
@click.option("--wandb", "wandb_project", default=None, metavar="PROJECT",
              help="Also log the run's step metrics (OpenRLHF's and ngrpo's) to this Weights & Biases project, "
                   "as a W&B run named after the run directory (OpenRLHF's --logger.wandb.* flags after `--` can "
                   "change that). The API key is read from WANDB_API_KEY, never stored; WANDB_MODE=offline writes "
                   "RUN_DIR/wandb/ only. A resume logs to the same W&B run.")
@click.option("--cpu-speedups", type=click.Choice(("on", "off")), default=None, expose_value=False,
              callback=lambda ctx, param, value: _set_cpu_speedups(value),
              help="CPU mode's optional speed-ups (the lean Ray node and layout, vLLM's engine core in a thread, "
                   "tokenizing once, bucketed weight sync, KV sizing, thread settings). `off` keeps only what CPU "
                   "needs in order to run: OpenRLHF's own layout and Ray's own node (env NGRPO_CPU_SPEEDUPS; "
                   "docs/CPU_MODE.md).  [default: on]")
@click.option("--gpu-memory", type=click.FloatRange(min=1), default=None, metavar="GIB",
              help="GPU size for the memory check of a GPU run (GiB per GPU).  [default: this machine's GPU 0]")
@click.option("--dry-run", is_flag=True, help="Check everything, print the OpenRLHF command line, and exit.")
@click.option("-v", "--verbose", is_flag=True,
              help="Also show the Ray, vLLM and DeepSpeed output live (it always goes to RUN_DIR/logs/).")
@_recipe_options
@click.argument("openrlhf_args", nargs=-1, type=click.UNPROCESSED)
def train(model, algo, data_path, run_dir, resume_dir, config_path, preset, device, max_steps, max_samples,
          max_generated_tokens, save_steps, keep_checkpoints, limit, reward_file, eval_data, data_dir, eval_every, long_prompts, overwrite,
          trust_remote_code, max_dropped_groups, stall_timeout, wandb_project, gpu_memory, nodes, gpus_per_node,
          vllm_engines, vllm_tp, colocate, dry_run, verbose, openrlhf_args, **recipe_flags):
    """Train MODEL on DATA with NGRPO or a baseline, through OpenRLHF.

    Everything is checked before training starts and before the run directory is made: the model
    and its tokenizer, the data, every setting (OpenRLHF's own parser included) and the prompt
    lengths (on CPU Ray's node starts meanwhile, and stops again if a check fails). Any OpenRLHF
    flag can follow `--`, e.g. `ngrpo train ... -- --train.async_enable`; it is appended last,
    so it wins over the recipe (docs/FEATURES.md: which OpenRLHF features work with ngrpo).
    """
    if resume_dir:
        if wandb_project:
            raise click.UsageError("--wandb is the launch's choice: a resume logs where its launch did (the run's "
                                   "manifest records it)")
        return _resume(resume_dir, max_steps, verbose, trust_remote_code, stall_timeout,
                       budgets={"max_samples": max_samples, "max_generated_tokens": max_generated_tokens})
    for name, value in (("--model", model), ("--data", data_path), ("--output", run_dir)):
        if value is None and not (dry_run and name == "--output"):
            raise click.UsageError(f"{name} is required (or use --resume RUN_DIR)")
    from openrlhf_patch.cpu import early_ray

    if run_dir is not None and not dry_run:
        _check_output_folder(Path(run_dir).resolve(), overwrite)
    try:
        plan = _preflight(model, algo, data_path, run_dir, config_path, preset, device, max_steps, save_steps,
                          keep_checkpoints, limit, reward_file, eval_data, data_dir, eval_every, long_prompts, nodes,
                          gpus_per_node, vllm_engines, vllm_tp, colocate, openrlhf_args, recipe_flags,
                          start_ray=not dry_run, trust_remote_code=trust_remote_code,
                          wandb_run=_wandb_run(wandb_project, run_dir))
        from pipelines.launch.watchdog import default_timeout

        plan.update(max_samples=max_samples, max_generated_tokens=max_generated_tokens)
        plan["patch_config"] = dataclasses.replace(
            plan["patch_config"], max_consecutive_dropped_groups=max_dropped_groups, max_samples=max_samples,
            max_generated_tokens=max_generated_tokens,
            stall_timeout=default_timeout(plan["device"]) if stall_timeout is None else stall_timeout)
        if plan["device"] == "cuda":
            _check_gpu_memory(plan, gpu_memory, dry_run)
        if dry_run:
            from pipelines.launch import training

            click.echo(training.command_line(training.materialise_argv(plan["argv"], plan["run_path"])))
            click.echo("OpenRLHF's parser accepted the command line.", err=True)
            return
        _launch(plan, overwrite, verbose)
    finally:
        early_ray.discard()  # a node started early that no launch took: a check failed after it started


def _preflight(model, algo, data_path, run_dir, config_path, preset, device, max_steps, save_steps, keep_checkpoints,
               limit, reward_file, eval_data, data_dir, eval_every, long_prompts, nodes, gpus_per_node, vllm_engines,
               vllm_tp, colocate, openrlhf_args, recipe_flags, start_ray=False, trust_remote_code=False,
               wandb_run=None) -> dict:
    """Every check that can fail before the run starts; a failure is one line naming what to fix.
    With START_RAY a CPU run's Ray node starts in the background once the model, the data and the
    settings are found, before the checks that import the stack (tokenizer, OpenRLHF's parser)."""
    from pipelines.launch import training
    from pipelines.datasets.data import DataError, load_problems
    from pipelines.models import ModelError, detect_device, resolve_model
    from pipelines.launch.recipes import RecipeError, build_recipe

    settings = _load_yaml_config(config_path) if config_path else {}
    # the command line wins over the file for these two as for every setting
    yaml_algo, yaml_preset = settings.pop("algo", None), settings.pop("preset", None)
    algo = algo or yaml_algo or "ngrpo"
    if preset == "auto" and yaml_preset:
        preset = yaml_preset
    device = detect_device() if device == "auto" else device
    if preset == "auto":
        preset = "cpu-tiny" if device == "cpu" else "paper"
        click.echo(f"preset: {preset} (device {device}; pass --preset to choose)", err=True)
    settings.update({k: v for k, v in recipe_flags.items() if v is not None})
    if eval_data is None and eval_every != 0 and preset == "paper" and device == "cuda":
        eval_data = ",".join(PAPER_VALIDATION)
    eval_every = None if not eval_data or eval_every == 0 else (eval_every or PAPER_VALIDATION_EVERY)
    try:
        recipe = build_recipe(algo, preset, settings)
        resolved = resolve_model(model, allow_run_dir=True, log=lambda msg: click.echo(msg, err=True),
                                 trust_remote_code=trust_remote_code)
        problems = load_problems(data_path)[:limit] if limit else load_problems(data_path)
        eval_problems = _validation_problems(eval_data, data_dir) if eval_every else None
    except (RecipeError, ModelError, DataError) as err:
        raise click.UsageError(str(err))
    if len(problems) < recipe.prompts_per_step:
        raise click.UsageError(f"{data_path}: {len(problems)} problems, fewer than one step's "
                               f"{recipe.prompts_per_step} prompts (--prompts-per-step)")
    long_prompts = long_prompts or ("drop" if preset in ("paper", "paper-cpu") else "refuse")
    layout = training.Layout.for_device(device, nodes=nodes, gpus_per_node=gpus_per_node, vllm_engines=vllm_engines,
                                        vllm_tensor_parallel=vllm_tp, colocate=colocate)
    if recipe.graded_negatives:
        _check_sgpo(recipe, problems, data_path, layout.nodes)
    reward_file = str(Path(reward_file).resolve()) if reward_file else training.DEFAULT_REWARD_FILE
    # what a resume rebuilds the command line from (pipelines/launch/resume.py), with the recipe and layout
    launch = {"save_steps": save_steps or (10 if device == "cpu" else 20),
              "keep_checkpoints": keep_checkpoints or (2 if device == "cpu" else 3),
              "openrlhf_extra": (training.wandb_argv(wandb_run["project"], wandb_run["run_name"]) if wandb_run else [])
              + list(openrlhf_args)}
    if wandb_run:
        launch["wandb"] = wandb_run
    argv = training.build_openrlhf_argv(recipe, model=resolved.path, layout=layout, save_steps=launch["save_steps"],
                                        keep_checkpoints=launch["keep_checkpoints"], eval_every=eval_every,
                                        extra=launch["openrlhf_extra"])
    _check_features(argv, device, resolved.path)
    run_path = Path(run_dir or "ngrpo-dry-run").resolve()
    if start_ray and wandb_run:
        _wandb_environment(run_path, wandb_run)  # before Ray's node starts: its processes inherit it
    if device == "cuda" and recipe.packing and not training.gpu_run.flash_attn_usable():
        raise click.UsageError("--packing needs flash-attn built for the installed torch (none is usable here); "
                               "leave it out to train with sdpa attention and padded micro-batches")
    if start_ray:
        training.start_ray_early(argv, device)  # the checks below import the stack (seconds) meanwhile
    abstention = recipe.uncertain_reward is not None  # the prompt offers \boxed{\text{I don't know}}
    problems = _check_prompt_lengths(problems, resolved.path, recipe.max_prompt_len, long_prompts, data_path,
                                     trust_remote_code, abstention)
    if eval_problems:
        eval_problems = _check_prompt_lengths(eval_problems, resolved.path, recipe.max_prompt_len, long_prompts,
                                              f"validation sets {eval_data}", trust_remote_code, abstention)
    try:
        args = training.parse_with_openrlhf(training.materialise_argv(argv, run_path))
    except (SystemExit, AssertionError) as err:
        raise click.ClickException(f"OpenRLHF rejected this command line: {err}")
    return {"recipe": recipe, "resolved": resolved, "model": model, "algo": algo, "preset": preset, "device": device,
            "openrlhf_args": args,
            "layout": layout, "argv": argv, "launch": launch, "run_path": run_path, "problems": problems, "eval_problems": eval_problems,
            "data_path": data_path, "eval_data": eval_data, "eval_every": eval_every, "max_steps": max_steps,
            "trust_remote_code": trust_remote_code,
            "patch_config": training.build_patch_config(recipe, device=device, max_steps=max_steps,
                                                        reward_file=reward_file, trust_remote_code=trust_remote_code)}


def _check_features(argv, device, model_path) -> None:
    """The OpenRLHF features of ARGV (the recipe's flags and the user's) that the patch cannot run
    with, refused in one line before Ray starts (pipelines/launch/features.py, docs/FEATURES.md)."""
    from pipelines.launch import features

    try:
        features.check(argv, device=device, model_path=model_path, log=lambda msg: click.echo(msg, err=True))
    except features.FeatureRefused as err:
        raise click.UsageError(str(err))


def _wandb_run(project, run_dir):
    """The launch's record of `--wandb PROJECT` (kept in the manifest for a resume): the W&B run is
    named after the run directory and keeps one id across resumes. No key: that is WANDB_API_KEY's."""
    if not project:
        return None
    import uuid

    return {"project": project, "run_name": Path(run_dir or "ngrpo-dry-run").resolve().name,
            "run_id": uuid.uuid4().hex[:12]}


def _wandb_environment(run_path: Path, wandb_run: dict) -> None:
    """The W&B settings of this process, which the run's Ray processes inherit (wandb reads them in
    OpenRLHF's WandbLogger): the run's folder under RUN_DIR (a WANDB_DIR of your own wins) and one
    W&B run id for the launch and its resumes."""
    import os

    os.environ.setdefault("WANDB_DIR", str(run_path))
    os.environ["WANDB_RUN_ID"] = str(wandb_run["run_id"])
    os.environ["WANDB_RESUME"] = "allow"


def _validation_problems(specs: str, data_dir) -> list:
    """The validation sets, each problem's source the set's name (OpenRLHF reports per source)."""
    from pipelines.datasets.data import DataError, default_data_dir, load_benchmark

    out = []
    for spec in [s.strip() for s in specs.split(",") if s.strip()]:
        try:
            name, records = load_benchmark(spec, data_dir=data_dir or default_data_dir())
        except DataError as err:
            raise DataError(f"validation set {spec!r}: {err} (pass --data-dir/NGRPO_DATA_DIR with local copies, "
                            "other --eval-data, or --eval-every 0 to train without validation)") from None
        out += [{**r, "source": name} for r in records]
    return out


def _check_gpu_memory(plan, gpu_gib, dry_run):
    """The GPU memory estimate of the layout (pipelines/launch/gpu_memory.py): shown, and a layout that cannot
    fit refused with the numbers and what to change."""
    from transformers import AutoConfig

    from pipelines.launch import gpu_memory

    if gpu_gib is None:
        try:
            gpu_gib = gpu_memory.gpu_total_gib()
        except gpu_memory.GpuMemoryError:
            if not dry_run:
                raise
            gpu_gib = 80.0
            click.echo("no GPU here: the memory check assumes 80 GiB GPUs (--gpu-memory to choose)", err=True)
    shape = gpu_memory.ModelShape.from_config(AutoConfig.from_pretrained(
        plan["resolved"].path, trust_remote_code=plan.get("trust_remote_code", False)).to_dict())
    report = gpu_memory.check_fit(shape, gpu_memory.setup_from_openrlhf_args(plan["openrlhf_args"]), gpu_gib)
    if not report.fits:
        raise click.ClickException(report.message)
    click.echo(report.message, err=True)


def _check_prompt_lengths(problems, model_path, max_prompt_len, long_prompts, data_path, trust_remote_code=False,
                          abstention=False):
    """Prompts longer than the budget are counted first, then refused or dropped; OpenRLHF would
    cut them silently. ABSTENTION: the prompts offer abstention (UCPO, docs/ALGORITHM.md §8)."""
    from transformers import AutoTokenizer

    from pipelines.datasets.prompts import build_prompt

    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    lengths = [len(ids) for ids in tokenizer([build_prompt(p["problem"], abstention) for p in problems],
                                              add_special_tokens=False)["input_ids"]]
    long = [(n, p["id"]) for n, p in zip(lengths, problems) if n > max_prompt_len]
    if not long:
        return problems
    longest = max(long)
    what = (f"{data_path}: {len(long)} of {len(problems)} prompts are longer than --max-prompt-len {max_prompt_len} "
            f"tokens (the longest, id {longest[1]!r}, has {longest[0]})")
    if long_prompts == "refuse":
        raise click.UsageError(f"{what}; raise --max-prompt-len or pass --long-prompts drop to leave them out")
    click.echo(f"{what}; left out (--long-prompts drop)", err=True)
    dropped = {i for _, i in long}
    return [p for p in problems if p["id"] not in dropped]


def _launch(plan, overwrite, verbose):
    """Take the run directory (refusing a live or finished run), write its data and manifest, train."""
    from pipelines.launch import rundir

    run_path = plan["run_path"]
    # an earlier run's status before this process holds the lock (held, it would read as running)
    earlier = rundir.effective_status(run_path) if rundir.is_run_dir(run_path) else None
    try:
        lock = rundir.RunLock(run_path).acquire()
    except rundir.RunDirBusy as err:
        raise click.ClickException(str(err))
    try:
        _clear_earlier_run(run_path, overwrite, earlier)
        resolved, recipe = plan["resolved"], plan["recipe"]
        _write_prompts(plan["problems"], run_path / rundir.TRAIN_DATA, recipe)
        if recipe.graded_negatives:
            _write_sgpo_references(plan["problems"], run_path, recipe)
        if plan["eval_problems"]:
            _write_prompts(plan["eval_problems"], run_path / rundir.EVAL_DATA, recipe)
        manifest = {
            "ngrpo_version": _version(), "model": resolved.path, "model_spec": plan["model"],
            "model_kind": resolved.kind, "algo": plan["algo"], "preset": plan["preset"], "device": plan["device"],
            "data": str(Path(plan["data_path"]).resolve()), "num_problems": len(plan["problems"]),
            "eval_data": plan["eval_data"] if plan["eval_problems"] else None,
            "eval_every": plan["eval_every"], "recipe": dataclasses.asdict(recipe),
            "layout": dataclasses.asdict(plan["layout"]), "max_steps": plan["max_steps"],
            "max_samples": plan.get("max_samples"), "max_generated_tokens": plan.get("max_generated_tokens"),
            "launch": plan["launch"], "openrlhf_argv": plan["argv"],
            "patch_config": dataclasses.asdict(plan["patch_config"]),
            "trust_remote_code": plan["trust_remote_code"],
        }
        rundir.write_manifest(run_path, manifest)
        click.echo(f"run directory: {run_path}", err=True)
        manifest = _execute(run_path, manifest, resume=False, verbose=verbose)
    finally:
        lock.release()
    _say_finished(run_path, manifest)


def _write_prompts(problems, path: Path, recipe) -> None:
    """training.write_training_file, with the abstention prompt where --uncertain-reward is set
    (UCPO, GRPO-UC: pipelines/datasets/prompts.py)."""
    from pipelines.launch import training

    training.write_training_file(problems, path, abstention=recipe.uncertain_reward is not None)


def _check_sgpo(recipe, problems, data_path, nodes: int = 1) -> None:
    """SGPO's judge needs a reference solution for every training problem and a readable prompt,
    and, on several nodes, an address every node reaches."""
    from openrlhf_patch import judge

    if not recipe.judge_url and nodes > 1:
        # the judge ngrpo serves listens on this node's loopback only (nothing beyond this machine
        # reaches it), and the trainer that calls it may run on another node
        raise click.UsageError(f"--algo sgpo on {nodes} nodes: the judge ngrpo serves itself listens on this "
                               "node's 127.0.0.1, which the other nodes cannot reach. Serve the judge where every "
                               "node reaches it (e.g. `vllm serve MODEL --host 0.0.0.0` on a node of the cluster) "
                               "and pass --judge-url with --judge-model")

    if not recipe.judge_model:
        raise click.UsageError("--algo sgpo needs its step judge: give --judge-model (a model folder, built-in name or "
                               "cached Hub id: ngrpo serves it with vLLM for the run) or --judge-url with "
                               "--judge-model (an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 from "
                               "`vllm serve MODEL`, and the model name it serves)")
    if not recipe.judge_url:  # ngrpo serves the judge itself: it must be a model here
        from pipelines.models import ModelError, resolve_model

        try:
            resolve_model(recipe.judge_model, allow_run_dir=True)
        except ModelError as err:
            raise click.UsageError(f"--judge-model {recipe.judge_model}: {err} (without --judge-url ngrpo serves the "
                                   "judge itself, so it must be a model it can load)")
    missing = judge.first_without_solution(problems)
    if missing:
        raise click.UsageError(
            f"{data_path}: row {missing[0]} (id {missing[1]!r}) has no 'solution': --algo sgpo's judge compares each "
            "response with the problem's reference solution. Use data whose rows carry one (MATH's do: `ngrpo "
            "prepare-data math-train` keeps it) or another --algo")
    try:
        judge.load_prompt(recipe.judge_prompt)
    except judge.JudgeError as err:
        raise click.UsageError(str(err))
    if recipe.judge_prompt:  # recorded in the manifest: a resume from elsewhere finds it
        recipe.judge_prompt = str(Path(recipe.judge_prompt).resolve())


def _write_sgpo_references(problems, run_path: Path, recipe) -> None:
    """RUN_DIR/data/sgpo_references.jsonl: each training prompt's problem and reference solution,
    keyed by the prompt text the refill loop sees (the label stays the bare answer)."""
    from openrlhf_patch import judge
    from pipelines.datasets.prompts import build_prompt

    abstention = recipe.uncertain_reward is not None
    judge.write_references(str(run_path / judge.REFERENCES_FILE),
                           ((build_prompt(p["problem"], abstention), p["problem"], p["solution"]) for p in problems))
    (run_path / judge.PROMPT_COPY).write_text(judge.load_prompt(recipe.judge_prompt), encoding="utf-8")


def _say_finished(run_path: Path, manifest: dict) -> None:
    """The closing line; and a warning when the run stopped short of --max-steps because OpenRLHF's
    prompt loader ran out (a group filter draws extra prompts to replace the groups it drops)."""
    from pipelines.launch import rundir

    steps, wanted = manifest["global_step"], manifest.get("max_steps")
    click.echo(f"finished after {steps} steps; final model: {run_path / rundir.FINAL_MODEL}")
    if wanted is not None and steps < wanted:
        click.echo(f"warning: the training data ran out after {steps} of --max-steps {wanted} steps "
                   f"({manifest['num_problems']} problems x --episodes {manifest['recipe']['episodes']}, "
                   f"{manifest['recipe']['prompts_per_step']} prompts per step plus the refills of dropped groups); "
                   "give more problems or a larger --episodes", err=True)


def _check_output_folder(run_path: Path, overwrite: bool) -> None:
    """--output must be a new or empty folder, or an earlier ngrpo run (_clear_earlier_run decides
    about that one): a folder of other files is refused, naming them, unless --overwrite (the run's
    files, data/train.jsonl among them, would replace the user's)."""
    from pipelines.launch import rundir

    if run_path.exists() and not run_path.is_dir():
        raise click.ClickException(f"--output {run_path} is a file, not a folder")
    if not run_path.is_dir() or rundir.is_run_dir(run_path) or overwrite:
        return
    held = _files_in(run_path, skip=(rundir.LOCK,))
    if held:
        raise click.ClickException(
            f"--output {run_path} is not an ngrpo run directory and holds {_names(held)}: choose an empty or new "
            "folder, or pass --overwrite to write the run into it")


def _files_in(folder: Path, skip=(), limit: int = 7) -> list:
    """Up to LIMIT files under FOLDER (relative paths, sorted walk), empty folders not counted."""
    import os

    found = []
    for top, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            rel = Path(top, name).relative_to(folder)
            if str(rel) not in skip:
                found.append(str(rel))
                if len(found) >= limit:
                    return found
    return found


def _names(names, n=6) -> str:
    return ", ".join(names[:n]) + (" and more" if len(names) > n else "")


def _clear_earlier_run(run_path: Path, overwrite: bool, status: str) -> None:
    """An earlier run in RUN_PATH (its effective STATUS): a finished one, or one with checkpoints,
    needs --overwrite (or --resume); one that failed or was stopped before its first checkpoint is
    replaced."""
    import shutil

    from pipelines.launch import rundir

    if not rundir.is_run_dir(run_path):
        return
    has_checkpoint = rundir.checkpoint_step(run_path) > 0
    if not overwrite and (status == "finished" or has_checkpoint):
        raise click.ClickException(
            f"{run_path} already holds a {status} run ({rundir.completed_steps(run_path)} steps): continue it with "
            f"`ngrpo train --resume {run_path}`, choose another --output, or pass --overwrite to replace it")
    click.echo(f"replacing the {status} run in {run_path}", err=True)
    for child in run_path.iterdir():
        if child.name != rundir.LOCK:
            shutil.rmtree(child) if child.is_dir() else child.unlink()


def _execute(run_path, manifest, resume, verbose, patch_config=None):
    """training.execute_run, with its failures as one clear error (the user's own first)."""
    from pipelines.launch import training

    try:
        return training.execute_run(run_path, manifest, resume=resume, verbose=verbose, patch_config=patch_config)
    except KeyboardInterrupt:
        raise click.ClickException(f"interrupted; the run keeps its last checkpoint: continue it with "
                                   f"`ngrpo train --resume {run_path}`")
    except training.RunFailed as err:
        raise click.ClickException(str(err))


def _resume(run_dir, max_steps, verbose, trust_remote_code=False, stall_timeout=None, budgets=None):
    """Continue RUN_DIR from its last checkpoint. The run directory is data, not instructions:
    OpenRLHF's command line and the patch settings are rebuilt from the recorded recipe, and
    nothing outside the run but its base model is read or written (pipelines/launch/resume.py)."""
    from openrlhf_patch.cpu import early_ray
    from openrlhf_patch.judge import JudgeError
    from pipelines.launch import resume, rundir, training

    run_path = Path(run_dir).resolve()
    try:
        manifest = rundir.read_manifest(run_path)
        status = rundir.effective_status(run_path, manifest)  # before this process holds the lock
        lock = rundir.RunLock(run_path).acquire()
    except rundir.RunDirError as err:
        raise click.ClickException(str(err))
    try:
        if max_steps is not None:
            manifest["max_steps"] = max_steps
        manifest.update({k: v for k, v in (budgets or {}).items() if v is not None})
        if stall_timeout is not None:  # else the launch's, kept in the patch settings
            manifest.setdefault("patch_config", {})["stall_timeout"] = stall_timeout
        try:
            resume.check_model(manifest, trust_remote_code)
            argv = resume.rebuild_argv(run_path, manifest)  # refuses paths out of the run before any is read
            _check_features(argv, manifest.get("device"), manifest.get("model"))
            patch_config = resume.rebuild_patch_config(run_path, manifest, trust_remote_code)
            done = rundir.checkpoint_step(run_path)
        except (resume.ResumeRefused, rundir.RunDirError, click.UsageError, JudgeError) as err:
            # JudgeError: the run's copy of its SGPO judge prompt is unreadable or lost a placeholder
            raise click.ClickException(f"cannot resume {run_path}: {getattr(err, 'message', err)}")
        if manifest.get("max_steps") is not None and done >= manifest["max_steps"]:
            raise click.ClickException(f"{run_path} already has {done} steps (--max-steps {manifest['max_steps']}): "
                                       "pass a larger --max-steps to train on")
        spent = training.budget_spent(manifest, run_path, done)
        if spent:
            raise click.ClickException(f"{run_path} already used its budget at step {done}, {spent}: pass a larger "
                                       "budget to train on")
        if argv != manifest.get("openrlhf_argv"):
            changed = _changed_flags(argv, manifest)
            click.echo(f"note: the manifest's recorded command line differs from the one its recipe gives "
                       f"({', '.join(changed)}); resuming with the recipe's", err=True)
        manifest.update(openrlhf_argv=argv)
        manifest["patch_config"]["max_steps"] = manifest.get("max_steps")
        manifest["patch_config"].update(max_samples=patch_config.max_samples,
                                        max_generated_tokens=patch_config.max_generated_tokens)
        click.echo(f"resuming {run_path} ({status}) from step {done}", err=True)
        wandb_run = (manifest.get("launch") or {}).get("wandb")
        if isinstance(wandb_run, dict) and isinstance(wandb_run.get("run_id"), str):
            _wandb_environment(run_path, wandb_run)  # the launch's W&B run, continued
        # comes up while the launch imports OpenRLHF to parse the command line
        training.start_ray_early(argv, patch_config.device)
        manifest = _execute(run_path, manifest, resume=True, verbose=verbose, patch_config=patch_config)
    finally:
        early_ray.discard()
        lock.release()
    _say_finished(run_path, manifest)


def _changed_flags(argv, manifest) -> list:
    """The flags whose values differ between ARGV and the manifest's recorded command line."""
    from pipelines.launch.resume import flag_values

    new, old = flag_values(argv), flag_values(manifest.get("openrlhf_argv") or [])
    return [flag for flag in sorted(set(new) | set(old)) if new.get(flag) != old.get(flag)]


def _version():
    from importlib.metadata import version

    return version("ngrpo")
