"""docs/real-model-study/keep.py: a study's results kept in git and put back on a fresh machine, so
that the study skips what was finished and trains the rest again."""
import importlib.util
import json
from pathlib import Path

from pipelines.launch import rundir
from pipelines.studies.study import Study, StudyPlan

KEEP = Path(__file__).resolve().parents[1] / "docs" / "real-model-study" / "keep.py"


def _keep(monkeypatch, kept: Path):
    spec = importlib.util.spec_from_file_location("keep", KEEP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "KEPT", kept)
    return module


def _child(calls):
    """Stands in for `ngrpo train` / `ngrpo eval` (the study's bookkeeping is under test; the real
    children are the pipeline tests'), writing what the real ones write."""
    def child(self, argv, log_name):
        calls.append(argv[0])
        out = Path(argv[argv.index("--output" if argv[0] == "train" else "-o") + 1])
        if argv[0] == "train":
            (out / rundir.FINAL_MODEL).mkdir(parents=True)
            (out / rundir.FINAL_MODEL / "config.json").write_text("{}")
            (out / rundir.LOGS).mkdir()
            (out / rundir.LOGS / "launch-1.log").write_text("log")
            (out / rundir.GROUPS).write_text('{"step": 1}\n')
            rundir.write_manifest(out, {"status": "finished", "global_step": 1})
        else:
            out.mkdir(parents=True, exist_ok=True)
            (out / "summary.json").write_text(json.dumps({"settings": {"n": 1}, "benchmarks": {"b": {"avg@1": 0.5}}}))
            (out / "samples.jsonl").write_text('{"id": "q"}\n')
        return 0 if "grpo-s1" not in str(out) else 1  # grpo-s1's training fails: not finished
    return child


def test_save_then_restore_skips_the_finished_runs_and_keeps_no_model(tmp_path, monkeypatch):
    out, kept = tmp_path / "out", tmp_path / "kept"
    (out / "data").mkdir(parents=True)
    (out / "data" / "train.jsonl").write_text('{"problem": "1 + 1"}\n')
    plan = StudyPlan(model="m", data=str(out / "data" / "train.jsonl"), benchmarks=["b"], algos=["grpo"], seeds=[0, 1])
    calls = []
    monkeypatch.setattr(Study, "_ngrpo", _child(calls))
    state = Study(out / "boxed", plan, log=lambda msg: None).execute(progress=False)
    assert {n: e["status"] for n, e in state["runs"].items()} == {"grpo-s0": "finished", "grpo-s1": "failed"}
    assert calls == ["eval", "train", "eval", "train"]

    keep = _keep(monkeypatch, kept)
    keep.save(out)
    files = sorted(str(p.relative_to(kept)) for p in kept.rglob("*") if p.is_file())
    assert files == ["boxed/eval/base/samples.jsonl", "boxed/eval/base/summary.json",
                     f"boxed/runs/grpo-s0/.{rundir.MANIFEST}.spare", "boxed/runs/grpo-s0/eval/samples.jsonl",
                     "boxed/runs/grpo-s0/eval/summary.json", f"boxed/runs/grpo-s0/{rundir.GROUPS}",
                     f"boxed/runs/grpo-s0/{rundir.MANIFEST}", "boxed/study.json", "data/train.jsonl"]

    fresh = tmp_path / "fresh"  # the same path on a new machine: only the kept files
    out.rename(fresh)
    keep.restore(out)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == files
    calls.clear()
    state = Study(out / "boxed", plan, log=lambda msg: None).execute(progress=False)
    assert calls == ["train"]  # the base eval and grpo-s0 are finished; grpo-s1 trains again
    assert state["runs"]["grpo-s0"]["status"] == "finished"
