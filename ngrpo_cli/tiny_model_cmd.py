import click


@click.command("tiny-model")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--hidden-size", default=128, show_default=True, help="Model width (head_dim = hidden/heads must be >= 32 for vLLM CPU).")
@click.option("--layers", default=2, show_default=True, help="Number of transformer layers.")
@click.option("--heads", default=2, show_default=True, help="Attention heads.")
@click.option("--seed", default=0, show_default=True, help="Seed of the random initialisation.")
@click.option("--dtype", type=click.Choice(["bfloat16", "float32"]), default="bfloat16", show_default=True)
def tiny_model(out_dir, hidden_size, layers, heads, seed, dtype):
    """Build a small random Qwen2 model and a Qwen-style tokenizer in OUT_DIR."""
    from pipelines.launch.tiny_model import build_tiny_model

    try:
        path = build_tiny_model(out_dir, hidden_size=hidden_size, num_layers=layers, num_heads=heads, seed=seed, dtype=dtype)
    except ValueError as err:
        raise click.ClickException(str(err))
    click.echo(f"tiny model written to {path}")
