"""Supervised warm-up on synthetic arithmetic through OpenRLHF's own SFT trainer (CPU or GPU).

A random-init tiny model never answers a problem correctly, so every RL group would be all-wrong
and the demo would teach nothing. `warmup_sft` writes a small SFT set of arithmetic problems from
the warm-up split of `pipelines.datasets.arith` (questions that RL training and evaluation never see; the
exact RL prompt as input, a one-line worked answer ending in `\\boxed{N}<|im_end|>` as output) and
trains on it with `openrlhf.cli.train_sft`, unmodified, with real DeepSpeed ZeRO. The result is a
Hugging Face folder (bf16 weights, tokenizer, chat template). `evaluate` measures it with
`ngrpo eval`'s own code on the test split.

How OpenRLHF's SFT script runs without a GPU (`python -m pipelines.launch.warmup ARGV...` is the child):
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
one rank on a CPU torch, so the mesh patch of `cpu_mode.patch_openrlhf_for_cpu` is not needed. Attention is `eager` on CPU.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

OPENRLHF_SFT_MODULE = "openrlhf.cli.train_sft"
TRUST_REMOTE_CODE_ENV = "NGRPO_TRUST_REMOTE_CODE"  # the child's trust_remote_code (openrlhf_patch/remote_code.py)
IM_END = "<|im_end|>"
REPO_ROOT = Path(__file__).resolve().parents[2]

# The default recipe for the tiny model on a 2-core CPU: 600 steps of 32 (about 2 minutes). Measured
# on 200 test-split questions (docs/study-cpu/README.md): 500 steps gave 11 % sampled accuracy
# (T = 1), 600 steps 43 %, 700 steps 51 %, 1000 steps 54 %. 600 is in the regime the study needs:
# the model answers some questions but not most, and 37 % of groups of 4 samples are all wrong.
DEFAULT_RECIPE = dict(
    n_problems=3200,
    epochs=6,
    lr=3e-3,
    max_len=160,
    batch_size=32,
    micro_batch_size=32,
    seed=0,
    mix="study",
    zero_stage=2,
)


# ----------------------------------------------------------------------------- data


def warmup_problems(n: int, seed: int = 0, mix: str = DEFAULT_RECIPE["mix"]) -> List[dict]:
    """N problems of the warm-up split (never used for RL training or evaluation)."""
    from pipelines.datasets import arith

    return arith.problems(n, mix=mix, split="warmup", seed=seed)


def sft_records(problems: Sequence[dict]) -> List[dict]:
    """OpenRLHF SFT rows: `input` is the full chat prompt (used as is: no chat template, no
    input_template), `output` the worked answer. SFTDataset concatenates them; ending the output
    with the tokenizer's EOS (<|im_end|>) stops it from appending " <|im_end|>" itself."""
    from pipelines.datasets.arith import solution_text
    from pipelines.datasets.prompts import build_prompt

    return [{"input": build_prompt(p["problem"]), "output": solution_text(p["expression"], p["answer"]) + IM_END,
             "answer": p["answer"]} for p in problems]


def longest_row_tokens(model_dir, rows: Sequence[dict], trust_remote_code: bool = False) -> int:
    """Tokens of the longest input + output, as SFTDataset tokenizes them."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    texts = sorted({r["input"] + r["output"] for r in rows}, key=len)[-64:]  # the longest few by characters
    return max(len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"])


# ----------------------------------------------------------------------------- evaluation


def evaluate(model_dir, out_dir, *, n_problems: int, samples: int = 0, seed: int = 0,
             mix: str = DEFAULT_RECIPE["mix"], max_new_tokens: Optional[int] = None,
             trust_remote_code: bool = False) -> dict:
    """Greedy accuracy (and with SAMPLES > 0 the mean accuracy of that many samples per problem at
    temperature 1, top_p 1: what RL rollouts see) on N_PROBLEMS test-split problems, by `ngrpo
    eval`'s code (transformers backend, math-verify grading) into OUT_DIR/greedy and OUT_DIR/sampled.
    MAX_NEW_TOKENS defaults to arith.WORKED_SOLUTION_TOKENS: a budget that cuts a worked solution
    off would grade a right answer as wrong."""
    from pipelines.datasets import arith
    from pipelines.datasets.data import write_jsonl_atomic
    from pipelines.evaluate.evaluation import run_eval

    out_dir = Path(out_dir)
    bench = out_dir / "heldout.jsonl"
    write_jsonl_atomic(arith.problems(n_problems, mix=mix, split="test", seed=seed), bench)
    common = dict(backend="hf", max_new_tokens=max_new_tokens or arith.WORKED_SOLUTION_TOKENS, seed=seed,
                  progress=False, overwrite=True, log=lambda msg: None, trust_remote_code=trust_remote_code)
    greedy = run_eval(str(model_dir), [str(bench)], out_dir=out_dir / "greedy", n=1, temperature=0.0, **common)
    result = {"n_problems": n_problems, "greedy_accuracy": greedy["benchmarks"]["heldout"]["avg@1"]}
    if samples > 0:
        sampled = run_eval(str(model_dir), [str(bench)], out_dir=out_dir / "sampled", n=samples, temperature=1.0,
                           top_p=1.0, **common)
        result.update(sampled_accuracy=sampled["benchmarks"]["heldout"][f"avg@{samples}"], samples_per_problem=samples,
                      temperature=1.0)
    return result


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
    from openrlhf_patch.cpu import cpu_mode

    return "sdpa" if cpu_mode.flash_attn_missing() else "flash_attention_2"


def _children_cpu_s() -> float:
    """User + system CPU seconds of finished child processes (and the children they waited for)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _child_env(device: str, trust_remote_code: bool) -> dict:
    """The SFT child's environment: the repository importable, CPU patches on CPU, a one-process
    rendezvous, and the run's remote-code decision."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO_ROOT), env.get("PYTHONPATH", "")] if p)
    if device == "cpu":
        # `launch` reads the first (CPU patches); the second holds DeepSpeed to its CPU accelerator
        # even where a GPU is present. The flash_attn stub is put on sys.path by the child itself.
        from openrlhf_patch.cpu.cpu_mode import op_cache_env

        env.update(NGRPO_WARMUP_DEVICE="cpu", DS_ACCELERATOR="cpu", **op_cache_env())
    if device == "cpu" or "WORLD_SIZE" not in env:
        # A single-process "deepspeed launch": the env:// rendezvous variables the launcher would set.
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(_free_port()))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env[TRUST_REMOTE_CODE_ENV] = "1" if trust_remote_code else "0"  # OpenRLHF's hard-coded True otherwise
    return env


def _run_logged(cmd, env, cwd, log_path, verbose: bool) -> int:
    """Run CMD with its output in LOG_PATH (and on the terminal when VERBOSE); its exit status."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=str(cwd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for line in proc.stdout:  # the log always; the terminal too when verbose
            log.write(line)
            if verbose:
                sys.stdout.buffer.write(line)
                sys.stdout.flush()
        returncode = proc.wait()
    return returncode


def warmup_sft(model_dir, out_dir, *, n_problems: int = DEFAULT_RECIPE["n_problems"],
               epochs: int = DEFAULT_RECIPE["epochs"], lr: float = DEFAULT_RECIPE["lr"],
               max_len: int = DEFAULT_RECIPE["max_len"], seed: int = DEFAULT_RECIPE["seed"],
               mix: str = DEFAULT_RECIPE["mix"], batch_size: int = DEFAULT_RECIPE["batch_size"],
               micro_batch_size: int = DEFAULT_RECIPE["micro_batch_size"],
               zero_stage: int = DEFAULT_RECIPE["zero_stage"], device: Optional[str] = None,
               work_dir=None, extra_args: Sequence[str] = (), verbose: bool = False,
               trust_remote_code: bool = False) -> Path:
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
    if device is None:
        from pipelines.models import detect_device

        device = detect_device()
    rows = sft_records(warmup_problems(n_problems, seed=seed, mix=mix))
    longest = longest_row_tokens(model_dir, rows, trust_remote_code)
    if longest > max_len:
        # SFTDataset would silently cut answers (their \boxed{} included) at max_len.
        raise ValueError(f"the longest prompt + answer has {longest} tokens > max_len={max_len}; raise max_len")
    from pipelines.datasets.data import write_jsonl_atomic

    dataset = write_jsonl_atomic(rows, work / "sft_train.jsonl")
    tb_dir = work / "tensorboard"
    if tb_dir.exists():  # losses are read back from here: no events of an earlier run
        shutil.rmtree(tb_dir)
    argv = sft_argv(model_dir, dataset, out_dir, epochs=epochs, lr=lr, max_len=max_len, batch_size=batch_size,
                    micro_batch_size=micro_batch_size, seed=seed, zero_stage=zero_stage, device=device,
                    ckpt_dir=work / "ckpt", tensorboard_dir=tb_dir, extra=extra_args)

    cmd = [sys.executable, "-m", "pipelines.launch.warmup", *argv]
    (work / "command.txt").write_text(" ".join(cmd) + "\n")
    start, cpu_start = time.time(), _children_cpu_s()
    log_path = work / "train_sft.log"
    returncode = _run_logged(cmd, _child_env(device, trust_remote_code), work, log_path, verbose)
    wall, cpu = time.time() - start, _children_cpu_s() - cpu_start
    if returncode != 0:
        tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-20:])
        raise RuntimeError(f"OpenRLHF SFT exited with {returncode}; its log is {log_path}, ending:\n{tail}")
    if not (out_dir / "config.json").exists():
        raise RuntimeError(f"OpenRLHF SFT finished but wrote no model to {out_dir}")
    restore_inference_files(model_dir, out_dir)
    losses = read_tensorboard_losses(tb_dir)
    summary = {
        "base_model": str(model_dir),
        "recipe": dict(n_problems=n_problems, epochs=epochs, lr=lr, max_len=max_len, seed=seed,
                       mix=mix, batch_size=batch_size, micro_batch_size=micro_batch_size,
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
    from openrlhf_patch.cpu import cpu_mode

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
        from openrlhf_patch.cpu import cpu_mode

        cpu_mode.ensure_flash_attn_importable()
    from openrlhf_patch import remote_code

    remote_code.install(os.environ.get(TRUST_REMOTE_CODE_ENV) == "1")
    sys.argv = [OPENRLHF_SFT_MODULE, *argv]
    runpy.run_module(OPENRLHF_SFT_MODULE, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    launch(sys.argv[1:])
