"""`ngrpo train` command-line behaviour that needs no training run: dry run, config, errors."""
import json
import shlex

from click.testing import CliRunner

from ngrpo_cli.main import cli


def invoke(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def _argv_of(output):
    line = next(line for line in output.splitlines() if "openrlhf.cli.train_ppo_ray" in line)
    argv = shlex.split(line)
    return argv[argv.index("openrlhf.cli.train_ppo_ray") + 1:]


def _value(argv, flag, n=1):
    i = len(argv) - 1 - argv[::-1].index(flag)  # the last occurrence wins, as in argparse
    return argv[i + 1: i + 1 + n]


def test_help_lists_every_command():
    out = invoke("--help").output
    for name in ("prepare-data", "train", "eval", "export-hf", "report", "tiny-model"):
        assert name in out


def test_dry_run_prints_the_paper_recipe_and_checks_it(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"id": "1", "problem": "1+1?", "answer": "2"}) + "\n")
    result = invoke("train", "--model", "Qwen/Qwen2.5-Math-7B", "--algo", "ngrpo", "--data", str(data),
                    "--device", "cuda", "--gpus-per-node", "8", "--dry-run")
    assert result.exit_code == 0, result.output
    argv = _argv_of(result.output)
    assert _value(argv, "--actor.eps_clip_low_high", 2) == ["0.16", "0.24"]
    assert _value(argv, "--algo.advantage.estimator") == ["group_norm"]
    assert _value(argv, "--algo.dynamic_filtering_range", 2) == ["-0.0625", "0.9375"]
    assert _value(argv, "--rollout.batch_size") == ["1024"] and _value(argv, "--train.batch_size") == ["2048"]
    assert "--train.colocate_all" in argv and "--vllm.sync_backend" not in argv
    assert "OpenRLHF's parser accepted the command line." in result.output


def test_flags_config_and_passthrough_override_the_recipe(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"id": "1", "problem": "1+1?", "answer": "2"}) + "\n")
    config = tmp_path / "c.yaml"
    config.write_text("algo: dapo\neps-clip-high: 0.3\nlr: 2.0e-6\n")
    result = invoke("train", "--model", "m", "--data", str(data), "--device", "cpu", "--preset", "paper",
                    "--config", str(config), "--lr", "3e-6", "--dry-run", "--", "--ds.zero_stage", "3")
    assert result.exit_code == 0, result.output
    argv = _argv_of(result.output)
    assert _value(argv, "--actor.eps_clip_low_high", 2) == ["0.2", "0.3"]  # dapo recipe, high from YAML
    assert _value(argv, "--actor.adam.lr") == ["3e-06"]  # the flag beats the YAML file
    assert _value(argv, "--ds.zero_stage") == ["3"]  # passthrough comes last and wins
    assert _value(argv, "--reward.overlong_buffer_len") == ["1024"]
    assert _value(argv, "--vllm.sync_backend") == ["gloo"]


def test_flags_win_over_algo_and_preset_in_the_config(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"id": "1", "problem": "1+1?", "answer": "2"}) + "\n")
    config = tmp_path / "c.yaml"
    config.write_text("algo: dapo\npreset: cpu-tiny\n")
    result = invoke("train", "--model", "m", "--data", str(data), "--device", "cpu", "--algo", "ngrpo",
                    "--preset", "paper", "--config", str(config), "--dry-run")
    assert result.exit_code == 0, result.output
    argv = _argv_of(result.output)
    assert _value(argv, "--actor.eps_clip_low_high", 2) == ["0.16", "0.24"]  # ngrpo, not dapo
    assert _value(argv, "--rollout.batch_size") == ["1024"]  # paper, not cpu-tiny


def test_unknown_config_key_names_the_file(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("eps_clip_hihg: 0.3\n")
    result = invoke("train", "--model", "m", "--data", str(config), "--config", str(config), "--dry-run")
    assert result.exit_code != 0
    assert f"{config}: unknown setting 'eps_clip_hihg'" in result.output


def test_openrlhf_rejection_is_reported(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"id": "1", "problem": "1+1?", "answer": "2"}) + "\n")
    result = invoke("train", "--model", "m", "--data", str(data), "--device", "cpu", "--dry-run", "--",
                    "--algo.advantage.estimator", "ngrpo")
    assert result.exit_code != 0 and "OpenRLHF rejected this command line" in result.output


def test_bad_data_and_existing_runs_are_refused_before_anything_starts(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "1", "problem": "1+1?", "answer": "2"}) + "\n"
                   + json.dumps({"id": "2", "problem": "", "answer": "3"}) + "\n")
    result = invoke("train", "--model", str(tiny_model_dir), "--data", str(bad), "--output", str(tmp_path / "run"), "--device", "cpu")
    assert result.exit_code != 0
    assert f"{bad}: line 2: field 'problem': missing or empty" in result.output
    assert not (tmp_path / "run" / "ngrpo_run.json").exists()

    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"id": str(i), "problem": f"{i}+1?", "answer": str(i + 1)}) + "\n" for i in range(2)))
    result = invoke("train", "--model", str(tiny_model_dir), "--data", str(good), "--output", str(tmp_path / "run"), "--device", "cpu")
    assert result.exit_code != 0 and "fewer than one step's 4 prompts" in result.output

    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "ngrpo_run.json").write_text("{}")
    result = invoke("train", "--model", str(tiny_model_dir), "--data", str(good), "--output", str(tmp_path / "old"), "--device", "cpu")
    assert result.exit_code != 0 and "already holds a run" in result.output
    result = invoke("train", "--resume", str(tmp_path))
    assert result.exit_code != 0 and "is not an ngrpo run directory" in result.output
