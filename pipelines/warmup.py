"""Supervised warm-up on synthetic arithmetic through OpenRLHF's own SFT trainer (CPU or GPU).

A random-init tiny model never answers a problem correctly, so every RL group would be all-wrong
and the demo would teach nothing. `warmup_sft` writes a small SFT set of seeded arithmetic problems
(the exact RL prompt from `pipelines.prompts.build_prompt` as input, a one-line worked answer ending
in `\\boxed{N}<|im_end|>` as output) and trains on it with `openrlhf.cli.train_sft`, unmodified, with
real DeepSpeed ZeRO. The result is a Hugging Face folder (bf16 weights, tokenizer, chat template).

How OpenRLHF's SFT script runs without a GPU (`python -m pipelines.warmup ARGV...` is the child):
  * it is a deepspeed-launched script; here it runs as one process that sets RANK/WORLD_SIZE/
    LOCAL_RANK/MASTER_ADDR/MASTER_PORT itself and executes the module with `runpy` as `__main__`,
    so its real argparse parser, `train(args)`, SFTDataset and SFTTrainer run as written;
  * `DS_ACCELERATOR=cpu`: DeepSpeed's CPU accelerator and a gloo process group (DeepSpeed would
    fall back to it on a CUDA-less torch anyway; set so that `--device cpu` also holds on a GPU box);
  * `cpu_mode.ensure_flash_attn_importable()`: OpenRLHF imports flash_attn at module level;
  * `cpu_mode.patch_torch_cuda()`: of its no-ops the SFT path hits three, each of which raises
    "Torch not compiled with CUDA enabled" otherwise: torch.cuda.set_device (strategy
    setup_distributed), torch.cuda.current_device (all-reduce of the logged scalars: the CPU
    tensor goes to "cpu") and torch.cuda.synchronize (barrier in save_model).
Nothing else is patched: the strategy's `init_device_mesh("cuda", ...)` builds a working mesh of
one rank on a CPU torch, so the mesh patch of `cpu_mode.patch_openrlhf_for_cpu` (which also
imports the PPO/Ray/vLLM modules) is not needed. Attention is `eager` on CPU.
"""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

OPENRLHF_SFT_MODULE = "openrlhf.cli.train_sft"
IM_END = "<|im_end|>"
REPO_ROOT = Path(__file__).resolve().parents[1]

# The default recipe, tuned for the tiny model (hidden 128, 2 layers) on a 2-core CPU: 150 AdamW
# steps of 32 sequences, ~45 s wall / ~70 CPU-s on an idle machine. Held-out difficulty-1 accuracy
# over three seeds: greedy 56-76%, sampled (T=1) 25-34%, mixed RL groups. Fewer steps (100) gave
# greedy 33% / sampled 15%; more (186) greedy 83% / sampled 65%; lr 6e-3 diverged to 6%.
DEFAULT_RECIPE = dict(
    n_problems=2400,
    epochs=2,
    lr=3e-3,
    max_len=160,
    batch_size=32,
    micro_batch_size=32,
    seed=0,
    difficulty=1,
    zero_stage=2,
)
# Held-out problems come from the same generator under a seed the training data never uses.
HELDOUT_SEED_OFFSET = 1_000_003


# ----------------------------------------------------------------------------- data


def arith_problems(n: int, seed: int = 0, difficulty: int = 1) -> List[dict]:
    """`n` seeded problems of `pipelines.data`'s synthetic:arith generator (the RL data), each with
    a `solution`: the short worked answer the model is taught."""
    from pipelines.data import synthetic_arith

    rows = synthetic_arith(n, difficulty=difficulty, seed=seed)
    return [{"question": r["problem"], "answer": r["answer"], "solution": solution_text(r["expression"], r["answer"])}
            for r in rows]


def heldout_problems(n: int, seed: int = 0, difficulty: int = 1) -> List[dict]:
    """A fresh draw of the same distribution (another seed of the generator). Difficulty 1 has only
    100 distinct questions (two digits 0-9), so these are new samples, not unseen questions."""
    return arith_problems(n, seed=seed + HELDOUT_SEED_OFFSET, difficulty=difficulty)


def solution_text(expression: str, answer: str) -> str:
    """One line of work, then the boxed answer: "3 + 4 = 7. The answer is \\boxed{7}."."""
    return f"{expression} = {answer}. The answer is \\boxed{{{answer}}}."


def sft_records(problems: Sequence[dict]) -> List[dict]:
    """OpenRLHF SFT rows: `input` is the full chat prompt (used as is: no chat template, no
    input_template), `output` the response. SFTDataset concatenates them; ending the output with
    the tokenizer's EOS (<|im_end|>) stops it from appending " <|im_end|>" itself."""
    from pipelines.prompts import build_prompt

    return [
        {"input": build_prompt(p["question"]), "output": p["solution"] + IM_END, "answer": p["answer"]}
        for p in problems
    ]


def longest_row_tokens(model_dir, rows: Sequence[dict]) -> int:
    """Tokens of the longest input + output, as SFTDataset tokenizes them."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    texts = sorted({r["input"] + r["output"] for r in rows}, key=len)[-64:]  # the longest few by characters
    return max(len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"])


# ----------------------------------------------------------------------------- grading


def exact_match(response: str, answer: str) -> bool:
    """The warm-up's own quick check: the last boxed content (the reward's extraction) equals the
    gold answer, spaces ignored; no math-verify, so thousands of generations grade instantly."""
    from pipelines.grading import extract_boxed

    got = extract_boxed(response)
    return got is not None and re.sub(r"\s+", "", got) == re.sub(r"\s+", "", str(answer))


def evaluate_accuracy(model_dir, problems: Sequence[dict], *, samples: int = 0, temperature: float = 1.0,
                      max_new_tokens: int = 32, batch_size: int = 64, seed: int = 0, dtype: str = "auto") -> dict:
    """Greedy accuracy (and, with samples > 0, mean sampled accuracy at `temperature`, top_p 1) of
    the model at `model_dir` on `problems`, with transformers generate and `exact_match`. dtype
    "auto" is the model's own (bf16, as vLLM rolls it out in RL)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipelines.prompts import build_prompt

    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype if dtype == "auto" else getattr(torch, dtype))
    model.eval()
    eos = [tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids("<|endoftext|>")]
    torch.manual_seed(seed)

    def run(do_sample, n_return):
        correct, total, examples = 0, 0, []
        for i in range(0, len(problems), batch_size):
            chunk = problems[i:i + batch_size]
            enc = tok([build_prompt(p["question"]) for p in chunk], return_tensors="pt", padding=True,
                      add_special_tokens=False)
            kwargs = dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0) if do_sample \
                else dict(do_sample=False)
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=max_new_tokens, num_return_sequences=n_return,
                                     eos_token_id=eos, pad_token_id=tok.pad_token_id, **kwargs)
            texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for k, text in enumerate(texts):
                ok = exact_match(text, chunk[k // n_return]["answer"])
                correct += ok
                total += 1
                if len(examples) < 3:
                    examples.append(text)
        return correct / max(total, 1), examples

    result = {"n_problems": len(problems)}
    result["greedy_accuracy"], result["greedy_examples"] = run(False, 1)
    if samples > 0:
        result["sampled_accuracy"], result["sampled_examples"] = run(True, samples)
        result["samples_per_problem"], result["temperature"] = samples, temperature
    return result


def sft_loss(model_dir, rows: Sequence[dict], max_len: int = 160) -> float:
    """Mean per-token NLL of the responses given the prompts (the SFT objective), with transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            prompt_ids = tok(row["input"], add_special_tokens=False)["input_ids"]
            ids = tok(row["input"] + row["output"], add_special_tokens=False)["input_ids"][:max_len]
            labels = list(ids)
            labels[:len(prompt_ids)] = [-100] * len(prompt_ids)
            out = model(torch.tensor([ids]), labels=torch.tensor([labels]))
            n = sum(1 for x in labels[1:] if x != -100)
            nll += out.loss.item() * n
            count += n
    return nll / max(count, 1)


# ----------------------------------------------------------------------------- training


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sft_argv(model_dir, dataset, out_dir, *, epochs: int, lr: float, max_len: int, batch_size: int,
             micro_batch_size: int, seed: int, zero_stage: int, device: str, ckpt_dir, tensorboard_dir=None,
             extra: Sequence[str] = ()) -> List[str]:
    """The command line of openrlhf.cli.train_sft (its real, dotted flag names)."""
    argv = {
        "--model.model_name_or_path": model_dir,
        "--data.dataset": dataset,
        "--data.input_key": "input",
        "--data.output_key": "output",
        # The input already is the full chat prompt: the template is identity, no chat template.
        "--data.input_template": "{}",
        "--data.max_len": max_len,
        "--train.max_epochs": epochs,
        "--train.batch_size": batch_size,
        "--train.micro_batch_size": micro_batch_size,
        "--train.seed": seed,
        "--adam.lr": lr,
        "--lr_scheduler": "cosine_with_min_lr",
        "--lr_warmup_ratio": 0.05,
        "--min_lr_ratio": 0.1,
        "--max_norm": 1.0,
        "--ds.zero_stage": zero_stage,
        "--ds.param_dtype": "bf16",
        "--ckpt.output_dir": out_dir,
        "--ckpt.path": ckpt_dir,
        "--logger.logging_steps": 1,
        # Names the TensorBoard sub-folder (default: a timestamp with a colon in it).
        "--logger.wandb.run_name": "warmup",
    }
    argv["--ds.attn_implementation"] = attn_implementation(device)
    if tensorboard_dir:
        argv["--logger.tensorboard_dir"] = tensorboard_dir
    out = []
    for key, value in argv.items():
        out += [key, str(value)]
    return out + list(extra)


def attn_implementation(device: str) -> str:
    """eager on CPU (as the RL pipeline); on GPU OpenRLHF's flash_attention_2 where flash_attn is
    installed, else PyTorch's sdpa."""
    if device == "cpu":
        return "eager"
    from openrlhf_patch import cpu_mode

    return "sdpa" if cpu_mode.flash_attn_missing() else "flash_attention_2"


def _children_cpu_s() -> float:
    """User + system CPU seconds of finished child processes (and the children they waited for)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def warmup_sft(model_dir, out_dir, *, n_problems: int = DEFAULT_RECIPE["n_problems"],
               epochs: int = DEFAULT_RECIPE["epochs"], lr: float = DEFAULT_RECIPE["lr"],
               max_len: int = DEFAULT_RECIPE["max_len"], seed: int = DEFAULT_RECIPE["seed"],
               difficulty: int = DEFAULT_RECIPE["difficulty"], batch_size: int = DEFAULT_RECIPE["batch_size"],
               micro_batch_size: int = DEFAULT_RECIPE["micro_batch_size"],
               zero_stage: int = DEFAULT_RECIPE["zero_stage"], device: Optional[str] = None,
               work_dir=None, extra_args: Sequence[str] = (), quiet: bool = False) -> Path:
    """Warm `model_dir` up on `n_problems` seeded arithmetic problems with OpenRLHF's SFT trainer and
    write the Hugging Face model folder `out_dir` (bf16, tokenizer, chat template). Returns out_dir.

    Besides the model, out_dir gets `warmup.json` (the recipe, the wall time and OpenRLHF's
    logged per-step `gpt_loss`); the SFT data and DeepSpeed scratch go to `work_dir`
    (default: out_dir/../<name>_warmup_work).
    """
    out_dir = Path(out_dir).resolve()
    model_dir = Path(model_dir).resolve()
    work = Path(work_dir).resolve() if work_dir else out_dir.parent / f"{out_dir.name}_warmup_work"
    work.mkdir(parents=True, exist_ok=True)
    device = device or _default_device()
    rows = sft_records(arith_problems(n_problems, seed=seed, difficulty=difficulty))
    longest = longest_row_tokens(model_dir, rows)
    if longest > max_len:
        # SFTDataset would silently cut answers (their \boxed{} included) at max_len.
        raise ValueError(f"the longest prompt + answer has {longest} tokens > max_len={max_len}; raise max_len")
    from pipelines.data import write_jsonl_atomic

    dataset = write_jsonl_atomic(rows, work / "sft_train.jsonl")
    tb_dir = work / "tensorboard"
    if tb_dir.exists():  # losses are read back from here: no events of an earlier run
        shutil.rmtree(tb_dir)
    argv = sft_argv(model_dir, dataset, out_dir, epochs=epochs, lr=lr, max_len=max_len, batch_size=batch_size,
                    micro_batch_size=micro_batch_size, seed=seed, zero_stage=zero_stage, device=device,
                    ckpt_dir=work / "ckpt", tensorboard_dir=tb_dir, extra=extra_args)

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO_ROOT), env.get("PYTHONPATH", "")] if p)
    if device == "cpu":
        # `launch` reads the first (CPU patches); the second holds DeepSpeed to its CPU accelerator
        # even where a GPU is present. The flash_attn stub is put on sys.path by the child itself.
        env.update(NGRPO_WARMUP_DEVICE="cpu", DS_ACCELERATOR="cpu")
    if device == "cpu" or "WORLD_SIZE" not in env:
        # A single-process "deepspeed launch": the env:// rendezvous variables the launcher would set.
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(_free_port()))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")

    cmd = [sys.executable, "-m", "pipelines.warmup", *argv]
    (work / "command.txt").write_text(" ".join(cmd) + "\n")
    start, cpu_start = time.time(), _children_cpu_s()
    log_path = work / "train_sft.log"
    if quiet:
        with open(log_path, "w") as log:
            proc = subprocess.run(cmd, env=env, cwd=str(work), stdout=log, stderr=subprocess.STDOUT)
    else:
        proc = subprocess.run(cmd, env=env, cwd=str(work))
    wall, cpu = time.time() - start, _children_cpu_s() - cpu_start
    if proc.returncode != 0:
        hint = f"; log: {log_path}" if quiet else ""
        raise RuntimeError(f"OpenRLHF SFT exited with {proc.returncode}{hint}")
    if not (out_dir / "config.json").exists():
        raise RuntimeError(f"OpenRLHF SFT finished but wrote no model to {out_dir}")
    restore_inference_files(model_dir, out_dir)
    losses = read_tensorboard_losses(tb_dir)
    summary = {
        "base_model": str(model_dir),
        "recipe": dict(n_problems=n_problems, epochs=epochs, lr=lr, max_len=max_len, seed=seed,
                       difficulty=difficulty, batch_size=batch_size, micro_batch_size=micro_batch_size,
                       zero_stage=zero_stage, device=device),
        "wall_time_s": round(wall, 1),
        "cpu_time_s": round(cpu, 1),
        "gpt_loss": losses,
        "trainer": OPENRLHF_SFT_MODULE,
    }
    (out_dir / "warmup.json").write_text(json.dumps(summary, indent=2))
    return out_dir


# Tokenizer files of the base model: SFT does not change the tokenizer, but OpenRLHF saves the one
# it loaded for training (right padding, class renamed); the base's files keep the folder identical
# for inference (left padding for batched generate, the same chat template).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "added_tokens.json", "vocab.json", "merges.txt", "generation_config.json")


def restore_inference_files(base_dir, out_dir) -> None:
    """Put back what training changed for its own purposes: the tokenizer files and generation
    config of the base model, and `use_cache: true` (OpenRLHF's Actor turns the KV cache off)."""
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    for name in TOKENIZER_FILES:
        if (base_dir / name).exists():
            shutil.copyfile(base_dir / name, out_dir / name)
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text())
    if config.get("use_cache") is False:
        config["use_cache"] = True
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def read_tensorboard_losses(tb_dir) -> List[float]:
    """OpenRLHF's logged `train/gpt_loss`, one value per optimizer step (empty if unreadable)."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return []
    values = {}
    for events in sorted(Path(tb_dir).rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if "train/gpt_loss" in acc.Tags().get("scalars", []):
            for ev in acc.Scalars("train/gpt_loss"):
                values[ev.step] = ev.value
    return [values[k] for k in sorted(values)]


# ----------------------------------------------------------------------------- child process


def apply_sft_cpu_patches() -> None:
    """The CPU patches of the SFT child (see the module docstring for why each is needed)."""
    from openrlhf_patch import cpu_mode

    cpu_mode.ensure_flash_attn_importable()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before OpenRLHF imports deepspeed
    cpu_mode.patch_torch_cuda()


def launch(argv: Sequence[str]) -> None:
    """Run openrlhf.cli.train_sft as `__main__` in this process with `argv` (CPU patches first)."""
    import runpy

    if os.environ.get("NGRPO_WARMUP_DEVICE") == "cpu":
        apply_sft_cpu_patches()
    else:
        # OpenRLHF imports flash_attn at module level, also on a GPU without it (then attention is sdpa).
        from openrlhf_patch import cpu_mode

        cpu_mode.ensure_flash_attn_importable()
    sys.argv = [OPENRLHF_SFT_MODULE, *argv]
    runpy.run_module(OPENRLHF_SFT_MODULE, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    launch(sys.argv[1:])
