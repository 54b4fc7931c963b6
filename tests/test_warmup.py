"""The supervised warm-up (pipelines/launch/warmup.py, `ngrpo warmup`): data format, grading, and a short
real run of OpenRLHF's SFT trainer with DeepSpeed ZeRO-2 on CPU."""
import json

import pytest
from click.testing import CliRunner

from pipelines.datasets import arith
from pipelines.datasets.grading import extract_boxed
from pipelines.datasets.prompts import build_prompt
from pipelines.launch.warmup import sft_records, warmup_problems

SHORT_RUN = ["--problems", "320", "--epochs", "1", "--seed", "0", "--eval", "20"]
SHORT_STEPS = 320 // 32


def sft_loss(model_dir, rows, max_len: int = 160) -> float:
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


def test_sft_rows_use_the_rl_prompt_and_end_in_the_boxed_answer():
    problems = warmup_problems(50, seed=3)
    rows = sft_records(problems)
    assert len(rows) == 50
    for p, row in zip(problems, rows):
        assert row["input"] == build_prompt(p["problem"])
        assert row["output"] == arith.solution_text(p["expression"], p["answer"]) + "<|im_end|>"
        assert extract_boxed(row["output"]) == p["answer"]
    assert [p["problem"] for p in warmup_problems(50, seed=3)] == [p["problem"] for p in problems]


def test_warmup_questions_come_from_the_warmup_split_only():
    assert {arith.split_of(p["expression"]) for p in warmup_problems(500, seed=0)} == {"warmup"}


def test_openrlhf_sft_dataset_reads_the_rows_as_written():
    """With the identity input template and no chat template, OpenRLHF's preprocessing keeps the
    prompt and the response verbatim (what warmup's flags select)."""
    from openrlhf.datasets.sft_dataset import preprocess_data

    row = sft_records(warmup_problems(1, seed=1))[0]
    assert preprocess_data(row, "{}", "input", "output", apply_chat_template=None) == (row["input"], row["output"])


def test_cli_refuses_to_overwrite_a_model(tmp_path, tiny_model_dir):
    from ngrpo_cli.warmup_cmd import warmup

    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    result = CliRunner().invoke(warmup, [str(tiny_model_dir), str(out)])
    assert result.exit_code != 0 and "--overwrite" in result.output


# ----------------------------------------------------------------------------- real SFT run


@pytest.fixture(scope="module")
def warmed(tiny_model_dir, tmp_path_factory):
    """`ngrpo warmup` on 320 problems for one epoch (10 optimizer steps): OpenRLHF SFT on CPU."""
    from ngrpo_cli.warmup_cmd import warmup

    out = tmp_path_factory.mktemp("warmup") / "model"
    result = CliRunner().invoke(warmup, [str(tiny_model_dir), str(out), *SHORT_RUN])
    log = out.parent / "model_warmup_work" / "train_sft.log"
    assert result.exit_code == 0, f"{result.output}\n{log.read_text()[-4000:] if log.exists() else ''}"
    return out, result.output


@pytest.mark.slow
def test_warmup_writes_a_loadable_hf_model_folder(warmed, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, output = warmed
    assert "test-split accuracy on 20 problems: greedy" in output
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json"):
        assert (out / name).is_file(), name
    # What vLLM reads: architecture, dtype, vocabulary size, context length.
    config = json.loads((out / "config.json").read_text())
    base = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["model_type"] == "qwen2"
    assert config["dtype"] == "bfloat16" and config["use_cache"] is True
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings",
                "eos_token_id"):
        assert config[key] == base[key], key

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.padding_side == "left" and tok.eos_token == "<|im_end|>"
    question = "What is 2 + 5?"
    user = f"{question}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
    assert tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                   add_generation_prompt=True) == build_prompt(question)

    model = AutoModelForCausalLM.from_pretrained(out)
    base_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert next(model.parameters()).dtype == torch.bfloat16
    weights, base_weights = model.state_dict(), base_model.state_dict()
    assert weights.keys() == base_weights.keys()
    changed = [k for k in weights if not torch.equal(weights[k], base_weights[k])]
    assert len(changed) >= len(weights) - 2, f"only {len(changed)} of {len(weights)} tensors changed"
    assert all(torch.isfinite(w.float()).all() for w in weights.values())


@pytest.mark.slow
def test_warmup_lowers_the_training_loss(warmed, tiny_model_dir):
    out, _ = warmed
    rows = [json.loads(line) for line in (out.parent / "model_warmup_work" / "sft_train.jsonl").open()]
    assert len(rows) == 320
    before, after = sft_loss(tiny_model_dir, rows[:64]), sft_loss(out, rows[:64])
    assert after < before - 1.0, (before, after)

    summary = json.loads((out / "warmup.json").read_text())
    assert summary["trainer"] == "openrlhf.cli.train_sft" and summary["recipe"]["device"] == "cpu"
    losses = summary["gpt_loss"]  # OpenRLHF's own logged per-step loss (TensorBoard)
    assert len(losses) == SHORT_STEPS
    assert sum(losses[-3:]) / 3 < losses[0] - 1.0, losses
    # the accuracy line is `ngrpo eval`'s own summary of 20 greedy answers on the test split
    greedy = json.loads((out.parent / "model_warmup_work" / "eval" / "greedy" / "summary.json").read_text())
    assert summary["eval"] == {"n_problems": 20, "greedy_accuracy": greedy["benchmarks"]["heldout"]["avg@1"]}
    assert greedy["settings"]["temperature"] == 0.0 and greedy["benchmarks"]["heldout"]["problems"] == 20
