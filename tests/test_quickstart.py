"""The quickstart (README command one) end to end, with 2 RL steps (`--fast`)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.pipeline, pytest.mark.slow]


def test_quickstart_runs_every_stage(tmp_path):
    out = tmp_path / "qs"
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "quickstart.py"), "--fast", "--out", str(out)],
                          capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    run = out / "runs" / "ngrpo"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    # before and after RL: the same 64 held-out questions and settings, and the table prints them
    before = json.loads((out / "eval-before" / "summary.json").read_text())
    after = json.loads((run / "eval" / "summary.json").read_text())
    assert before["settings"] | {"model": None, "model_spec": None} == after["settings"] | {"model": None, "model_spec": None}
    b, a = before["benchmarks"]["heldout"], after["benchmarks"]["heldout"]
    assert b["problems"] == a["problems"] == 64 and b["samples"] == a["samples"] == 256
    assert f"| avg@4 | {100 * b['avg@4']:.1f} % | {100 * a['avg@4']:.1f} % |" in proc.stdout
    assert b["avg@4"] > 0.0, "the warm-up taught the random model nothing: RL would see all-wrong groups only"
    # the mechanism, on the before-RL samples as groups of 4: an all-wrong group's wrong answers get
    # 0 from GRPO and (0 - 1/5) / std([0, 0, 0, 0, 1]) = -0.447 from NGRPO (one virtual correct answer)
    rows = [json.loads(line) for line in (out / "eval-before" / "samples.jsonl").read_text().splitlines()]
    by_question = {}
    for r in rows:
        by_question.setdefault(r["id"], []).append(r["correct"])
    all_wrong = sum(1 for c in by_question.values() if not any(c))
    assert all_wrong > 0 and f"| all wrong | {all_wrong} | +0.000 | -0.447 |" in proc.stdout
    assert (out / "export" / "model.safetensors").exists() and (out / "export" / "README.md").exists()
    report = (out / "report" / "report.md").read_text()
    assert "ngrpo" in report and f"{metrics[-1]['step']}" in report
    for label in ("run directory", "eval results", "exported model", "report"):
        assert label in proc.stdout
