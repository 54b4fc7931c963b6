"""`ngrpo export-hf` on checkpoints written by real CPU training runs (tests/fixtures_runs.py).

What the round trip compares (fp32 throughout):
* the exported folder, loaded with AutoModelForCausalLM.from_pretrained, against the base model's
  architecture holding the weights DeepSpeed's own zero_to_fp32 consolidates from the same
  checkpoint, loaded here independently (DeepSpeed's loader, not ngrpo's): weights equal exactly,
  logits to 1e-5;
* against the run's final_model (OpenRLHF's bf16 save after the last step, ZeRO-2 and ZeRO-3):
  the exported fp32 master weights rounded to bf16 equal final_model's weights exactly, and a model
  holding those rounded weights gives final_model's logits to 1e-5. The exported weights themselves
  are not bf16-representable (they are the fp32 masters, not a bf16 copy);
* against the base model: training changed the weights and the logits.
"""
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from fixtures_runs import tiny_runs  # noqa: F401  (session fixture: the two shared runs)
from ngrpo_cli.main import cli
from pipelines import export

pytestmark = pytest.mark.pipeline

LOGIT_ATOL = 1e-5


def ngrpo(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return result


def export_ok(*args):
    result = ngrpo("export-hf", *args)
    assert result.exit_code == 0, result.output
    return result


def export_fails(*args) -> str:
    result = ngrpo("export-hf", *args)
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    return result.output


def _manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "ngrpo_run.json").read_text())


def _ds_fp32(ckpt_dir: Path, tag: str) -> dict:
    """DeepSpeed's own consolidation, independent of ngrpo (its loader uses weights_only=False)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)


def _load(path, state_dict=None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    if state_dict is not None:
        model.load_state_dict(state_dict, strict=True)  # also checks the checkpoint's names are the HF ones
    return model.eval()


def _input_ids(model_dir: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    text = "What is 12 + 30? Please reason step by step, and put your final answer within \\boxed{}."
    ids = tok(text).input_ids[:24]
    random_ids = torch.randint(0, len(tok), (24,), generator=torch.Generator().manual_seed(0)).tolist()
    return torch.tensor([ids + [tok.pad_token_id] * (24 - len(ids)), random_ids])


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _max_diff(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def exports(tiny_runs, tmp_path_factory):
    """fp32 exports of the latest checkpoint of each run: ZeRO-2 (ngrpo) and ZeRO-3 (grpo)."""
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for name, run in (("zero2", "ngrpo"), ("zero3", "grpo")):
        export_ok(tiny_runs[run], root / name, "--dtype", "fp32")
        out[name] = root / name
    return out


STAGES = [("zero2", "ngrpo", 2), ("zero3", "grpo", 3)]


# ------------------------------------------------------------------ round trip


@pytest.mark.parametrize("name,run,stage", STAGES)
def test_round_trip_matches_deepspeed_consolidation(exports, tiny_runs, name, run, stage):
    run_dir, out = tiny_runs[run], exports[name]
    assert (run_dir / "checkpoints" / "_actor" / "latest").read_text().strip() == "global_step2"
    provenance = json.loads((out / "ngrpo_export.json").read_text())
    assert provenance["zero_stage"] == stage and provenance["step"] == 2 and provenance["kind"] == "deepspeed"
    assert provenance["source"] == str(run_dir / "checkpoints" / "_actor" / "global_step2")

    exported = _load(out)
    assert exported.dtype == torch.float32
    ds_weights = _ds_fp32(run_dir / "checkpoints" / "_actor", "global_step2")
    reference = _load(tiny_runs["model"], ds_weights)
    exp_sd, ref_sd = exported.state_dict(), reference.state_dict()
    assert set(exp_sd) == set(ref_sd)
    for key in ref_sd:
        assert torch.equal(exp_sd[key], ref_sd[key]), key

    ids = _input_ids(out)
    assert _max_diff(_logits(exported, ids), _logits(reference, ids)) <= LOGIT_ATOL


@pytest.mark.parametrize("name,run,stage", STAGES)
def test_round_trip_matches_final_model_up_to_bf16(exports, tiny_runs, name, run, stage):
    out, final_dir = exports[name], tiny_runs[run] / "final_model"
    exported, final = _load(out), _load(final_dir)
    exp_sd, final_sd = exported.state_dict(), final.state_dict()
    assert set(exp_sd) == set(final_sd)
    rounded = {k: v.to(torch.bfloat16).to(torch.float32) for k, v in exp_sd.items()}
    for key in final_sd:
        assert torch.equal(rounded[key], final_sd[key]), key
    # the export holds the fp32 master weights, not the bf16 copy
    assert any(not torch.equal(exp_sd[k], rounded[k]) for k in exp_sd)

    ids = _input_ids(out)
    as_bf16 = _load(out, rounded)
    assert _max_diff(_logits(as_bf16, ids), _logits(final, ids)) <= LOGIT_ATOL


def test_zero2_module_weights_are_the_rounded_masters(exports, tiny_runs):
    """ZeRO-2 keeps the full bf16 module in mp_rank_00_model_states.pt: bf16(exported) equals it."""
    states = torch.load(tiny_runs["ngrpo"] / "checkpoints" / "_actor" / "global_step2" / "mp_rank_00_model_states.pt",
                        weights_only=True, map_location="cpu")["module"]
    exp_sd = _load(exports["zero2"]).state_dict()
    assert set(states) == set(exp_sd)
    for key, value in states.items():
        assert value.dtype == torch.bfloat16
        assert torch.equal(exp_sd[key].to(torch.bfloat16), value), key


@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_training_changed_the_weights(exports, tiny_runs, name):
    base, exported = _load(tiny_runs["model"]), _load(exports[name])
    base_sd, exp_sd = base.state_dict(), exported.state_dict()
    changed = [k for k in base_sd if not torch.equal(base_sd[k], exp_sd[k])]
    assert len(changed) == len(base_sd), sorted(set(base_sd) - set(changed))
    ids = _input_ids(exports[name])
    assert _max_diff(_logits(base, ids), _logits(exported, ids)) > 1e-3


# ------------------------------------------------------------------ tokenizer, config, card


@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_tokenizer_and_chat_template_survive(exports, tiny_runs, name):
    from transformers import AutoTokenizer

    base = AutoTokenizer.from_pretrained(str(tiny_runs["model"]))
    exported = AutoTokenizer.from_pretrained(str(exports[name]))
    text = "Let a and b be real numbers. What is \\frac{1}{2} + 40? <|im_end|> \\boxed{42}"
    assert exported(text).input_ids == base(text).input_ids
    assert exported.chat_template == base.chat_template and base.chat_template
    assert (exported.eos_token, exported.pad_token, exported.padding_side) == (base.eos_token, base.pad_token, base.padding_side)
    messages = [{"role": "user", "content": "What is 3 + 4?"}]
    for kwargs in ({"tokenize": False}, {"tokenize": True}):
        assert exported.apply_chat_template(messages, add_generation_prompt=True, **kwargs) == \
            base.apply_chat_template(messages, add_generation_prompt=True, **kwargs)
    # the exact prompt the run trained on tokenizes the same
    prompt = json.loads((tiny_runs["ngrpo"] / "data" / "train.jsonl").read_text().splitlines()[0])["prompt"]
    assert exported(prompt).input_ids == base(prompt).input_ids


def test_config_and_generation_config(exports, tiny_runs):
    out = exports["zero2"]
    config = json.loads((out / "config.json").read_text())
    base_config = json.loads((tiny_runs["model"] / "config.json").read_text())
    assert config["dtype"] == "float32"  # --dtype fp32
    assert config["use_cache"] is True  # the base model's, not OpenRLHF's training-time False
    for key in ("architectures", "hidden_size", "num_hidden_layers", "vocab_size", "eos_token_id", "tie_word_embeddings"):
        assert config[key] == base_config[key], key
    generation = json.loads((out / "generation_config.json").read_text())
    base_generation = json.loads((tiny_runs["model"] / "generation_config.json").read_text())
    assert generation["eos_token_id"] == base_generation["eos_token_id"] == [2, 0]
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))


def _card_rows(card: str) -> dict:
    rows = {}
    for line in card.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 2 and cells[0] not in ("", "---", "Setting"):
            rows[cells[0]] = cells[1]
    return rows


@pytest.mark.parametrize("name,run,stage", STAGES)
def test_model_card_has_the_runs_settings(exports, tiny_runs, name, run, stage):
    card = (exports[name] / "README.md").read_text()
    manifest = _manifest(tiny_runs[run])
    recipe = manifest["recipe"]
    rows = _card_rows(card)
    assert rows["Algorithm"] == run == manifest["algo"]
    assert rows["Base model"] == f"`{tiny_runs['model']}`"
    assert rows["Recipe preset"] == "cpu-tiny"
    assert rows["Training steps"] == "2" == str(manifest["global_step"])
    assert rows["Weights dtype"] == "float32"
    assert f"ZeRO-{stage}" in rows["Source"]
    expected_clip = {"ngrpo": ("0.16", "0.24"), "grpo": ("0.2", "0.2")}[run]
    assert (rows["eps_clip_low"], rows["eps_clip_high"]) == expected_clip
    assert (f"{recipe['eps_clip_low']:g}", f"{recipe['eps_clip_high']:g}") == expected_clip
    assert rows["estimator"] == recipe["estimator"]
    assert rows["kl_coef"] == f"{recipe['kl_coef']:g}" == {"ngrpo": "0", "grpo": "0.001"}[run]
    assert rows["zero_stage"] == str(stage)
    assert rows["group_filter"] == recipe["group_filter"]
    assert "## Evaluation" not in card  # no ngrpo eval results in these runs


def test_default_dtype_is_the_configs(tiny_runs, tmp_path):
    from safetensors import safe_open

    export_ok(tiny_runs["grpo"], tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    final = _load(tiny_runs["grpo"] / "final_model").state_dict()
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == sorted(final)
        for key in f.keys():
            tensor = f.get_tensor(key)
            assert tensor.dtype == torch.bfloat16
            assert torch.equal(tensor.float(), final[key]), key  # bf16(fp32 master) == OpenRLHF's bf16 save
    export_ok(tiny_runs["grpo"], tmp_path / "fp16", "--dtype", "fp16")
    with safe_open(str(tmp_path / "fp16" / "model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    assert json.loads((tmp_path / "fp16" / "config.json").read_text())["dtype"] == "float16"


# ------------------------------------------------------------------ other sources and options


def test_step_option_exports_that_checkpoint(tiny_runs, exports, tmp_path):
    run_dir = tiny_runs["ngrpo"]
    export_ok(run_dir, tmp_path / "step1", "--step", "1", "--dtype", "fp32")
    exported = _load(tmp_path / "step1").state_dict()
    ds_weights = _ds_fp32(run_dir / "checkpoints" / "_actor", "global_step1")
    for key, value in ds_weights.items():
        assert torch.equal(exported[key], value), key
    step2 = _load(exports["zero2"]).state_dict()
    assert any(not torch.equal(exported[k], step2[k]) for k in exported)
    rows = _card_rows((tmp_path / "step1" / "README.md").read_text())
    assert rows["Training steps"] == "1" and rows["Steps the run trained"] == "2"


@pytest.mark.parametrize("sub", ["checkpoints/_actor", "checkpoints/_actor/global_step2", "checkpoints"])
def test_checkpoint_folder_sources_inside_a_run(tiny_runs, exports, tmp_path, sub):
    export_ok(tiny_runs["grpo"] / sub, tmp_path / "out", "--dtype", "fp32")
    exported, expected = _load(tmp_path / "out").state_dict(), _load(exports["zero3"]).state_dict()
    assert all(torch.equal(exported[k], expected[k]) for k in expected)
    assert _card_rows((tmp_path / "out" / "README.md").read_text())["Algorithm"] == "grpo"  # found the run


def test_bare_checkpoint_needs_base_model(tiny_runs, exports, tmp_path):
    bare = tmp_path / "bare_actor"
    shutil.copytree(tiny_runs["ngrpo"] / "checkpoints" / "_actor", bare)
    message = export_fails(bare, tmp_path / "out")
    assert "--base-model" in message and str(bare / "global_step2") in message
    assert not (tmp_path / "out").exists()
    export_ok(bare, tmp_path / "out", "--base-model", tiny_runs["model"], "--dtype", "fp32")
    exported, expected = _load(tmp_path / "out").state_dict(), _load(exports["zero2"]).state_dict()
    assert all(torch.equal(exported[k], expected[k]) for k in expected)
    assert _card_rows((tmp_path / "out" / "README.md").read_text())["Algorithm"] == "unknown"


def test_final_option_and_hf_folder_source(tiny_runs, tmp_path):
    final_dir = tiny_runs["ngrpo"] / "final_model"
    export_ok(tiny_runs["ngrpo"], tmp_path / "final", "--final")
    export_ok(final_dir, tmp_path / "hf")
    final = _load(final_dir).state_dict()
    for out in (tmp_path / "final", tmp_path / "hf"):
        exported = _load(out).state_dict()
        assert all(torch.equal(exported[k], final[k]) for k in final)
    assert json.loads((tmp_path / "final" / "config.json").read_text())["use_cache"] is True
    for out in ("final", "hf"):
        rows = _card_rows((tmp_path / out / "README.md").read_text())
        assert (rows["Algorithm"], rows["Training steps"]) == ("ngrpo", "2")
    assert json.loads((tmp_path / "final" / "ngrpo_export.json").read_text())["kind"] == "hf"
    # an HF folder outside any run (here: an export) is exported on its own, config and all
    export_ok(tmp_path / "hf", tmp_path / "again")
    rows = _card_rows((tmp_path / "again" / "README.md").read_text())
    assert (rows["Algorithm"], rows["Training steps"], rows["Base model"]) == ("unknown", "unknown", f"`{tmp_path / 'hf'}`")
    again = _load(tmp_path / "again").state_dict()
    assert all(torch.equal(again[k], final[k]) for k in final)


def test_sharding(tiny_runs, exports, tmp_path):
    export_ok(tiny_runs["ngrpo"], tmp_path / "sharded", "--dtype", "fp32", "--max-shard-size", "300KB")
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) > 2 and all(p.stat().st_size <= 300_000 + 50_000 for p in (tmp_path / "sharded").glob("*.safetensors"))
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    exported, expected = _load(tmp_path / "sharded").state_dict(), _load(exports["zero2"]).state_dict()
    assert set(exported) == set(expected) and all(torch.equal(exported[k], expected[k]) for k in expected)
    assert "is not a size" in export_fails(tiny_runs["ngrpo"], tmp_path / "bad", "--max-shard-size", "lots")


def test_eval_summary_goes_into_the_card(tiny_runs, tmp_path):
    run_dir = tmp_path / "run_with_eval"
    shutil.copytree(tiny_runs["ngrpo"], run_dir, ignore=shutil.ignore_patterns("global_step1", "tensorboard"))
    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "summary.json").write_text(json.dumps(
        {"math500": {"avg@4": 0.125, "pass@1": 0.25, "n": 500}, "aime24": {"avg@4": 0.0333, "pass@1": 0.0667}}))
    export_ok(run_dir, tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Evaluation" in card
    assert "| Benchmark | avg@4 | pass@1 | n |" in card
    assert "| math500 | 0.125 | 0.25 | 500 |" in card
    assert "| aime24 | 0.0333 | 0.0667 | – |" in card


# ------------------------------------------------------------------ pickle handling


def test_deepspeed_files_are_loaded_with_weights_only(tiny_runs, tmp_path, monkeypatch):
    calls = []
    real_load = torch.load

    def recording_load(f, *args, **kwargs):
        calls.append((Path(f).name, kwargs.get("weights_only")))
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    for run, out in (("ngrpo", "z2"), ("grpo", "z3")):
        export_ok(tiny_runs[run], tmp_path / out)
    names = {name for name, _ in calls}
    assert {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt",
            "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"} <= names
    assert all(weights_only is True for _, weights_only in calls), calls


def test_a_process_started_while_checkpoints_are_checked_loads_as_it_asks():
    """weights_only_loading wraps torch.load in this process only: a process started meanwhile (the
    Ray node `train --resume` starts while it checks the checkpoint) must not inherit a forced
    weights-only load, or its DeepSpeed cannot read the checkpoint (a CI run failed that way)."""
    import subprocess

    real_load = torch.load
    with export.weights_only_loading():
        assert torch.load is not real_load
        child = subprocess.run([sys.executable, "-c", "import os; print(os.environ.get('TORCH_FORCE_WEIGHTS_ONLY_LOAD'))"],
                               capture_output=True, text=True, check=True)
    assert child.stdout.strip() == "None" and torch.load is real_load


def test_unknown_pickled_class_is_refused_unless_allowed(tiny_runs, tmp_path):
    import argparse

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_runs["ngrpo"] / "checkpoints" / "_actor", ckpt)
    optim = ckpt / "global_step2" / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
    state = torch.load(optim, weights_only=False)
    state["extra"] = argparse.Namespace(note="not on the allow-list")
    torch.save(state, optim)
    message = export_fails(ckpt, tmp_path / "out", "--base-model", tiny_runs["model"])
    assert str(optim) in message and "argparse.Namespace" in message and "--allow-unsafe-pickle" in message
    assert not (tmp_path / "out").exists()
    export_ok(ckpt, tmp_path / "out", "--base-model", tiny_runs["model"], "--allow-unsafe-pickle")
    assert (tmp_path / "out" / "model.safetensors").is_file()


# ------------------------------------------------------------------ broken checkpoints


@pytest.fixture
def broken(tiny_runs, tmp_path):
    """Copies of both runs' checkpoint folders (outside a run: bare, exported with --base-model)."""
    z2, z3, hf = tmp_path / "z2", tmp_path / "z3", tmp_path / "hf"
    shutil.copytree(tiny_runs["ngrpo"] / "checkpoints" / "_actor", z2)
    shutil.copytree(tiny_runs["grpo"] / "checkpoints" / "_actor", z3)
    shutil.copytree(tiny_runs["ngrpo"] / "final_model", hf)
    return {"z2": z2, "z3": z3, "hf": hf, "base": ["--base-model", str(tiny_runs["model"])], "out": tmp_path / "out"}


def _assert_clean(out: Path):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_missing_latest(broken):
    (broken["z2"] / "latest").unlink()
    message = export_fails(broken["z2"], broken["out"], *broken["base"])
    assert f"{broken['z2'] / 'latest'} is missing" in message
    assert "global_step1, global_step2" in message and "--step" in message
    _assert_clean(broken["out"])
    export_ok(broken["z2"], broken["out"], *broken["base"], "--step", "2")


def test_latest_names_a_missing_checkpoint(broken):
    (broken["z2"] / "latest").write_text("global_step7")
    message = export_fails(broken["z2"], broken["out"], *broken["base"])
    assert f"{broken['z2'] / 'latest'} names 'global_step7'" in message
    assert f"{broken['z2'] / 'global_step7'} does not exist" in message
    message = export_fails(broken["z2"], broken["out"], *broken["base"], "--step", "5")
    assert f"{broken['z2'] / 'global_step5'} does not exist" in message
    _assert_clean(broken["out"])


@pytest.mark.parametrize("which,file", [("z2", "mp_rank_00_model_states.pt"),
                                        ("z3", "zero_pp_rank_0_mp_rank_00_model_states.pt")])
def test_missing_model_states_file(broken, which, file):
    path = broken[which] / "global_step2" / file
    path.unlink()
    message = export_fails(broken[which], broken["out"], *broken["base"])
    assert f"{path} is missing" in message
    _assert_clean(broken["out"])


@pytest.mark.parametrize("which", ["z2", "z3"])
def test_missing_optimizer_states_file(broken, which):
    path = broken[which] / "global_step2" / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
    path.unlink()
    message = export_fails(broken[which], broken["out"], *broken["base"])
    assert f"{path} is missing" in message and "fp32 master weights" in message
    _assert_clean(broken["out"])


@pytest.mark.parametrize("which,file", [("z2", "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"),
                                        ("z2", "mp_rank_00_model_states.pt"),
                                        ("z3", "zero_pp_rank_0_mp_rank_00_model_states.pt"),
                                        ("z3", "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")])
def test_truncated_file(broken, which, file):
    path = broken[which] / "global_step2" / file
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    message = export_fails(broken[which], broken["out"], *broken["base"])
    assert f"{path} is corrupt or truncated" in message
    _assert_clean(broken["out"])


def test_empty_file(broken):
    path = broken["z2"] / "global_step2" / "mp_rank_00_model_states.pt"
    path.write_bytes(b"")
    assert f"{path} is empty" in export_fails(broken["z2"], broken["out"], *broken["base"])


def test_missing_config(broken, tiny_runs, tmp_path):
    (broken["hf"] / "config.json").unlink()
    message = export_fails(broken["hf"], broken["out"])
    assert f"{broken['hf'] / 'config.json'} is missing" in message
    # a base model folder without its config
    base = tmp_path / "base_without_config"
    shutil.copytree(tiny_runs["model"], base)
    (base / "config.json").unlink()
    message = export_fails(broken["z2"], broken["out"], "--base-model", base)
    assert f"{base / 'config.json'} is missing" in message
    _assert_clean(broken["out"])


def test_truncated_safetensors(broken):
    path = broken["hf"] / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    message = export_fails(broken["hf"], broken["out"])
    assert f"{path} is corrupt or truncated" in message
    _assert_clean(broken["out"])


def test_pickle_weights_refused(broken):
    (broken["hf"] / "model.safetensors").unlink()
    torch.save({}, broken["hf"] / "pytorch_model.bin")
    message = export_fails(broken["hf"], broken["out"])
    assert f"{broken['hf'] / 'pytorch_model.bin'}: pickle weights (.bin) are not loaded" in message


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    message = export_fails(tmp_path / "empty", tmp_path / "out")
    assert f"{tmp_path / 'empty'} is neither an ngrpo run directory" in message


# ------------------------------------------------------------------ OUT_DIR protection


def test_out_dir_overwrite_protection(tiny_runs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    message = export_fails(tiny_runs["ngrpo"], out)
    assert f"{out} exists and is not empty; pass --force" in message
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    export_ok(tiny_runs["ngrpo"], out, "--force")
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or old folders left
    # an existing empty folder is fine without --force
    (tmp_path / "empty").mkdir()
    export_ok(tiny_runs["ngrpo"], tmp_path / "empty")
    assert (tmp_path / "empty" / "config.json").is_file()
    # never over the source, even with --force
    final_dir = tiny_runs["ngrpo"] / "final_model"
    message = export_fails(final_dir, final_dir, "--force")
    assert "holds the source" in message and (final_dir / "model.safetensors").is_file()
    message = export_fails(tiny_runs["ngrpo"] / "checkpoints" / "_actor", tiny_runs["ngrpo"], "--force")
    assert "holds the source" in message and (tiny_runs["ngrpo"] / "ngrpo_run.json").is_file()


def test_console_script(tiny_runs, tmp_path):
    """The installed `ngrpo` entry point: exit codes and the error on stderr."""
    import subprocess
    import sys

    exe = Path(sys.executable).with_name("ngrpo")
    proc = subprocess.run([str(exe), "export-hf", str(tmp_path), str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 1 and f"Error: {tmp_path} is neither" in proc.stderr
    proc = subprocess.run([str(exe), "export-hf", str(tiny_runs["grpo"]), str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert f"-> {tmp_path / 'out'}" in proc.stdout and "bfloat16" in proc.stdout
