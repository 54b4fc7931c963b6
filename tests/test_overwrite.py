"""Nothing of the user's is overwritten without --overwrite: `ngrpo eval -o DIR` and `ngrpo train
--output DIR` into a folder holding files they did not write are refused, naming what is there,
and the files stay byte-identical; with --overwrite they proceed; eval still resumes into its own
earlier output."""
import click
import pytest
from click.testing import CliRunner

from ngrpo_cli.main import cli

USER_SUMMARY = b"# my own notes\n\nnot written by ngrpo \xe2\x9c\x93\n"
USER_DATA = b'{"id": "mine", "problem": "my problem", "answer": "42"}\n'


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def eval_args(model, problems, out):
    return ["eval", "--model", model, "--backend", "hf", "--benchmarks", problems, "-o", out, "--n", "1",
            "--limit", "1", "--temperature", "0", "--max-new-tokens", "2"]


EVAL_FILES = "eval_config.json, samples.jsonl, summary.json, summary.md"


# ------------------------------------------------------------------------------- eval
def test_eval_refuses_a_folder_of_the_users_files(tiny_model_dir, problems, tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "summary.md").write_bytes(USER_SUMMARY)
    result = invoke(*eval_args(tiny_model_dir, problems, out))
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        f"Error: {out} holds files `ngrpo eval` did not write (summary.md): choose another -o OUT_DIR, or pass "
        f"--overwrite to write into it ({EVAL_FILES} there are replaced)")
    assert (out / "summary.md").read_bytes() == USER_SUMMARY
    assert sorted(p.name for p in out.iterdir()) == ["summary.md"]


def test_eval_refuses_its_own_folder_with_a_file_of_the_users(tiny_model_dir, problems, tmp_path):
    out = tmp_path / "results"
    first = invoke(*eval_args(tiny_model_dir, problems, out))
    assert first.exit_code == 0, first.output
    (out / "notes.txt").write_bytes(USER_SUMMARY)
    summary = (out / "summary.md").read_bytes()
    result = invoke(*eval_args(tiny_model_dir, problems, out))
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        f"Error: {out} holds files `ngrpo eval` did not write (notes.txt): choose another -o OUT_DIR, or pass "
        f"--overwrite to write into it ({EVAL_FILES} there are replaced)")
    assert (out / "notes.txt").read_bytes() == USER_SUMMARY and (out / "summary.md").read_bytes() == summary


def test_eval_resumes_its_own_folder_and_overwrite_writes_into_the_users(tiny_model_dir, problems, tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "summary.md").write_bytes(USER_SUMMARY)
    result = invoke(*eval_args(tiny_model_dir, problems, out), "--overwrite")
    assert result.exit_code == 0, result.output
    assert (out / "summary.md").read_bytes() != USER_SUMMARY
    assert sorted(p.name for p in out.iterdir()) == sorted(EVAL_FILES.split(", ") + ["logs"])  # logs: eval-1.log
    again = invoke(*eval_args(tiny_model_dir, problems, out))  # its own earlier output: resumed
    assert again.exit_code == 0, again.output
    assert "1 already in" in again.output and "0 to generate" in again.output


def test_eval_into_an_empty_or_new_folder_is_fine(tiny_model_dir, problems, tmp_path):
    from pipelines.evaluate.evaluation import check_out_dir, foreign_files

    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "empty", tmp_path / "new"):
        check_out_dir(out, overwrite=False)
        assert foreign_files(out) == []


# ------------------------------------------------------------------------------- train
@pytest.fixture
def user_folder(tmp_path):
    folder = tmp_path / "mine"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "train.jsonl").write_bytes(USER_DATA)
    return folder


def test_train_refuses_a_folder_that_is_not_a_run(tiny_model_dir, problems, user_folder, monkeypatch):
    from pipelines.launch import training

    def start_ray_early(*a, **k):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(training, "start_ray_early", start_ray_early)
    result = invoke("train", "--model", tiny_model_dir, "--data", problems, "--output", user_folder, "--device", "cpu",
                    "--preset", "cpu-tiny", "--max-steps", "1")
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        f"Error: --output {user_folder} is not an ngrpo run directory and holds data/train.jsonl: choose an empty "
        "or new folder, or pass --overwrite to write the run into it")
    assert (user_folder / "data" / "train.jsonl").read_bytes() == USER_DATA
    assert sorted(str(p.relative_to(user_folder)) for p in user_folder.rglob("*")) == ["data", "data/train.jsonl"]


def test_train_with_overwrite_writes_the_run_into_it(tiny_model_dir, problems, user_folder, monkeypatch):
    from ngrpo_cli import train_cmd
    from pipelines.launch import training

    monkeypatch.setattr(training, "start_ray_early", lambda *a, **k: None)

    def execute(run_path, manifest, resume, verbose):
        raise click.ClickException("stopped by the test before training")

    monkeypatch.setattr(train_cmd, "_execute", execute)
    result = invoke("train", "--model", tiny_model_dir, "--data", problems, "--output", user_folder, "--device", "cpu",
                    "--preset", "cpu-tiny", "--max-steps", "1", "--overwrite")
    assert "stopped by the test before training" in result.output, result.output
    assert (user_folder / "ngrpo_run.json").is_file()
    assert (user_folder / "data" / "train.jsonl").read_bytes() != USER_DATA  # the run's own problems


def test_train_lists_at_most_a_few_files(tmp_path):
    from ngrpo_cli.train_cmd import _check_output_folder

    for i in range(10):
        (tmp_path / f"f{i}.txt").write_text("x")
    with pytest.raises(click.ClickException) as err:
        _check_output_folder(tmp_path, overwrite=False)
    assert str(err.value).endswith("holds f0.txt, f1.txt, f2.txt, f3.txt, f4.txt, f5.txt and more: choose an empty "
                                   "or new folder, or pass --overwrite to write the run into it")
    _check_output_folder(tmp_path, overwrite=True)
    _check_output_folder(tmp_path / "new", overwrite=False)
