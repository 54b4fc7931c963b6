"""`ngrpo report`: plots and a markdown table comparing the training logs of one or more runs."""
import click


@click.command("report", context_settings={"show_default": True})
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for report.md, report.json and the PNG figures (created; its report files are replaced).")
@click.option("--smooth", type=click.IntRange(min=1), default=1,
              help="Draw moving averages over this many steps (the raw values stay, faintly); 1 = raw values.")
def report(run_dirs, out_dir, smooth):
    """Plot and tabulate the training logs of RUN_DIRS (metrics.jsonl, eval results) into OUT_DIR.

    Every figure overlays all runs (labelled "algo: run") so algorithms compare at a glance:
    reward and accuracy, all-wrong / all-correct / mixed groups, response length, entropy, clip
    fractions at each bound, KL, and evaluation pass@1 when the runs have it. report.md holds a
    table of final and best values, steps and wall time per run, and embeds the figures.
    """
    from pipelines.studies.report import ReportError, build_report

    try:
        data = build_report(list(run_dirs), out_dir, smooth=smooth, log=lambda msg: click.echo(msg, err=True))
    except ReportError as err:
        raise click.ClickException(str(err))
    click.echo(f"wrote {data['report']} with {len(data['figures'])} figure(s) for {len(data['runs'])} run(s)")
