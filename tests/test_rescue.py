"""Per-prompt transitions, rescue rate and accuracy by the base model's solve rate
(pipelines/studies/rescue.py), on a small hand-worked groups.jsonl and eval samples."""
import json
from pathlib import Path

from pipelines.studies import rescue
from pipelines.studies.report import markdown_table

N = 4
# prompt: [(step, correct of 4)]; written below in a shuffled line order (sorting by step is tested)
#   A: W W M    B: C M    C: W    D: W C W    E: M W
APPEARANCES = {"A": [(1, 0), (2, 0), (3, 2)], "B": [(1, 4), (3, 1)], "C": [(2, 0)],
               "D": [(1, 0), (2, 4), (3, 0)], "E": [(2, 2), (3, 0)]}


def _records():
    rows = [{"step": step, "prompt_id": p, "id_from": "row", "correct": c, "n": N, "mean_reward": c / N,
             "kept": c != N, "tokens": 10} for p, apps in APPEARANCES.items() for step, c in apps]
    return sorted(rows, key=lambda r: (-r["step"], r["prompt_id"]))  # latest steps first


def test_outcome_of_a_group():
    assert [rescue.outcome(c, 4) for c in (0, 1, 3, 4)] == ["all-wrong", "mixed", "mixed", "all-correct"]


def test_transitions_hand_worked():
    counts = rescue.transitions(_records())
    # A: W->W, W->M; B: C->M; D: W->C, C->W; E: M->W  (C appears once: no transition)
    expected = {("all-wrong", "all-wrong"): 1, ("all-wrong", "mixed"): 1, ("all-correct", "mixed"): 1,
                ("all-wrong", "all-correct"): 1, ("all-correct", "all-wrong"): 1, ("mixed", "all-wrong"): 1}
    assert counts == {(a, b): expected.get((a, b), 0) for a in rescue.OUTCOMES for b in rescue.OUTCOMES}
    assert sum(counts.values()) == 6


def test_rescue_hand_worked():
    # first seen all-wrong: A, C, D; seen again: A, D; rescued (a correct response later): A (2), D (4)
    assert rescue.rescue(_records()) == {"first_all_wrong": 3, "seen_again": 2, "rescued": 2, "rate": 2 / 3}
    assert rescue.rescue([{"step": 1, "prompt_id": "x", "correct": 1, "n": 4}])["rate"] is None


def test_same_step_appearances_keep_file_order():
    rows = [{"step": 1, "prompt_id": "x", "correct": 0, "n": 2}, {"step": 1, "prompt_id": "x", "correct": 2, "n": 2}]
    assert rescue.transitions(rows)[("all-wrong", "all-correct")] == 1
    assert rescue.rescue(rows)["rescued"] == 1


def test_per_algorithm_pools_runs_and_writes_the_tables(tmp_path):
    for name in ("r1", "r2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "groups.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records()) + "{torn\n")
    (tmp_path / "empty").mkdir()
    summary = rescue.per_algorithm({"ngrpo": [tmp_path / "r1", tmp_path / "r2"], "grpo": [tmp_path / "empty"]})
    assert list(summary) == ["ngrpo"]
    s = summary["ngrpo"]
    assert s["runs"] == 2 and s["id_from"] == ["row"]
    assert s["rescue"] == {"first_all_wrong": 6, "seen_again": 4, "rescued": 4, "rate": 4 / 6}
    assert s["transitions"]["all-wrong -> all-wrong"] == 2 and s["transitions"]["mixed -> mixed"] == 0
    text = "\n".join(rescue.transition_lines(summary, markdown_table))
    assert "| ngrpo | 2 | 6 | 4 | 4 | 66.7 % | training row id |" in text
    # W->W W->M W->C | M->W M->M M->C | C->W C->M C->C, two runs each
    assert "| ngrpo | 2 | 2 | 2 | 2 | 0 | 0 | 2 | 2 | 0 |" in text
    assert "No run has" in "\n".join(rescue.transition_lines({}, markdown_table))


def _samples(bench, per_question):
    return [{"benchmark": bench, "id": q, "sample": i, "correct": bool(c)}
            for q, outcomes in per_question.items() for i, c in enumerate(outcomes)]


def _jsonl(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _study_base(study: Path) -> None:
    """STUDY/eval/base: the base model's samples on benchmark b (q1 never, q2 sometimes, q3 always)."""
    (study / "eval" / "base").mkdir(parents=True)
    _jsonl(study / "eval" / "base" / "samples.jsonl", _samples("b", {"q1": [0, 0], "q2": [1, 0], "q3": [1, 1]}))


def _study_run(run: Path, manifest: dict, generated: tuple, model: dict, tokens: bool = False) -> None:
    """A finished run of 2 steps: MANIFEST, metrics with GENERATED samples at each step, the
    groups of _records, and its eval samples (MODEL: per question, its outcomes)."""
    from pipelines.launch import rundir

    (run / "eval").mkdir(parents=True)
    rundir.write_manifest(run, manifest)
    _jsonl(run / "metrics.jsonl", ({"step": s, "ngrpo/accuracy": 0.25 * s, "ngrpo/generated_samples": float(x),
                                    **({"ngrpo/generated_tokens": 10.0 * x} if tokens else {})}
                                   for s, x in zip((1, 2), generated)))
    _jsonl(run / "groups.jsonl", _records())
    _jsonl(run / "eval" / "samples.jsonl", _samples("b", model))


def test_accuracy_by_the_base_models_solve_rate():
    base = _samples("b", {"q1": [0, 0], "q2": [1, 0], "q3": [1, 1], "q4": [0, 0]})
    model = _samples("b", {"q1": [1, 0, 0, 0], "q2": [1, 1, 0, 0], "q3": [1, 1, 1, 0], "q4": [0, 0, 0, 0],
                           "q5": [1, 1]})  # q5: not in the base eval, left out
    table = rescue.accuracy_by_difficulty(base, model)
    assert table == {"never": {"questions": 2, "samples": 8, "correct": 1, "accuracy": 0.125},
                     "sometimes": {"questions": 1, "samples": 4, "correct": 2, "accuracy": 0.5},
                     "always": {"questions": 1, "samples": 4, "correct": 3, "accuracy": 0.75}}
    pooled = rescue.pooled_difficulty([table, rescue.accuracy_by_difficulty(base, base)])
    assert pooled["never"] == {"questions": 4, "samples": 12, "correct": 1, "accuracy": 1 / 12}
    assert pooled["always"]["accuracy"] == 5 / 6
    text = "\n".join(rescue.difficulty_lines({"ngrpo": table}, markdown_table))
    assert "| ngrpo | 2; 12.5 % | 1; 50.0 % | 1; 75.0 % |" in text


def test_report_states_the_budget_and_draws_by_generated_samples(tmp_path):
    """`ngrpo report` on two runs of one study: budget, by-samples figure, transitions, difficulty."""
    from pipelines.studies.report import build_report

    study = tmp_path / "study"
    _study_base(study)
    for name, algo, samples in (("ngrpo-s0", "ngrpo", (24, 48)), ("grpo-s0", "grpo", (16, 32))):
        _study_run(study / "runs" / name, {"algo": algo, "status": "finished", "max_samples": 40}, samples,
                   {"q1": [1, 0], "q2": [1, 1], "q3": [1, 1]}, tokens=True)
    data = build_report([study / "runs" / "ngrpo-s0", study / "runs" / "grpo-s0"], tmp_path / "out")
    text = (tmp_path / "out" / "report.md").read_text()
    assert "| ngrpo: ngrpo-s0 | 40 generated responses | 48 | 480 |" in text
    assert "| grpo | 1 | 3 | 2 | 2 | 66.7 % | training row id |" in text
    assert "| ngrpo | 1; 50.0 % | 1; 100.0 % | 1; 100.0 % |" in text
    assert "| base model | 1; 0.0 % | 1; 50.0 % | 1; 100.0 % |" in text
    panel = data["figures"]["by_generated_samples"]["panels"][0]
    assert panel["title"].startswith("Accuracy") and panel["series"]["grpo: grpo-s0"]["samples"] == [16.0, 32.0]
    assert panel["series"]["ngrpo: ngrpo-s0"]["values"] == [0.25, 0.5]
    alone = build_report([study / "runs" / "ngrpo-s0"], tmp_path / "out2")
    assert "Skipped: it needs the base model's per-question eval results" not in Path(alone["report"]).read_text()
    import shutil

    shutil.copytree(study / "runs" / "grpo-s0", tmp_path / "lone")
    lone = Path(build_report([tmp_path / "lone"], tmp_path / "out3")["report"]).read_text()
    assert "Skipped: it needs the base model's per-question eval results" in lone


def test_study_md_has_the_budget_the_prompt_tables_and_the_by_samples_figure(tmp_path):
    from pipelines.studies.study_report import write_report

    study = tmp_path / "study"
    _study_base(study)
    (study / "eval" / "base" / "summary.json").write_text(json.dumps({"benchmarks": {"b": {"avg@2": 0.5}}}))
    runs = {}
    for name, algo, seed, samples in (("ngrpo-s0", "ngrpo", 0, (24, 48)), ("ngrpo-s1", "ngrpo", 1, (16, 40)),
                                      ("grpo-s0", "grpo", 0, (16, 32))):
        run = study / "runs" / name
        _study_run(run, {"algo": algo, "status": "finished", "global_step": 2}, samples,
                   {"q1": [1, seed], "q2": [1, 1], "q3": [1, 0]})
        (run / "eval" / "summary.json").write_text(json.dumps({"benchmarks": {"b": {"avg@2": 0.5 + seed / 10}}}))
        runs[name] = {"algo": algo, "seed": seed, "status": "finished", "wall_time_s": 1.0}
    state = {"plan": {"algos": ["ngrpo", "grpo"], "seeds": [0, 1], "model": "m", "data": "d", "max_steps": None,
                      "budget": ["samples", 40], "preset": "cpu-tiny", "benchmarks": ["b"], "eval": {"n": 2}},
             "runs": runs}
    results = write_report(study, state)
    md = (study / "study.md").read_text()
    assert "equal budget of 40 generated responses (dropped groups included) per run" in md
    assert "Steps trained within the equal budget of 40" in md and "ngrpo-s0 2" in md
    assert "| ngrpo | 2 | 6 | 4 | 4 | 66.7 % | training row id |" in md
    # ngrpo pooled over its 2 seeds (a question counts once per run): q1 (never) 3 of 4 right,
    # q2 (sometimes) 4 of 4, q3 (always) 2 of 4
    assert "| ngrpo | 2; 75.0 % | 2; 100.0 % | 2; 50.0 % |" in md
    assert results["training"]["ngrpo"]["ngrpo/generated_samples"]["mean"] == [20.0, 44.0]
    assert "![training_by_samples.png](training_by_samples.png)" in md
    assert (study / "training_by_samples.png").stat().st_size > 5_000
