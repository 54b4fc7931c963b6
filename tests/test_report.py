"""`ngrpo report` on the two real tiny runs of tests/fixtures_runs.py (ngrpo ZeRO-2, grpo ZeRO-3).

Expected numbers are read from the runs' metrics.jsonl and manifests here, never from the report
code; report.md writes numbers with 6 significant digits and wall times as h:mm:ss.
"""
import datetime
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from fixtures_runs import tiny_runs  # noqa: F401  (session fixture: the two shared runs)
from ngrpo_cli.main import cli

pytestmark = pytest.mark.pipeline

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# every run logs its cumulative generated responses, so by_generated_samples is drawn too
STANDARD_FIGURES = ["by_generated_samples", "clip_fractions", "entropy", "group_outcomes", "kl", "response_length",
                    "reward_accuracy"]


def report(*args):
    return CliRunner().invoke(cli, ["report", *[str(a) for a in args]], catch_exceptions=False)


def report_ok(*args):
    result = report(*args)
    assert result.exit_code == 0, result.output
    return result


def report_fails(*args) -> str:
    result = report(*args)
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    return result.output


def rows_of(run_dir: Path) -> list:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def manifest_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "ngrpo_run.json").read_text())


def label_of(run_dir: Path) -> str:
    return f"{manifest_of(run_dir)['algo']}: {run_dir.name}"


def g6(x) -> str:
    return format(x, ".6g")


def md_table(text: str, first_header: str, must_have: str) -> list:
    """The rows (dicts by header) of the markdown table whose header row starts with FIRST_HEADER
    and contains MUST_HAVE."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_header and must_have in cells:
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                rows.append(dict(zip(cells, [c.strip() for c in row.strip().strip("|").split("|")])))
            return rows
    raise AssertionError(f"no table with header {first_header!r} / {must_have!r} in report.md")


@pytest.fixture(scope="module")
def two_runs(tiny_runs):
    return [tiny_runs["ngrpo"], tiny_runs["grpo"]]


@pytest.fixture(scope="module")
def built(two_runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "out"
    result = report_ok(*two_runs, "-o", out)
    assert f"wrote {out / 'report.md'} with 7 figure(s) for 2 run(s)" in result.output
    return out, json.loads((out / "report.json").read_text()), (out / "report.md").read_text()


def test_the_runs_are_what_the_report_tests_expect(two_runs):
    ngrpo_run, grpo_run = two_runs
    assert manifest_of(ngrpo_run)["algo"] == "ngrpo" and manifest_of(grpo_run)["algo"] == "grpo"
    for run in two_runs:
        assert [r["step"] for r in rows_of(run)] == [1, 2]


def test_pngs_written(built):
    import matplotlib.image

    out, data, _ = built
    assert sorted(p.stem for p in out.glob("*.png")) == STANDARD_FIGURES
    for name in STANDARD_FIGURES:
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == PNG_MAGIC
        image = matplotlib.image.imread(str(png))
        assert image.shape[0] > 200 and image.shape[1] > 400
        assert image.std() > 0.01  # not a blank canvas
        assert data["figures"][name]["file"] == f"{name}.png"


def test_both_runs_in_every_panel(built, two_runs):
    _, data, _ = built
    labels = [label_of(run) for run in two_runs]
    assert labels == [f"ngrpo: {two_runs[0].name}", f"grpo: {two_runs[1].name}"]
    panels = {p["title"]: p for fig in data["figures"].values() for p in fig["panels"]}
    assert set(panels) == {
        "Mean reward", "Accuracy (share of correct responses)", "All-wrong groups", "All-correct groups",
        "Mixed groups", "Mean response length", "Entropy",
        "Clipped at the lower bound (ratio < 1 - eps_low, A < 0)",
        "Clipped at the upper bound (ratio > 1 + eps_high, A > 0)", "Clipped, both bounds",
        "KL to the reference policy"}
    for title, panel in panels.items():
        assert panel["legend"] == labels, title  # read back from the drawn matplotlib legend


@pytest.mark.parametrize("figure,title,key", [
    ("reward_accuracy", "Mean reward", "rollout/reward_mean"),
    ("reward_accuracy", "Accuracy (share of correct responses)", "ngrpo/accuracy"),
    ("group_outcomes", "All-wrong groups", "ngrpo/frac_all_wrong"),
    ("group_outcomes", "All-correct groups", "ngrpo/frac_all_correct"),
    ("group_outcomes", "Mixed groups", "ngrpo/frac_mixed"),
    ("response_length", "Mean response length", "rollout/response_length_mean"),
    ("entropy", "Entropy", "entropy_loss"),
    ("clip_fractions", "Clipped at the lower bound (ratio < 1 - eps_low, A < 0)", "clip_frac_low"),
    ("clip_fractions", "Clipped at the upper bound (ratio > 1 + eps_high, A > 0)", "clip_frac_high"),
    ("kl", "KL to the reference policy", "kl"),
])
def test_plotted_values_are_the_logged_ones(built, two_runs, figure, title, key):
    _, data, _ = built
    panel = next(p for p in data["figures"][figure]["panels"] if p["title"] == title)
    for run in two_runs:
        series = panel["series"][label_of(run)]
        rows = rows_of(run)
        assert series["key"] == key
        assert series["steps"] == [r["step"] for r in rows]
        assert series["values"] == [r[key] for r in rows]


def test_markdown_table_holds_the_exact_values(built, two_runs):
    out, data, text = built
    table = {row["Run"]: row for row in md_table(text, "Run", "Reward final")}
    assert list(table) == [label_of(run) for run in two_runs]
    for run in two_runs:
        rows, manifest = rows_of(run), manifest_of(run)
        row = table[label_of(run)]
        last = rows[-1]
        assert row["Algorithm"] == manifest["algo"]
        assert row["Steps"] == "2" == str(last["step"])
        wall = manifest["finished"] - manifest["started"]
        assert row["Wall time"] == str(datetime.timedelta(seconds=round(wall)))
        assert row["Reward final"] == g6(last["rollout/reward_mean"])
        assert row["Reward best"] == g6(max(r["rollout/reward_mean"] for r in rows))
        assert row["Accuracy final"] == g6(last["ngrpo/accuracy"])
        assert row["Accuracy best"] == g6(max(r["ngrpo/accuracy"] for r in rows))
        assert row["All-wrong final"] == g6(last["ngrpo/frac_all_wrong"])
        assert row["All-wrong best"] == g6(min(r["ngrpo/frac_all_wrong"] for r in rows))
        assert row["All-correct final"] == g6(last["ngrpo/frac_all_correct"])
        assert row["Response length final"] == g6(last["rollout/response_length_mean"])
        assert row["Entropy final"] == g6(last["entropy_loss"])
        assert row["KL final"] == g6(last["kl"])
        # the same numbers, unrounded, in report.json
        summary = next(s for s in data["runs"] if s["label"] == label_of(run))
        assert summary["final"]["Reward"] == last["rollout/reward_mean"]
        assert summary["best"]["Accuracy"] == max(r["ngrpo/accuracy"] for r in rows)
        assert summary["wall_time_s"] == wall and summary["steps"] == 2
    # the two runs really differ in what the table shows (grpo has a KL term, ngrpo none)
    assert table[label_of(two_runs[0])]["KL final"] == "0"
    assert float(table[label_of(two_runs[1])]["KL final"]) > 0


def test_markdown_embeds_the_figures_and_settings(built, two_runs):
    out, data, text = built
    for name in STANDARD_FIGURES:
        assert f"]({name}.png)" in text  # relative paths, next to report.md
        assert (out / f"{name}.png").is_file()
    settings = {row["Setting"]: row for row in md_table(text, "Setting", label_of(two_runs[0]))}
    assert settings["eps_clip_low"][label_of(two_runs[0])] == "0.16"
    assert settings["eps_clip_low"][label_of(two_runs[1])] == "0.2"
    assert settings["zero_stage"][label_of(two_runs[1])] == "3"
    assert "seed" not in settings  # same in both runs: not listed
    runs_table = {row["Run"]: row for row in md_table(text, "Run", "Base model")}
    assert runs_table[label_of(two_runs[0])]["Status"] == "finished"


def test_missing_metrics_are_skipped(tiny_runs, tmp_path):
    """A run without some keys is not drawn in those panels; a panel no run has is left out."""
    lean = tmp_path / "lean_grpo"
    shutil.copytree(tiny_runs["grpo"], lean, ignore=shutil.ignore_patterns("checkpoints", "final_model", "tensorboard"))
    rows = rows_of(lean)
    for row in rows:
        for key in ("ngrpo/accuracy", "clip_frac_low", "rollout/response_length_mean"):
            row.pop(key)
    (lean / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    no_kl = tmp_path / "no_kl_ngrpo"
    shutil.copytree(tiny_runs["ngrpo"], no_kl, ignore=shutil.ignore_patterns("checkpoints", "final_model", "tensorboard"))
    no_kl_rows = [{k: v for k, v in r.items() if k != "kl"} for r in rows_of(no_kl)]
    (no_kl / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in no_kl_rows))

    out = tmp_path / "out"
    report_ok(no_kl, lean, "-o", out)
    data = json.loads((out / "report.json").read_text())
    panels = {p["title"]: p for fig in data["figures"].values() for p in fig["panels"]}
    a, b = f"ngrpo: {no_kl.name}", f"grpo: {lean.name}"
    assert panels["Accuracy (share of correct responses)"]["legend"] == [a]
    assert panels["Clipped at the lower bound (ratio < 1 - eps_low, A < 0)"]["legend"] == [a]
    assert panels["Mean reward"]["legend"] == [a, b]
    assert panels["KL to the reference policy"]["legend"] == [b]
    # response length falls back to the trainer's own "response_length" for the lean run
    length = panels["Mean response length"]["series"][b]
    assert length["key"] == "response_length" and length["values"] == [r["response_length"] for r in rows]
    table = {row["Run"]: row for row in md_table((out / "report.md").read_text(), "Run", "Reward final")}
    assert table[b]["Accuracy final"] == "–" and table[b]["Accuracy best"] == "–"
    assert table[a]["KL final"] == "–"
    assert table[b]["Reward final"] == g6(rows[-1]["rollout/reward_mean"])

    # neither run logs KL: no KL figure at all
    report_ok(no_kl, "-o", tmp_path / "single")
    assert not (tmp_path / "single" / "kl.png").exists()
    assert "kl" not in json.loads((tmp_path / "single" / "report.json").read_text())["figures"]


def test_eval_results_are_plotted_and_tabulated(tiny_runs, tmp_path):
    runs = []
    for name, summary, evals in (
        ("ngrpo", {"math500": {"avg@4": 0.3125, "pass@1": 0.3, "maj@4": 0.35}, "aime24": {"pass@1": 0.0333}},
         [0.25, 0.5]),
        ("grpo", {"math500": {"avg@4": 0.28, "pass@1": 0.275}}, [0.125, 0.375]),
    ):
        run = tmp_path / f"{name}_with_eval"
        shutil.copytree(tiny_runs[name], run, ignore=shutil.ignore_patterns("checkpoints", "final_model", "tensorboard"))
        (run / "eval").mkdir()
        (run / "eval" / "summary.json").write_text(json.dumps(summary))
        (run / "eval_metrics.jsonl").write_text("".join(
            json.dumps({"step": step, "time": 0.0, "eval_math500_pass1": v, "eval_math500_pass4": 1.0}) + "\n"
            for step, v in zip((1, 2), evals)))
        runs.append(run)
    out = tmp_path / "out"
    report_ok(*runs, "-o", out)
    data = json.loads((out / "report.json").read_text())
    labels = [f"ngrpo: {runs[0].name}", f"grpo: {runs[1].name}"]
    during = data["figures"]["eval_pass1"]["panels"]
    assert [p["title"] for p in during] == ["math500"] and during[0]["legend"] == labels
    assert during[0]["series"][labels[1]]["values"] == [0.125, 0.375]
    final = data["figures"]["eval_summary"]["panels"][0]
    assert final["legend"] == labels
    assert final["series"][labels[0]] == {"benchmarks": ["math500", "aime24"], "values": [0.3, 0.0333]}
    for png in ("eval_pass1.png", "eval_summary.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
    table = {row["Run"]: row for row in md_table((out / "report.md").read_text(), "Run", "math500")}
    assert table[labels[0]]["math500"] == "0.3" and table[labels[0]]["aime24"] == "0.0333"
    assert table[labels[1]]["math500"] == "0.275" and table[labels[1]]["aime24"] == "–"


def test_smoothing_keeps_the_table(built, two_runs, tmp_path):
    report_ok(*two_runs, "-o", tmp_path / "smooth", "--smooth", "2")
    text = (tmp_path / "smooth" / "report.md").read_text()
    assert "moving averages over 2 steps" in text
    assert md_table(text, "Run", "Reward final") == md_table(built[2], "Run", "Reward final")


# ------------------------------------------------------------------ errors


def test_not_a_run_directory(tmp_path):
    (tmp_path / "plain").mkdir()
    message = report_fails(tmp_path / "plain", "-o", tmp_path / "out")
    assert f"{tmp_path / 'plain'} is not an ngrpo run directory: {tmp_path / 'plain' / 'ngrpo_run.json'} is missing" in message
    assert not (tmp_path / "out").exists()


def _bare_copy(tiny_runs, tmp_path, name="copy"):
    run = tmp_path / name
    shutil.copytree(tiny_runs["ngrpo"], run, ignore=shutil.ignore_patterns("checkpoints", "final_model", "tensorboard"))
    return run


def test_empty_and_missing_metrics(tiny_runs, tmp_path):
    run = _bare_copy(tiny_runs, tmp_path)
    (run / "metrics.jsonl").write_text("\n")
    message = report_fails(tiny_runs["grpo"], run, "-o", tmp_path / "out")
    assert f"{run / 'metrics.jsonl'} is empty" in message
    (run / "metrics.jsonl").unlink()
    message = report_fails(run, "-o", tmp_path / "out")
    assert f"{run / 'metrics.jsonl'} is missing" in message


def test_corrupt_metrics_line(tiny_runs, tmp_path):
    """A damaged line is skipped and named; the steps after it are kept (pipelines.launch.rundir's policy)."""
    run = _bare_copy(tiny_runs, tmp_path)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text(lines[0] + "\n{not json\n" + lines[1] + "\n")
    result = CliRunner().invoke(cli, ["report", str(run), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert f"{run / 'metrics.jsonl'}: skipped 1 unreadable line(s) (line 2: invalid JSON" in result.output
    assert json.loads((tmp_path / "out" / "report.json").read_text())["runs"][0]["steps"] == 2
    # a last line cut off mid-write (a run still training) is ignored
    (run / "metrics.jsonl").write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])
    report_ok(run, "-o", tmp_path / "out")
    assert json.loads((tmp_path / "out" / "report.json").read_text())["runs"][0]["steps"] == 1


def test_corrupt_manifest_and_eval_summary(tiny_runs, tmp_path):
    run = _bare_copy(tiny_runs, tmp_path)
    (run / "eval").mkdir()
    (run / "eval" / "summary.json").write_text("{truncated")
    assert f"{run / 'eval' / 'summary.json'} is not valid JSON" in report_fails(run, "-o", tmp_path / "out")
    (run / "eval" / "summary.json").unlink()
    (run / "ngrpo_run.json").write_text("")
    assert f"{run / 'ngrpo_run.json'} is not a readable run manifest" in report_fails(run, "-o", tmp_path / "out")


def test_usage_errors(tiny_runs, tmp_path):
    result = report(tiny_runs["ngrpo"])
    assert result.exit_code == 2 and "Missing option '-o'" in result.output
    result = report("-o", tmp_path / "out")
    assert result.exit_code == 2 and "Missing argument 'RUN_DIRS...'" in result.output
    message = report_fails(tiny_runs["ngrpo"], tiny_runs["ngrpo"], "-o", tmp_path / "out")
    assert f"{tiny_runs['ngrpo']} is given twice" in message
