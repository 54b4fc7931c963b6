"""`ngrpo study`: the paper's comparison in one command (pipelines/studies/study.py)."""
import os
import platform
import shlex
import sys

import click

from ngrpo_cli.train_cmd import _recipe_options
from pipelines.launch.recipes import ALGO_SETTINGS, ALGOS, PRESETS


def _ints(ctx, param, value):
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: comma-separated integers, e.g. 0,1,2")


def _algos(ctx, param, value):
    from pipelines.launch.recipes import SETTINGS
    from pipelines.studies.study import StudyError, parse_arm

    algos = [v.strip() for v in value.split(",") if v.strip()]
    try:
        arms = [parse_arm(a) for a in algos]
    except StudyError as err:
        raise click.BadParameter(str(err))
    unknown = [a for a, _ in arms if a not in ALGOS]
    if unknown or not algos:
        raise click.BadParameter(f"unknown {', '.join(unknown) or 'empty list'}; choose from {', '.join(ALGOS)}")
    bad = [name for _, own in arms for name, _ in own if name.replace("-", "_") not in SETTINGS]
    if bad:
        raise click.BadParameter(f"{', '.join(bad)}: not a recipe setting (`ngrpo train --help` lists them)")
    if len(set(algos)) != len(algos):
        raise click.BadParameter(f"{value!r}: an algorithm or arm is named twice")
    return algos


def machine() -> str:
    import torch

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return (f"{platform.machine()} machine, {os.cpu_count()} CPU cores, {mem:.0f} GiB memory, "
            f"{', '.join(gpus) if gpus else 'no GPU'}; Python {platform.python_version()}, torch {torch.__version__}")


@click.command("study", context_settings={"show_default": True})
@click.option("-o", "--output", "study_dir", required=True, type=click.Path(file_okay=False), help="Study folder.")
@click.option("--model", required=True, help="Base model of every run (as `ngrpo train --model`).")
@click.option("--data", "data_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Training problems (a JSONL from `ngrpo prepare-data`).")
@click.option("--eval", "benchmarks", required=True, metavar="B1,B2,...",
              help="Benchmarks every final model and the base model are evaluated on (as `ngrpo eval --benchmarks`).")
@click.option("--algos", default="ngrpo,grpo,dapo,w_reinforce", callback=_algos,
              help=f"Algorithms: {', '.join(ALGOS)}. An arm with settings of its own: "
                   "ALGO@SETTING=VALUE[@SETTING=VALUE], e.g. grpo@uniform-groups=mask-aux beside grpo.")
@click.option("--seeds", default="0,1,2", callback=_ints, help="Seeds; one run per algorithm and seed.")
@click.option("--max-steps", type=click.IntRange(min=1), default=None, help="Training steps of every run.")
@click.option("--budget", type=(click.Choice(["steps", "samples", "tokens"]), click.IntRange(min=1)), default=None,
              metavar="KIND AMOUNT",
              help="The same budget for every run: `steps N` (as --max-steps), `samples N` (stop once N responses "
                   "were generated, groups the filter dropped included: `ngrpo train --max-samples`) or `tokens N` "
                   "(generated response tokens: --max-generated-tokens). Algorithms that drop groups then train on "
                   "fewer steps for the same generation.")
@click.option("--preset", type=click.Choice(["auto", *PRESETS]), default="auto", help="As `ngrpo train --preset`.")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto")
@click.option("--save-steps", type=click.IntRange(min=1), default=None, help="As `ngrpo train --save-steps`.")
@click.option("--drop-checkpoints", is_flag=True,
              help="Remove a finished run's checkpoints once its final model is evaluated (the final model, logs and "
                   "metrics stay; the run can no longer be continued). For studies of many runs of a real model.")
@click.option("--reward-file", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--eval-data", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Validation problems during training (as `ngrpo train --eval-data`).")
@click.option("--eval-every", type=click.IntRange(min=1), default=None, help="As `ngrpo train --eval-every`.")
@click.option("--eval-n", type=click.IntRange(min=1), default=4, help="Samples per problem in the final evaluations.")
@click.option("--eval-temperature", type=click.FloatRange(min=0), default=0.6)
@click.option("--eval-top-p", type=click.FloatRange(0, 1, min_open=True), default=0.95)
@click.option("--eval-max-new-tokens", type=click.IntRange(min=1), default=4096)
@click.option("--eval-limit", type=click.IntRange(min=1), default=None, help="First N problems of each benchmark.")
@click.option("--eval-backend", type=click.Choice(["vllm", "hf"]), default="vllm")
@click.option("--data-dir", type=click.Path(file_okay=False, exists=True), default=None, envvar="NGRPO_DATA_DIR",
              help="Benchmark files laid out like the shared data folder (as `ngrpo eval --data-dir`).")
@click.option("--overwrite", is_flag=True, help="Start again when STUDY_DIR holds a study with other settings.")
@click.option("--trust-remote-code", is_flag=True,
              help="Let a model whose config names custom code (auto_map) run that code, in every run and evaluation "
                   "(as `ngrpo train --trust-remote-code`); without it such a model is refused.")
@_recipe_options
def study(study_dir, model, data_path, benchmarks, algos, seeds, max_steps, budget, preset, device, save_steps,
          drop_checkpoints, reward_file,
          eval_data, eval_every, eval_n, eval_temperature, eval_top_p, eval_max_new_tokens, eval_limit, eval_backend,
          data_dir, overwrite, trust_remote_code, **recipe_flags):
    """Train every ALGO x SEED alike on DATA, evaluate the base model and every final model alike on
    the --eval benchmarks, and compare them: STUDY_DIR/study.md, study.json and figures.

    Each run is an ordinary `ngrpo train` run directory (STUDY_DIR/runs/ALGO-sSEED); only the
    algorithm's recipe and the seed differ. Recipe flags given here apply to every run. The same
    command again continues the study: finished runs and evaluations are kept, an interrupted run
    resumes from its checkpoint; a changed setting is refused unless --overwrite.

    \b
    The CPU study of docs/study-cpu/:
      ngrpo study -o study --model warm-model --data train.jsonl --eval test.jsonl \\
        --algos ngrpo,grpo,dapo,w_reinforce --seeds 0,1,2 --max-steps 50
    """
    from pipelines.models import resolve_model
    from pipelines.studies.study import Study, StudyError, StudyPlan, fingerprint_files

    if budget and budget[0] == "steps" and max_steps is not None:
        raise click.UsageError("--budget steps N and --max-steps both set the steps: give one")
    from pipelines.studies.study_report import write_report

    # the model's own checks (custom code among them) before the study folder is made
    resolve_model(model, allow_run_dir=True, log=lambda msg: click.echo(msg, err=True),
                  trust_remote_code=trust_remote_code)
    train_args = ["--trust-remote-code"] if trust_remote_code else []
    for flag, value in (("--save-steps", save_steps), ("--reward-file", reward_file),
                        ("--eval-data", eval_data), ("--eval-every", eval_every)):
        if value is not None:
            train_args += [flag, os.path.abspath(value) if flag in ("--reward-file", "--eval-data") else str(value)]
    recipe = {k: (list(v) if isinstance(v, tuple) else v) for k, v in recipe_flags.items() if v is not None}
    evaluation = {"n": eval_n, "temperature": eval_temperature, "top_p": eval_top_p,
                  "max_new_tokens": eval_max_new_tokens, "backend": eval_backend, "seed": 0,
                  "answer_extraction": recipe.get("answer_extraction", "boxed")}
    if recipe.get("uncertain_reward") is not None or any(
            ALGO_SETTINGS[a.split("@")[0]].get("uncertain_reward") is not None for a in algos):
        # an algorithm that may abstain (UCPO, GRPO-UC): every model is evaluated with the prompt
        # that offers abstention, and the table gains its measures (accuracy, PAQ, ...)
        evaluation["abstention"] = True
    if eval_limit:
        evaluation["limit"] = eval_limit
    if trust_remote_code:
        evaluation["trust_remote_code"] = True
    if data_dir:
        evaluation["data_dir"] = os.path.abspath(data_dir)
    names = [b.strip() for b in benchmarks.split(",") if b.strip()]
    plan = StudyPlan(model=model if not os.path.exists(model) else os.path.abspath(model),
                     data=os.path.abspath(data_path), benchmarks=[os.path.abspath(b) if os.path.exists(b) else b
                                                                   for b in names],
                     algos=algos, seeds=seeds, max_steps=max_steps, preset=preset, device=device, recipe=recipe,
                     train_args=train_args, eval=evaluation, budget=list(budget) if budget else None,
                     drop_checkpoints=drop_checkpoints,
                     input_files=fingerprint_files([data_path, *names, eval_data, reward_file]))
    try:
        runner = Study(study_dir, plan, overwrite=overwrite, log=lambda msg: click.echo(msg, err=True))
        click.echo(f"study: {len(plan.runs())} runs ({', '.join(algos)} x seeds {', '.join(map(str, seeds))}) in "
                   f"{runner.dir}", err=True)
        state = runner.execute()
    except StudyError as err:
        raise click.ClickException(str(err))
    except KeyboardInterrupt:
        raise click.ClickException(f"interrupted; run the same command to continue the study in {study_dir} "
                                   "(finished runs are kept, an interrupted one resumes from its checkpoint)")
    command = " ".join(shlex.quote(a) for a in ["ngrpo", *sys.argv[1:]])
    write_report(runner.dir, state, header=f"Command: `{command}`\n\nMachine: {machine()}.")
    runner.save()
    click.echo(f"wrote {runner.dir / 'study.md'}")
    if runner.failed:
        raise click.ClickException(f"{len(runner.failed)} run(s) did not finish: {', '.join(runner.failed)} "
                                   f"(logs in {runner.dir / 'logs'}); run the same command to retry them")
