"""`ngrpo prepare-data` and pipelines/data.py: every shared data file, bad inputs, overlap, synthetic data."""
import json
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from ngrpo_cli.main import cli
from pipelines.data import DataError, load_problems, normalise_text


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # nothing may come from the Hub in tests; local dataset folders still load through `datasets`
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.delenv("NGRPO_DATA_DIR", raising=False)


def run(*args):
    result = CliRunner().invoke(cli, ["prepare-data", *map(str, args), "--no-progress"])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


# --------------------------------------------------------------------------------------------
# The shared data files, both layouts
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rel,rows,source", [
    ("math500/test.jsonl", 500, "math500-test"),
    ("aime2025/test.parquet", 30, "aime2025-test"),
    ("aime2025/raw.parquet", 30, "aime2025-raw"),
    ("amc23/test.parquet", 40, "amc23-test"),
    ("amc23/raw.parquet", 40, "amc23-raw"),
    ("aime24/test.jsonl", 30, "aime24-test"),
])
def test_small_files(shared_data_dir, tmp_path, rel, rows, source):
    out = tmp_path / "out.jsonl"
    result = run(shared_data_dir / rel, "-o", out)
    assert result.exit_code == 0, result.output
    recs = read_jsonl(out)
    assert len(recs) == rows
    assert f"wrote {rows} problems" in result.output
    assert all(set(r) == {"id", "problem", "answer", "source", "metadata"} for r in recs)
    assert all(r["source"] == source and r["id"].startswith(source + "/") for r in recs)
    assert len({r["id"] for r in recs}) == rows
    assert all(r["problem"].strip() and r["answer"].strip() for r in recs)
    assert load_problems(out) == recs


def test_math500_record_exact(shared_data_dir, tmp_path):
    out = tmp_path / "m.jsonl"
    assert run("math500", "--data-dir", shared_data_dir, "-o", out, "--check-overlap", "none").exit_code == 0
    first = read_jsonl(out)[0]
    assert first == {
        "id": "math500/test/precalculus/807.json",
        "problem": "Convert the point $(0,3)$ in rectangular coordinates to polar coordinates.  Enter your answer in "
                   "the form $(r,\\theta),$ where $r > 0$ and $0 \\le \\theta < 2 \\pi.$",
        "answer": "\\left( 3, \\frac{\\pi}{2} \\right)",
        "source": "math500",
        "metadata": {"subject": "Precalculus", "level": 2, "unique_id": "test/precalculus/807.json"},
    }


@pytest.mark.parametrize("bench", ["aime2025", "amc23"])
def test_verl_and_plain_layouts_agree(shared_data_dir, tmp_path, bench):
    a, b = tmp_path / "verl.jsonl", tmp_path / "plain.jsonl"
    assert run(shared_data_dir / bench / "test.parquet", "-o", a).exit_code == 0
    assert run(shared_data_dir / bench / "raw.parquet", "-o", b).exit_code == 0
    verl, plain = read_jsonl(a), read_jsonl(b)
    assert [(r["problem"], r["answer"]) for r in verl] == [(r["problem"], r["answer"]) for r in plain]


def test_benchmark_names_with_data_dir(shared_data_dir, tmp_path):
    out = tmp_path / "eval.jsonl"
    result = run("math500", "aime2025", "amc23", "aime24", "--data-dir", shared_data_dir, "-o", out)
    assert result.exit_code == 0, result.output
    recs = read_jsonl(out)
    counts = {s: sum(r["source"] == s for r in recs) for s in ("math500", "aime2025", "amc23", "aime24")}
    assert counts == {"math500": 500, "aime2025": 30, "amc23": 40, "aime24": 30}
    assert recs[500]["id"] == "aime2025/0" and recs[500]["answer"] == "70"


@pytest.mark.slow
def test_math_test_5000_rows_and_math500_overlap(shared_data_dir, tmp_path):
    out = tmp_path / "mt.jsonl"
    result = run("math-test", "--data-dir", shared_data_dir, "-o", out)
    assert result.exit_code == 0, result.output
    recs = read_jsonl(out)
    assert len(recs) == 5000
    assert "overlap with math500: 500 of 5000 problems also occur in math500" in result.output
    assert "overlap with aime2025: none" in result.output
    assert recs[0]["metadata"]["level"] == 3 and recs[0]["metadata"]["subject"] == "Algebra"
    # the answer comes from the solution's \boxed{}; the verl target is kept (it is empty in one row,
    # where verl's extraction failed on \mbox{Saturday})
    assert sum("target" in r["metadata"] for r in recs) == 4999
    assert recs[3526]["id"] == "math-test/3526" and recs[3526]["answer"] == "\\mbox{Saturday}"
    # decontaminate
    clean = tmp_path / "clean.jsonl"
    result = run(shared_data_dir / "math" / "test.parquet", "--check-overlap", "math500", "--drop-overlap",
                 "--data-dir", shared_data_dir, "-o", clean)
    assert result.exit_code == 0, result.output
    assert len(read_jsonl(clean)) == 4500


@pytest.mark.slow
def test_math_train_7500_rows(shared_data_dir, tmp_path):
    """MATH train has 7500 rows; 3 have no usable gold answer (two empty \\boxed{} in the original
    solutions, one `\\sin^2 t` math-verify cannot parse): an error without --skip-invalid."""
    out = tmp_path / "train.jsonl"
    result = run("math-train", "--data-dir", shared_data_dir, "-o", out)
    assert result.exit_code == 1
    assert not out.exists()
    src = shared_data_dir / "math" / "train.parquet"
    assert f"{src}: 7500 rows read (2 without a usable problem/answer)" in result.output
    assert f"{src}: row 5342: field 'reward_model.ground_truth.target': missing or empty answer" in result.output
    assert f"{src}: row 5344: field 'reward_model.ground_truth.target': missing or empty answer" in result.output
    assert (f"{src}: row 6944: field 'reward_model.ground_truth.solution': math-verify cannot parse the gold answer "
            "'\\\\sin^2 t'") in result.output
    result = run("math-train", "--data-dir", shared_data_dir, "-o", out, "--skip-invalid")
    assert result.exit_code == 0, result.output
    assert "skipped 3 invalid row(s)" in result.output
    recs = read_jsonl(out)
    assert len(recs) == 7497
    assert "math-train/5341" not in {r["id"] for r in recs}
    assert "overlap with math500: none" in result.output


# --------------------------------------------------------------------------------------------
# Bad inputs: exact messages naming file, row and field; nothing written
# --------------------------------------------------------------------------------------------
def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = {"problem": "What is 1 + 1?", "answer": "2"}


@pytest.mark.parametrize("bad_row,field,message", [
    ({"answer": "2"}, "problem", "missing or empty problem"),
    ({"problem": "  ", "answer": "2"}, "problem", "missing or empty problem"),
    ({"problem": "What?"}, "answer", "missing or empty answer"),
    ({"problem": "What?", "answer": ""}, "answer", "missing or empty answer"),
    ({"problem": "What?", "answer": "@@@"}, "answer", "math-verify cannot parse the gold answer '@@@'"),
    ({"problem": "What?", "answer": "\\frac{"}, "answer", "math-verify cannot parse the gold answer '\\\\frac{'"),
    ({"problem": "What?", "solution": "no box here"}, "answer (or a \\boxed{} answer in solution)",
     "missing or empty answer"),
    ('{"problem": "What?", "answer": ', "json", "invalid JSON"),
])
def test_bad_jsonl_row(tmp_path, bad_row, field, message):
    src = write_jsonl(tmp_path / "bad.jsonl", [GOOD, GOOD | {"problem": "What is 2 + 2?", "answer": "4"}, bad_row])
    out = tmp_path / "out.jsonl"
    out.write_text("previous content\n")
    result = run(src, "-o", out)
    assert result.exit_code == 1
    assert f"{src}: line 3: field '{field}': {message}" in result.output
    assert out.read_text() == "previous content\n"  # untouched
    assert list(tmp_path.glob(".out.jsonl.tmp*")) == []
    # --skip-invalid keeps the two good rows and says why one was dropped
    result = run(src, "-o", out, "--skip-invalid")
    assert result.exit_code == 0, result.output
    assert "skipped 1 invalid row(s)" in result.output and f"line 3: field '{field}'" in result.output
    assert [r["answer"] for r in read_jsonl(out)] == ["2", "4"]


def test_duplicate_id(tmp_path):
    src = write_jsonl(tmp_path / "dup.jsonl", [GOOD | {"id": "a"}, GOOD | {"id": "b"}, GOOD | {"id": "a"}])
    out = tmp_path / "out.jsonl"
    result = run(src, "-o", out)
    assert result.exit_code == 1
    assert f"{src}: line 3: field 'id': duplicate id 'dup/a' (first at {src} line 1)" in result.output
    assert not out.exists()


def test_blank_lines_keep_line_numbers(tmp_path):
    src = tmp_path / "gaps.jsonl"
    src.write_text(json.dumps(GOOD) + "\n\n\n" + json.dumps({"problem": "x"}) + "\n")
    result = run(src, "-o", tmp_path / "o.jsonl")
    assert result.exit_code == 1
    assert f"{src}: line 4: field 'answer': missing or empty answer" in result.output


def test_bad_parquet_row_and_verl_layout(tmp_path):
    rows = [
        {"prompt": [{"role": "user", "content": "What is 2 + 3?"}],
         "reward_model": {"ground_truth": {"target": "5"}, "style": "rule"}, "extra_info": {"index": 0, "split": "x"}},
        {"prompt": [{"role": "user", "content": "What is 2 + 4?"}],
         "reward_model": {"ground_truth": {"target": ""}, "style": "rule"}, "extra_info": {"index": 1, "split": "x"}},
        {"prompt": [{"role": "system", "content": "sys"}, {"role": "user", "content": "  "}],
         "reward_model": {"ground_truth": {"target": "1"}, "style": "rule"}, "extra_info": {"index": 2, "split": "x"}},
    ]
    src = tmp_path / "verl.parquet"
    pd.DataFrame(rows).to_parquet(src)
    result = run(src, "-o", tmp_path / "o.jsonl")
    assert result.exit_code == 1
    assert f"{src}: row 2: field 'reward_model.ground_truth.target': missing or empty answer" in result.output
    assert f"{src}: row 3: field 'prompt': missing or empty problem" in result.output
    result = run(src, "-o", tmp_path / "o.jsonl", "--skip-invalid")
    assert result.exit_code == 0
    assert read_jsonl(tmp_path / "o.jsonl") == [
        {"id": "verl/0", "problem": "What is 2 + 3?", "answer": "5", "source": "verl", "metadata": {}}]


def test_unknown_sources(tmp_path):
    out = tmp_path / "o.jsonl"
    r = run(tmp_path / "missing.jsonl", "-o", out)
    assert r.exit_code == 1 and "missing.jsonl: no such file" in r.output
    r = run("math500", "-o", out)  # no --data-dir: the Hub, which is offline here
    assert r.exit_code == 1
    assert "hf:HuggingFaceH4/MATH-500@test: could not load with datasets.load_dataset" in r.output
    r = run("synthetic:nope", "-o", out)
    assert r.exit_code == 1 and "unknown synthetic generator 'nope'" in r.output
    r = run("not a source at all", "-o", out)
    assert r.exit_code == 1 and "not a file, a benchmark name" in r.output
    assert not out.exists()


def test_local_dataset_folder_goes_through_datasets_load_dataset(tmp_path):
    """The Hub code path (datasets.load_dataset(ID, split=...)) with a local dataset folder."""
    ds = tmp_path / "my_dataset"
    ds.mkdir()
    write_jsonl(ds / "test.jsonl", [{"question": "What is 6 * 7?", "answer": 42, "level": "Level 2"},
                                    {"question": "What is 1/2 + 1/2?", "answer": "1"}])
    out = tmp_path / "o.jsonl"
    result = run(f"{ds}@test", "-o", out)
    assert result.exit_code == 0, result.output
    assert f"hf:{ds}@test: 2 rows read" in result.output
    assert read_jsonl(out) == [
        {"id": "my_dataset/0", "problem": "What is 6 * 7?", "answer": "42", "source": "my_dataset",
         "metadata": {"level": 2}},
        {"id": "my_dataset/1", "problem": "What is 1/2 + 1/2?", "answer": "1", "source": "my_dataset", "metadata": {}}]


def test_plain_layout_answer_from_solution_and_json_file(tmp_path):
    src = tmp_path / "probs.json"
    src.write_text(json.dumps([{"id": 7, "problem": "P1", "solution": "So it is $\\boxed{\\frac{1}{2}}$."},
                               {"id": 8, "question": "P2", "answer": "$3$."}]))
    out = tmp_path / "o.jsonl"
    assert run(src, "-o", out).exit_code == 0
    assert [(r["id"], r["answer"]) for r in read_jsonl(out)] == [("probs/7", "\\frac{1}{2}"), ("probs/8", "3")]


# --------------------------------------------------------------------------------------------
# Options, synthetic data, load_problems, overlap
# --------------------------------------------------------------------------------------------
def test_limit_shuffle_seed(shared_data_dir, tmp_path):
    src = shared_data_dir / "aime24" / "test.jsonl"
    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    assert run(src, "-o", a, "--limit", 5).exit_code == 0
    assert [r["id"] for r in read_jsonl(a)] == [f"aime24-test/{i}" for i in (60, 61, 62, 63, 64)]
    assert run(src, "-o", b, "--shuffle", "--seed", 1, "--limit", 5).exit_code == 0
    assert run(src, "-o", c, "--shuffle", "--seed", 1, "--limit", 5).exit_code == 0
    assert read_jsonl(b) == read_jsonl(c)
    assert [r["id"] for r in read_jsonl(b)] != [r["id"] for r in read_jsonl(a)]
    assert len(read_jsonl(b)) == 5


def test_synthetic_arith(tmp_path):
    out = tmp_path / "arith.jsonl"
    result = run("synthetic:arith?n=200&level=1&split=test&seed=0", "synthetic:arith?n=50&level=4&seed=3", "-o", out)
    assert result.exit_code == 0, result.output
    recs = read_jsonl(out)
    assert len(recs) == 250
    sums, three_terms = recs[:200], recs[200:]
    assert {r["source"] for r in sums} == {"arith-L1-test-s0"} and {r["source"] for r in three_terms} == {"arith-L4-train-s3"}
    assert sums[0]["id"] == "arith-L1-test-s0/0"
    assert sums[0]["metadata"]["generator"] == "synthetic:arith" and sums[0]["metadata"]["split"] == "test"
    for r in sums:
        a, b = r["metadata"]["expression"].split(" + ")
        assert a in r["problem"] and int(r["answer"]) == int(a) + int(b) and int(a) < 100 and int(b) < 100
    assert len({r["metadata"]["expression"] for r in sums}) == 200  # distinct questions within a draw
    for r in three_terms:
        expr = r["metadata"]["expression"]
        assert len(expr.split()) == 5 and int(r["answer"]) == eval(expr)
    for bad in ("synthetic:arith?level=9", "synthetic:arith?split=dev", "synthetic:arith?level=1&mix=study",
                "synthetic:arith?difficulty=1"):
        result = run(bad, "-o", tmp_path / "x.jsonl")
        assert result.exit_code != 0 and bad in result.output


def test_load_problems_errors(tmp_path):
    p = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "problem": "x", "answer": "1"},
                                           {"id": "b", "problem": "y"}])
    with pytest.raises(DataError, match=rf"^{p}: line 2: field 'answer': missing or empty answer$"):
        load_problems(p)
    p = write_jsonl(tmp_path / "q.jsonl", [{"id": "a", "problem": "x", "answer": "1"},
                                           {"id": "a", "problem": "y", "answer": "2"}])
    with pytest.raises(DataError, match=r"q.jsonl: line 2: field 'id': duplicate id 'a' \(first at line 1\)"):
        load_problems(p)
    p = write_jsonl(tmp_path / "r.jsonl", [{"id": "a", "problem": "x", "answer": "1", "metadata": []}])
    with pytest.raises(DataError, match=r"r.jsonl: line 1: field 'metadata': expected an object"):
        load_problems(p)
    p = write_jsonl(tmp_path / "s.jsonl", ["{oops"])
    with pytest.raises(DataError, match=r"s.jsonl: line 1: field 'json': invalid JSON"):
        load_problems(p)
    p = write_jsonl(tmp_path / "t.jsonl", [{"id": 3, "problem": "x", "answer": "1"}])
    assert load_problems(p) == [{"id": "3", "problem": "x", "answer": "1", "source": "t", "metadata": {}}]


def test_overlap_report_and_normalisation(shared_data_dir, tmp_path):
    # a file holding two MATH500 problems (re-spaced) and one new one
    m500 = read_jsonl_plain(shared_data_dir / "math500" / "test.jsonl")
    rows = [{"problem": "  " + m500[3]["problem"].replace(" ", "  ") + " ", "answer": m500[3]["answer"]},
            {"problem": m500[10]["problem"].upper(), "answer": m500[10]["answer"]},
            {"problem": "A brand new problem?", "answer": "1"}]
    src = write_jsonl(tmp_path / "mine.jsonl", rows)
    out = tmp_path / "o.jsonl"
    result = run(src, "-o", out, "--data-dir", shared_data_dir)
    assert result.exit_code == 0, result.output
    assert "overlap with math500: 2 of 3 problems also occur in math500" in result.output
    assert "overlap with amc23: none" in result.output
    result = run(src, "-o", out, "--data-dir", shared_data_dir, "--check-overlap", "none")
    assert "overlap with" not in result.output
    assert normalise_text("What is $x$?\n") == normalise_text("what is x ?")


def read_jsonl_plain(path: Path):
    with open(path) as f:
        return [json.loads(line) for line in f]
