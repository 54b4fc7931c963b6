"""`ngrpo warmup`: a short supervised pass on synthetic arithmetic through OpenRLHF's SFT trainer."""
import json
from pathlib import Path

import click

from pipelines.datasets.arith import MIXES
from pipelines.launch.warmup import DEFAULT_RECIPE as R


@click.command("warmup", context_settings={"show_default": True})
@click.argument("model_dir", metavar="MODEL")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--problems", "n_problems", type=click.IntRange(min=1), default=R["n_problems"],
              help="Synthetic arithmetic problems in the SFT set (synthetic:arith, pipelines.datasets.data).")
@click.option("--epochs", type=click.IntRange(min=1), default=R["epochs"], help="Passes over the SFT set.")
@click.option("--lr", type=float, default=R["lr"], help="Peak AdamW learning rate (cosine to 10%, 5% warm-up).")
@click.option("--seed", type=int, default=R["seed"], help="Seed of the problems and of training.")
@click.option("--mix", type=click.Choice(sorted(MIXES)), default=R["mix"],
              help="Mixture of synthetic:arith levels (pipelines/datasets/arith.py), from its warm-up split.")
@click.option("--batch-size", type=click.IntRange(min=1), default=R["batch_size"], help="Sequences per optimizer step.")
@click.option("--max-len", type=click.IntRange(min=16), default=R["max_len"], help="Max tokens of prompt + answer.")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto",
              help="auto: cuda if available, else CPU mode (DeepSpeed CPU accelerator, gloo).")
@click.option("--eval", "eval_problems", type=click.IntRange(min=0), default=0,
              help="Afterwards, greedy accuracy on this many problems of the test split (0: skip).")
@click.option("--eval-samples", type=click.IntRange(min=0), default=0,
              help="With --eval: also the mean accuracy of this many samples per problem at temperature 1.")
@click.option("--overwrite", is_flag=True, help="Write into OUT_DIR even if it already holds a model.")
@click.option("--trust-remote-code", is_flag=True,
              help="Let a model whose config names custom code (auto_map) run that code; without it such a model "
                   "is refused, and OpenRLHF gets trust_remote_code=False.")
@click.option("-v", "--verbose", is_flag=True,
              help="Show OpenRLHF's output live (it always goes to OUT_DIR_warmup_work/train_sft.log).")
def warmup(model_dir, out_dir, n_problems, epochs, lr, seed, mix, batch_size, max_len, device, eval_problems,
           eval_samples, overwrite, trust_remote_code, verbose):
    """Warm MODEL up on arithmetic with OpenRLHF's SFT trainer; write the model to OUT_DIR.

    MODEL is a model folder, a GGUF file, a built-in model or a Hub id. The SFT set uses the RL
    training prompt (pipelines.datasets.prompts) and questions of the warm-up split, which RL training and
    evaluation never see, and teaches a one-line answer that ends in \\boxed{N}, so the warmed-up
    model earns some reward in `ngrpo train`. The data, log and DeepSpeed scratch go to
    OUT_DIR_warmup_work beside OUT_DIR.
    """
    from pipelines.models import ModelError, resolve_model
    from pipelines.launch.warmup import evaluate, warmup_sft

    out = Path(out_dir)
    if (out / "config.json").exists() and not overwrite:
        raise click.ClickException(f"{out} already holds a model (use --overwrite to replace it)")
    micro = min(batch_size, R["micro_batch_size"])
    if batch_size % micro:
        raise click.ClickException(f"--batch-size must be a multiple of {micro} or at most {micro}")
    try:
        model_dir = resolve_model(model_dir, allow_run_dir=True, log=lambda msg: click.echo(msg, err=True),
                                  trust_remote_code=trust_remote_code).path
        path = warmup_sft(model_dir, out, n_problems=n_problems, epochs=epochs, lr=lr, max_len=max_len, seed=seed,
                          mix=mix, batch_size=batch_size, micro_batch_size=micro,
                          device=None if device == "auto" else device, verbose=verbose,
                          trust_remote_code=trust_remote_code)
    except (RuntimeError, ValueError, ModelError) as err:
        raise click.ClickException(str(err))
    summary = json.loads((path / "warmup.json").read_text())
    losses = summary.get("gpt_loss") or []
    loss_text = f", loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses else ""
    click.echo(f"warmed-up model written to {path} ({len(losses)} steps, {summary['wall_time_s']:.0f} s{loss_text})")
    if eval_problems:
        result = evaluate(path, path.parent / f"{path.name}_warmup_work" / "eval", n_problems=eval_problems,
                          samples=eval_samples, seed=seed, mix=mix, trust_remote_code=trust_remote_code)
        line = f"test-split accuracy on {eval_problems} problems: greedy {result['greedy_accuracy']:.1%}"
        if eval_samples:
            line += f", sampled (T=1, {eval_samples}/problem) {result['sampled_accuracy']:.1%}"
        click.echo(line)
        summary["eval"] = result
        (path / "warmup.json").write_text(json.dumps(summary, indent=2))
