"""Bad input is one line: `ngrpo prepare-data` and `ngrpo train` refuse bad data files with one
line naming the file, the line, the field and why (or a file-level reason), write nothing, and
never hang or show a traceback. Real files (invalid bytes, a FIFO, ...) through the real CLI.

Both commands apply the same row rules (pipelines.datasets.data.check_row): a JSON number is an answer
as written in the file (42 -> "42", 1.50 -> "1.50"); a boolean, NaN or an infinity is not; a gold
answer math-verify cannot parse is refused by both.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.datasets.data import DataError, load_problems

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 180  # a FIFO read would block forever: the test fails at the timeout instead of hanging
CPU = ["--device", "cpu", "--preset", "cpu-tiny"]
HEADER = "Error: 1 invalid row(s); nothing written (use --skip-invalid to drop them):"
SURROGATE = "holds a lone surrogate (\\ud800 at character 9), which is not valid Unicode"
AS_STRING = "write the answer as a string"


def ngrpo(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ngrpo_cli.main", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)


def prepare(src: Path, tmp_path: Path):
    out = tmp_path / "out" / "problems.jsonl"
    proc = ngrpo("prepare-data", src, "-o", out, "--check-overlap", "none")
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output, output
    # nothing written: no output file, no temporary file beside it
    assert not out.exists() and not (out.parent.exists() and any(out.parent.iterdir())), output
    return proc.returncode, output.splitlines()


def train(data: Path, model: Path, tmp_path: Path):
    proc = ngrpo("train", "--model", model, "--data", data, "--output", tmp_path / "run", *CPU, "--dry-run")
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output, output
    assert not (tmp_path / "run").exists(), output
    return proc.returncode, output.splitlines()


def row(problem="What is 1 + 1?", answer="2", rid="a", **extra) -> bytes:
    """A JSON line as bytes; str values are written with json.dumps (ensure_ascii), so "\\ud800"
    in a value becomes the JSON escape \\ud800."""
    return json.dumps({"id": rid, "problem": problem, "answer": answer, **extra}).encode() + b"\n"


def write(path: Path, *lines: bytes) -> Path:
    path.write_bytes(b"".join(lines))
    return path


# (name, the lines of the file: the bad one is line 2, the expected "field 'F': why")
ROW_CASES = [
    ("invalid_utf8", b'{"id": "b", "problem": "x\xff y", "answer": "2"}\n',
     "field 'json': invalid UTF-8 (byte 0xff at column 26)"),
    ("lone_surrogate", row(problem="What is \ud800?", rid="b"), f"field 'problem': {SURROGATE}"),
    ("surrogate_in_metadata", row(rid="b", metadata={"note": "a \ud800"}),
     "field 'metadata.note': holds a lone surrogate (\\ud800 at character 3), which is not valid Unicode"),
    ("deep_200000", b'{"id": "b", "problem": "p", "answer": "2", "metadata": {"m": '
     + b"[" * 200_000 + b"]" * 200_000 + b"}}\n", "field 'json': nested deeper than 100 levels"),
    ("deep_150", b'{"id": "b", "problem": "p", "answer": "2", "metadata": {"m": '
     + b"[" * 150 + b"]" * 150 + b"}}\n", "field 'metadata': nested deeper than 100 levels"),
    ("nan_answer", b'{"id": "b", "problem": "p", "answer": NaN}\n', f"field 'answer': NaN is not an answer; {AS_STRING}"),
    ("infinity_answer", b'{"id": "b", "problem": "p", "answer": Infinity}\n',
     f"field 'answer': Infinity is not a finite number; {AS_STRING}"),
    ("huge_answer", b'{"id": "b", "problem": "p", "answer": 1e999}\n',
     f"field 'answer': 1e999 is not a finite number; {AS_STRING}"),
    ("true_answer", b'{"id": "b", "problem": "p", "answer": true}\n',
     f"field 'answer': true (a JSON boolean) is not an answer; {AS_STRING}"),
    ("false_answer", b'{"id": "b", "problem": "p", "answer": false}\n',
     f"field 'answer': false (a JSON boolean) is not an answer; {AS_STRING}"),
    ("object_answer", b'{"id": "b", "problem": "p", "answer": {"value": 2}}\n',
     "field 'answer': expected a string or a number, got an object"),
    ("number_problem", b'{"id": "b", "problem": 7, "answer": "2"}\n', "field 'problem': expected a string, got a number"),
    ("empty_answer", row(answer=" $ $ ", rid="b"), "field 'answer': missing or empty answer"),
    ("unparseable_answer", row(answer="\\frac{", rid="b"),
     "field 'answer': math-verify cannot parse the gold answer '\\\\frac{'"),
]


@pytest.mark.parametrize("name, bad, why", ROW_CASES, ids=[c[0] for c in ROW_CASES])
def test_prepare_data_refuses_a_bad_row_in_one_line(name, bad, why, tmp_path):
    src = write(tmp_path / "data.jsonl", row(), bad)
    rc, lines = prepare(src, tmp_path)
    assert rc == 1
    assert lines[-2:] == [HEADER, f"{src}: line 2: {why}"], lines


TRAIN_CASES = [c for c in ROW_CASES if c[0] in ("invalid_utf8", "lone_surrogate", "deep_200000", "deep_150",
                                                "nan_answer", "true_answer", "object_answer", "unparseable_answer")]


@pytest.mark.parametrize("name, bad, why", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_train_refuses_the_same_rows_before_anything_starts(name, bad, why, tmp_path, tiny_model_dir):
    data = write(tmp_path / "data.jsonl", row(), bad)
    rc, lines = train(data, tiny_model_dir, tmp_path)
    assert rc == 2
    assert lines[-1] == f"Error: {data}: line 2: {why}", lines


# ------------------------------------------------------------------ files that are not data files
def _fifo(tmp_path):
    path = tmp_path / "data.jsonl"
    os.mkfifo(path)
    return path, f"{path}: not a regular file (a FIFO); give a data file"


def _directory(tmp_path):
    path = tmp_path / "data.jsonl"
    path.mkdir()
    (path / "x.jsonl").write_bytes(row())
    return path, f"{path}: not a regular file (a directory); give a data file"


def _io_error(tmp_path):
    """A regular file whose read fails (EIO): reading /proc/self/mem at offset 0. Unlike chmod 000
    it is unreadable for root too."""
    if not Path("/proc/self/mem").exists():
        pytest.skip("needs Linux /proc")
    path = tmp_path / "data.jsonl"
    path.symlink_to("/proc/self/mem")
    return path, f"{path}: cannot read: Input/output error"


def _no_permission(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads a chmod 000 file; _io_error covers an unreadable file for root")
    path = write(tmp_path / "data.jsonl", row())
    path.chmod(0)
    return path, f"{path}: cannot read: Permission denied"


FILE_CASES = {"fifo": _fifo, "directory": _directory, "io_error": _io_error, "no_permission": _no_permission}


@pytest.mark.parametrize("case", list(FILE_CASES))
def test_prepare_data_refuses_what_is_not_a_readable_file(case, tmp_path):
    path, why = FILE_CASES[case](tmp_path)
    rc, lines = prepare(path, tmp_path)
    assert rc == 1 and lines[-1] == f"Error: {why}", lines


@pytest.mark.parametrize("case", ["fifo", "io_error", "no_permission"])
def test_train_refuses_what_is_not_a_readable_file(case, tmp_path, tiny_model_dir):
    path, why = FILE_CASES[case](tmp_path)
    rc, lines = train(path, tiny_model_dir, tmp_path)
    assert rc == 2 and lines[-1] == f"Error: {why}", lines


def test_train_refuses_a_directory(tmp_path, tiny_model_dir):
    path, _ = _directory(tmp_path)
    rc, lines = train(path, tiny_model_dir, tmp_path)
    assert rc == 2 and lines[-1] == f"Error: Invalid value for '--data': File '{path}' is a directory.", lines


def test_a_json_file_with_bad_bytes_or_nesting_is_one_line(tmp_path):
    bad = write(tmp_path / "bad.json", b'[{"problem": "p", "answer": "2"},\n {"problem": "\xc3(", "answer": "2"}]\n')
    rc, lines = prepare(bad, tmp_path)
    assert rc == 1 and lines[-1] == f"Error: {bad}: invalid UTF-8 (byte 0xc3 at line 2 column 15)", lines
    deep = write(tmp_path / "deep.json", b"[" * 200_000 + b"]" * 200_000)
    rc, lines = prepare(deep, tmp_path)
    assert rc == 1 and lines[-1] == f"Error: {deep}: nested deeper than 100 levels", lines


# ------------------------------------------------------------------ numbers: the same rule in both
def test_numbers_are_answers_as_written_in_both_commands(tmp_path):
    src = write(tmp_path / "nums.jsonl", b'{"id": "a", "problem": "p", "answer": 42}\n',
                b'{"id": "b", "problem": "q", "answer": 1.50}\n', b'{"id": "c", "problem": "r", "answer": -3e2}\n')
    out = tmp_path / "prepared.jsonl"
    proc = ngrpo("prepare-data", src, "-o", out, "--check-overlap", "none")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [json.loads(line)["answer"] for line in out.read_text().splitlines()] == ["42", "1.50", "-3e2"]
    # train's reader takes the original file alike, and the prepared one unchanged
    assert [p["answer"] for p in load_problems(src)] == ["42", "1.50", "-3e2"]
    assert [p["answer"] for p in load_problems(out)] == ["42", "1.50", "-3e2"]


def test_train_reader_refuses_what_prepare_data_refuses(tmp_path):
    """In process, fast: each ROW_CASE raises the one-line DataError that prepare-data prints."""
    for name, bad, why in ROW_CASES:
        data = write(tmp_path / f"{name}.jsonl", row(), bad)
        with pytest.raises(DataError) as err:
            load_problems(data)
        assert str(err.value) == f"{data}: line 2: {why}", name


def test_a_parquet_file_that_is_not_parquet_is_one_line(tmp_path):
    bad = write(tmp_path / "bad.parquet", b"not parquet at all\n")
    rc, lines = prepare(bad, tmp_path)
    assert rc == 1 and lines[-1].startswith(f"Error: {bad}: not a readable Parquet file ("), lines
