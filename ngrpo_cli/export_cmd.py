"""`ngrpo export-hf`: a run, an OpenRLHF DeepSpeed checkpoint or an HF checkpoint -> a Hugging Face folder."""
import re

import click

_SHARD_SIZE = re.compile(r"^\s*\d+(\.\d+)?\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)


def _shard_size(ctx, param, value):
    if value is None or _SHARD_SIZE.match(str(value)):
        return value.strip() if isinstance(value, str) else value
    raise click.BadParameter(f"{value!r} is not a size such as 5GB, 500MB or 2GiB")


@click.command("export-hf", context_settings={"show_default": True})
@click.argument("source", type=click.Path(exists=True, file_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--step", type=click.IntRange(min=0), default=None,
              help="Export the DeepSpeed checkpoint global_stepN instead of the one the `latest` tag names.")
@click.option("--final", is_flag=True, help="From a run directory: export final_model/ instead of its latest DeepSpeed checkpoint.")
@click.option("--base-model", default=None,
              help="Model folder or hub id giving config, tokenizer and generation config (needed for a bare "
                   "DeepSpeed checkpoint outside a run).  [default: the run's base model]")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default=None,
              help="Dtype of the written weights.  [default: the model config's dtype]")
@click.option("--max-shard-size", default="5GB", callback=_shard_size,
              help="Split the safetensors weights into shards of at most this size.")
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it exists and is not empty.")
@click.option("--allow-unsafe-pickle", is_flag=True,
              help="If a file of the DeepSpeed checkpoint holds an object that torch.load(weights_only=True) refuses, "
                   "load it with weights_only=False. That can run code stored in the file: only for checkpoints you made.")
@click.option("--trust-remote-code", is_flag=True,
              help="Let a model whose config names custom code (auto_map) run that code; without it such a model "
                   "is refused.")
def export_hf(source, out_dir, step, final, base_model, dtype, max_shard_size, force, allow_unsafe_pickle,
              trust_remote_code):
    """Write the weights of SOURCE as a Hugging Face model folder OUT_DIR.

    SOURCE is a run directory (its latest DeepSpeed checkpoint, or final_model/ with --final), an
    OpenRLHF DeepSpeed checkpoint folder (`checkpoints/_actor` or one `global_stepN` in it; ZeRO
    stage 0-3, consolidated by DeepSpeed's zero_to_fp32 from the fp32 master weights), or a
    Hugging Face folder (final_model, global_stepN_hf). OUT_DIR gets safetensors weights, config,
    tokenizer, generation config and a model card (README.md) with the run's algorithm, recipe,
    steps and `ngrpo eval` results.
    """
    from pipelines.export import ExportError, export_hf as run_export

    try:
        result = run_export(source, out_dir, step=step, final=final, base_model=base_model, dtype=dtype,
                            max_shard_size=max_shard_size, force=force, allow_unsafe_pickle=allow_unsafe_pickle,
                            trust_remote_code=trust_remote_code,
                            log=lambda msg: click.echo(msg, err=True))
    except ExportError as err:
        raise click.ClickException(str(err))
    step_text = f", step {result.source.step}" if result.source.step is not None else ""
    click.echo(f"exported {result.source.describe()}{step_text} -> {result.out_dir} "
               f"({result.num_parameters:,} parameters, {result.dtype}, {len(result.weight_files)} safetensors file(s))")
