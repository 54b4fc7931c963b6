"""Held-out accuracy of every model of the real-model study under both answer rules, from the same samples.

Each study evaluates its models under the rule it trains with (`boxed` or `authors`); this regrades
the same responses (each eval's samples.jsonl) under both rules with ngrpo's own grader, so a
regime's models are compared under the rule they did not train for too. Prints a markdown table:
per regime and arm, avg@n under each rule (mean ± std over seeds, in %) and the base model's.

    .venv/bin/python docs/real-model-study/both_rules.py OUT_DIR      (command.sh's OUT_DIR)
"""
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from pipelines.datasets.grading import grade_many  # noqa: E402

RULES = ("boxed", "authors")


def accuracy(samples: Path, golds: dict, rule: str) -> float:
    rows = [json.loads(line) for line in samples.read_text().splitlines() if line.strip()]
    results = grade_many([r["response"] for r in rows], [golds[r["id"]] for r in rows], extraction=rule)
    return 100.0 * sum(g.correct for g in results) / len(results)


def cell(values) -> str:
    if not values:
        return "–"
    spread = f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.1f}{spread} ({len(values)})"


def main(out: Path) -> None:
    golds = {r["id"]: r["answer"] for r in map(json.loads, (out / "data" / "test.jsonl").read_text().splitlines())}
    print("| regime | model | avg under the boxed rule | avg under the authors' rule |")
    print("|---|---|---|---|")
    for regime in RULES:
        study = out / regime
        if not (study / "study.json").exists():
            continue
        state = json.loads((study / "study.json").read_text())
        base = study / "eval" / "base" / "samples.jsonl"
        if base.exists():
            print(f"| {regime} | base | " + " | ".join(f"{accuracy(base, golds, r):.1f}" for r in RULES) + " |")
        for arm in state["plan"]["algos"]:
            runs = [name for name, e in state["runs"].items() if e["algo"] == arm and e["status"] == "finished"]
            scores = {r: [accuracy(study / "runs" / n / "eval" / "samples.jsonl", golds, r) for n in runs]
                      for r in RULES}
            print(f"| {regime} | {arm} | " + " | ".join(cell(scores[r]) for r in RULES) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
