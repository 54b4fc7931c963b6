import click


@click.command("prepare-data")
@click.argument("sources", nargs=-1, required=True)
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False),
              help="The normalised JSONL to write (id, problem, answer, source, metadata); written atomically.")
@click.option("--data-dir", type=click.Path(file_okay=False, exists=True), default=None, envvar="NGRPO_DATA_DIR",
              help="Read benchmark names from this folder (math500/test.jsonl, aime2025/test.parquet, amc23/test.parquet, "
                   "aime24/test.jsonl, math/train.parquet, math/test.parquet) instead of the Hugging Face Hub. "
                   "[env: NGRPO_DATA_DIR]")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Keep only the first N problems (after --shuffle).")
@click.option("--shuffle", is_flag=True, help="Shuffle the problems (with --seed) before --limit and writing.")
@click.option("--seed", default=0, show_default=True, help="Seed of --shuffle.")
@click.option("--skip-invalid", is_flag=True,
              help="Drop invalid rows (empty problem/answer, a boolean/NaN/infinite answer, unparseable gold answer, "
                   "invalid UTF-8 or JSON, lone surrogates, nesting deeper than 100 levels, duplicate id) instead "
                   "of failing; prints how many and why.")
@click.option("--check-answers/--no-check-answers", default=True, show_default=True,
              help="Check that math-verify can parse every gold answer.")
@click.option("--check-overlap", default=None, metavar="BENCH,...",
              help="Report problems that also occur in these benchmarks (names or files; normalised-text match). "
                   "Default: the eval benchmarks (math500, aime2025, amc23, aime24) found in --data-dir that are not "
                   "among the SOURCEs; 'none' disables.")
@click.option("--drop-overlap", is_flag=True, help="Also remove the overlapping problems from the output (decontaminate).")
@click.option("--progress/--no-progress", default=None, help="Progress bars (default: for big inputs).")
def prepare_data(sources, out, data_dir, limit, shuffle, seed, skip_invalid, check_answers, check_overlap,
                 drop_overlap, progress):
    """Normalise SOURCEs into one JSONL that `ngrpo train` and `ngrpo eval` read.

    \b
    A SOURCE is one of
      a benchmark name:  math500, aime2025, amc23, aime24, math-train, math-test
                         (Hugging Face Hub by default, local files with --data-dir)
      a local file:      data.jsonl, data.json or data.parquet, in the plain layout
                         (problem/question + answer, or a \\boxed{} answer in solution)
                         or the verl RL layout (prompt chat list + reward_model.ground_truth.target)
      a Hub dataset:     owner/name[:config][@split]
      synthetic:arith?n=2000&difficulty=1&seed=0
                         seeded arithmetic problems; difficulty 1 is "What is 3 + 4?"

    \b
    Examples:
      ngrpo prepare-data math-train -o data/math_train.jsonl --skip-invalid
      ngrpo prepare-data math500 aime2025 amc23 --data-dir ../shared/data -o data/eval.jsonl
      ngrpo prepare-data "synthetic:arith?n=2000&difficulty=1" -o data/arith.jsonl
    """
    from pipelines.datasets.data import DataError, prepare

    overlap = None
    if check_overlap is not None:
        overlap = [] if check_overlap.strip().lower() in ("", "none", "no") else \
            [s.strip() for s in check_overlap.split(",") if s.strip()]
    try:
        prepare(list(sources), out, data_dir=data_dir, limit=limit, shuffle=shuffle, seed=seed,
                skip_invalid=skip_invalid, check_answers=check_answers, check_overlap=overlap,
                drop_overlap=drop_overlap, progress=progress, log=lambda s: click.echo(s, err=True))
    except DataError as err:
        raise click.ClickException(str(err))
