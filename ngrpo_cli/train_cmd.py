"""`ngrpo train`: NGRPO and its baselines through OpenRLHF's Ray + vLLM + DeepSpeed pipeline."""
from pathlib import Path

import click

from pipelines.recipes import ALGOS, FIELDS, PRESETS

# Recipe settings become flags: --eps-clip-low 0.16, --group-filter none, ...
_TYPES = {"group_filter": click.Choice(["none", "drop_all_correct", "drop_all_correct_and_all_wrong", "drop_all_wrong"]),
          "kl_mode": click.Choice(["none", "loss", "reward"]), "kl_estimator": click.Choice(["k1", "k2", "k3"]),
          "loss_agg": click.Choice(["token-mean", "seq-mean-token-mean"]), "estimator": str, "overlong_buffer": int,
          "answer_extraction": click.Choice(["boxed", "authors"])}


def _recipe_options(func):
    for name in reversed(list(FIELDS)):
        default, help_text = FIELDS[name]
        kind = _TYPES.get(name, type(default) if default is not None else str)
        func = click.option(f"--{name.replace('_', '-')}", name, type=kind, default=None,
                            help=f"{help_text} [recipe default: {default}]")(func)
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
        if name not in FIELDS and name not in ("algo", "preset"):
            raise click.ClickException(f"{path}: unknown setting {key!r}; valid: algo, preset, {', '.join(FIELDS)}")
        settings[name] = value
    return settings


@click.command("train", context_settings={"show_default": True})
@click.option("--model", help="Base model: a Hugging Face id (e.g. Qwen/Qwen2.5-Math-7B) or a local folder.")
@click.option("--algo", type=click.Choice(ALGOS), default=None, help="Algorithm recipe (SPEC §5).  [default: ngrpo]")
@click.option("--data", "data_path", type=click.Path(exists=True, dir_okay=False),
              help="Training problems: a JSONL from `ngrpo prepare-data` (id, problem, answer).")
@click.option("--output", "run_dir", type=click.Path(file_okay=False), help="Run directory to create.")
@click.option("--resume", "resume_dir", type=click.Path(exists=True, file_okay=False),
              help="Continue RUN_DIR from its last checkpoint, with the same data order.")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False),
              help="YAML file of recipe settings (flags given here win).")
@click.option("--preset", type=click.Choice(["auto", *PRESETS]), default="auto",
              help="Base settings: paper (SPEC §5) or cpu-tiny (small batches and lengths for a laptop); auto = paper on GPU, cpu-tiny on CPU.")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", help="auto: cuda if available, else cpu mode.")
@click.option("--max-steps", type=int, default=None, help="Stop after this many training steps (a final model is still saved).")
@click.option("--save-steps", type=int, default=None, help="DeepSpeed checkpoint every N steps (resume needs one).  [default: 1 on CPU, 20 on GPU]")
@click.option("--limit", type=int, default=None, help="Use only the first N training problems.")
@click.option("--reward-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="OpenRLHF reward file (reward_func). Default: ngrpo's math-verify reward.")
@click.option("--nodes", type=int, default=None, help="Nodes in the Ray cluster.  [default: 1]")
@click.option("--gpus-per-node", type=int, default=None, help="GPUs per node for the actor (and reference/critic).  [default: all visible]")
@click.option("--vllm-engines", type=int, default=None, help="vLLM engines.  [default: one per GPU / tensor-parallel size]")
@click.option("--vllm-tp", type=int, default=None, help="Tensor-parallel size of each vLLM engine.  [default: 1]")
@click.option("--colocate/--no-colocate", default=None, help="Colocate actor, reference and vLLM on the same GPUs (with sleep mode).  [default: colocate on GPU]")
@click.option("--dry-run", is_flag=True, help="Print the OpenRLHF command line, check it with OpenRLHF's own parser, and exit.")
@_recipe_options
@click.argument("openrlhf_args", nargs=-1, type=click.UNPROCESSED)
def train(model, algo, data_path, run_dir, resume_dir, config_path, preset, device, max_steps, save_steps, limit,
          reward_file, nodes, gpus_per_node, vllm_engines, vllm_tp, colocate, dry_run, openrlhf_args, **recipe_flags):
    """Train MODEL on DATA with NGRPO or a baseline, through OpenRLHF.

    Any OpenRLHF flag can follow `--`, e.g. `ngrpo train ... -- --logger.wandb.key KEY`; it is
    appended last, so it wins over the recipe.
    """
    from pipelines import training
    from pipelines.recipes import build_recipe

    if resume_dir:
        return _resume(resume_dir, max_steps)
    for name, value in (("--model", model), ("--data", data_path), ("--output", run_dir)):
        if value is None and not (dry_run and name == "--output"):
            raise click.UsageError(f"{name} is required (or use --resume RUN_DIR)")

    settings = _load_yaml_config(config_path) if config_path else {}
    # the command line wins over the file for these two as for every setting
    yaml_algo, yaml_preset = settings.pop("algo", None), settings.pop("preset", None)
    algo = algo or yaml_algo or "ngrpo"
    if preset == "auto" and yaml_preset:
        preset = yaml_preset
    device = training.detect_device() if device == "auto" else device
    if preset == "auto":
        preset = "cpu-tiny" if device == "cpu" else "paper"
        click.echo(f"preset: {preset} (device {device}; pass --preset to choose)", err=True)
    settings.update({k: v for k, v in recipe_flags.items() if v is not None})
    try:
        recipe = build_recipe(algo, preset, settings)
    except ValueError as err:
        raise click.UsageError(str(err))
    layout = training.Layout.for_device(device, nodes=nodes, gpus_per_node=gpus_per_node, vllm_engines=vllm_engines,
                                        vllm_tensor_parallel=vllm_tp, colocate=colocate)
    save_steps = save_steps or (1 if device == "cpu" else 20)
    if not dry_run or Path(model).expanduser().exists():
        from pipelines.models import resolve_model

        model_path = resolve_model(model, log=lambda msg: click.echo(msg, err=True)).path
    else:
        model_path = model
    run_path = Path(run_dir or "ngrpo-dry-run").resolve()
    argv = training.build_openrlhf_argv(
        recipe, model=model_path, train_file=str(run_path / "data" / "train.jsonl"), run_dir=str(run_path), layout=layout,
        reward_file=reward_file or training.DEFAULT_REWARD_FILE, save_steps=save_steps, extra=openrlhf_args)
    patch_config = training.build_patch_config(recipe, device=device, run_dir=str(run_path), max_steps=max_steps)

    if dry_run:
        click.echo(training.command_line(argv))
        try:
            training.parse_with_openrlhf(argv)
        except (SystemExit, AssertionError) as err:
            raise click.ClickException(f"OpenRLHF rejected this command line: {err}")
        click.echo("OpenRLHF's parser accepted the command line.", err=True)
        return

    if (run_path / training.MANIFEST).exists():
        raise click.ClickException(f"{run_path} already holds a run: continue it with `ngrpo train --resume {run_path}` "
                                   "or choose another --output")
    from pipelines.data import load_problems

    problems = load_problems(data_path)
    if limit:
        problems = problems[:limit]
    if len(problems) < recipe["prompts_per_step"]:
        raise click.ClickException(f"{data_path}: {len(problems)} problems, fewer than one step's "
                                   f"{recipe['prompts_per_step']} prompts (--prompts-per-step)")
    training.write_training_file(problems, run_path / "data" / "train.jsonl")
    manifest = {
        "ngrpo_version": _version(), "model": model_path, "model_spec": model, "algo": algo, "preset": preset, "device": device,
        "data": str(Path(data_path).resolve()), "num_problems": len(problems), "recipe": recipe,
        "layout": layout.__dict__, "max_steps": max_steps, "openrlhf_argv": argv,
        "patch_config": patch_config.__dict__,
    }
    training.write_manifest(run_path, manifest)
    click.echo(f"run directory: {run_path}\n{training.command_line(argv)}", err=True)
    manifest = training.execute_run(run_path, manifest)
    click.echo(f"finished after {manifest['global_step']} steps; final model: {run_path / 'final_model'}")


def _resume(run_dir, max_steps):
    from pipelines import training

    try:
        manifest = training.read_manifest(run_dir)
    except (FileNotFoundError, ValueError) as err:
        raise click.ClickException(str(err))
    if max_steps is not None:
        manifest["max_steps"] = max_steps
        manifest["patch_config"]["max_steps"] = max_steps
    click.echo(f"resuming {run_dir} from step {training.last_logged_step(run_dir)}", err=True)
    manifest = training.execute_run(Path(run_dir).resolve(), manifest, resume=True)
    click.echo(f"finished after {manifest['global_step']} steps; final model: {Path(run_dir) / 'final_model'}")


def _version():
    from importlib.metadata import version

    return version("ngrpo")
