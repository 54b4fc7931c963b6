"""Per-prompt outcomes across a run (RUN_DIR/groups.jsonl, openrlhf_patch/group_log.py) and
held-out accuracy by the base model's solve rate. Pure functions over rows; the readers are at
the end.

* outcome of a group: all-wrong (no response correct), all-correct (every one), else mixed;
* transitions: between a prompt's consecutive appearances (by step, then file order), counted
  over every (from, to) pair of outcomes;
* rescue rate: of the prompts whose first appearance is all-wrong, the share with a correct
  response in a later appearance;
* difficulty: each held-out question is "never", "sometimes" or "always" solved by the base
  model (its eval samples.jsonl), and a model's accuracy is the mean correctness of its samples
  on each such set of questions.
"""
import json
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

OUTCOMES = ("all-wrong", "mixed", "all-correct")
DIFFICULTY = ("never", "sometimes", "always")


def outcome(correct: int, n: int) -> str:
    return "all-wrong" if correct == 0 else "all-correct" if correct >= n else "mixed"


def appearances(records: Iterable[dict]) -> Dict[str, List[dict]]:
    """{prompt id: its group records in order of step (file order within a step)}."""
    by_prompt: Dict[str, List[Tuple[int, int, dict]]] = {}
    for i, r in enumerate(records):
        by_prompt.setdefault(str(r["prompt_id"]), []).append((r["step"], i, r))
    return {p: [r for _, _, r in sorted(rows, key=lambda t: (t[0], t[1]))] for p, rows in by_prompt.items()}


def transitions(records: Iterable[dict]) -> Dict[Tuple[str, str], int]:
    """{(from, to): count} over all 9 pairs of outcomes, from consecutive appearances of a prompt."""
    counts = {(a, b): 0 for a in OUTCOMES for b in OUTCOMES}
    for rows in appearances(records).values():
        kinds = [outcome(r["correct"], r["n"]) for r in rows]
        for a, b in zip(kinds, kinds[1:]):
            counts[(a, b)] += 1
    return counts


def rescue(records: Iterable[dict]) -> dict:
    """Prompts first seen all-wrong, how many of them later got a correct response, and the rate
    (None when no prompt was first seen all-wrong). `seen_again`: those with a later appearance."""
    first_wrong = rescued = seen_again = 0
    for rows in appearances(records).values():
        if rows[0]["correct"] != 0:
            continue
        first_wrong += 1
        seen_again += len(rows) > 1
        rescued += any(r["correct"] > 0 for r in rows[1:])
    return {"first_all_wrong": first_wrong, "seen_again": seen_again, "rescued": rescued,
            "rate": rescued / first_wrong if first_wrong else None}


def solve_counts(sample_rows: Iterable[dict]) -> Dict[Tuple[str, str], Tuple[int, int]]:
    """{(benchmark, question id): (correct samples, samples)} of an eval's samples.jsonl rows."""
    out: Dict[Tuple[str, str], Tuple[int, int]] = {}
    for r in sample_rows:
        key = (str(r["benchmark"]), str(r["id"]))
        c, n = out.get(key, (0, 0))
        out[key] = (c + bool(r["correct"]), n + 1)
    return out


def difficulty(correct: int, n: int) -> str:
    return "never" if correct == 0 else "always" if correct >= n else "sometimes"


def accuracy_by_difficulty(base_rows: Iterable[dict], model_rows: Iterable[dict]) -> Dict[str, dict]:
    """{bucket: {"questions", "samples", "accuracy"}} of the model's samples on the questions the
    base model never / sometimes / always solved; questions the base was not evaluated on are left out."""
    base = {key: difficulty(c, n) for key, (c, n) in solve_counts(base_rows).items()}
    out = {b: {"questions": 0, "samples": 0, "correct": 0} for b in DIFFICULTY}
    for key, (c, n) in solve_counts(model_rows).items():
        bucket = base.get(key)
        if bucket is None:
            continue
        out[bucket]["questions"] += 1
        out[bucket]["samples"] += n
        out[bucket]["correct"] += c
    for entry in out.values():
        entry["accuracy"] = entry["correct"] / entry["samples"] if entry["samples"] else None
    return out


def pooled_difficulty(tables: List[Dict[str, dict]]) -> Dict[str, dict]:
    """accuracy_by_difficulty of several runs (seeds) pooled: counts summed, accuracy recomputed."""
    out = {b: {"questions": 0, "samples": 0, "correct": 0} for b in DIFFICULTY}
    for table in tables:
        for b in DIFFICULTY:
            for k in ("questions", "samples", "correct"):
                out[b][k] += table[b][k]
    for entry in out.values():
        entry["accuracy"] = entry["correct"] / entry["samples"] if entry["samples"] else None
    return out


# ---------------------------------------------------------------------------------------------
# Readers and the per-algorithm summary
# ---------------------------------------------------------------------------------------------
def read_rows(path) -> List[dict]:
    """The JSON object lines of PATH (a damaged line is skipped); [] when there is no such file."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def group_rows(run_dir) -> List[dict]:
    from pipelines.launch import rundir

    return [r for r in read_rows(Path(run_dir) / rundir.GROUPS)
            if isinstance(r.get("step"), int) and "prompt_id" in r and isinstance(r.get("correct"), int)
            and isinstance(r.get("n"), int)]


def per_algorithm(runs: Dict[str, List[Path]]) -> Dict[str, dict]:
    """{algo: transitions and rescue pooled over its runs}: each run's prompts count separately
    (a prompt's appearances never cross runs)."""
    out = {}
    for algo, dirs in runs.items():
        counts = {(a, b): 0 for a in OUTCOMES for b in OUTCOMES}
        totals = {"first_all_wrong": 0, "seen_again": 0, "rescued": 0}
        id_from, logged = set(), 0
        for d in dirs:
            rows = group_rows(d)
            if not rows:
                continue
            logged += 1
            id_from |= {r.get("id_from", "hash") for r in rows}
            for pair, n in transitions(rows).items():
                counts[pair] += n
            for k, v in rescue(rows).items():
                if k != "rate":
                    totals[k] += v
        if not logged:
            continue
        totals["rate"] = totals["rescued"] / totals["first_all_wrong"] if totals["first_all_wrong"] else None
        out[algo] = {"runs": logged, "transitions": {f"{a} -> {b}": n for (a, b), n in counts.items()},
                     "rescue": totals, "id_from": sorted(id_from)}
    return out


def transition_lines(summary: Dict[str, dict], markdown_table) -> List[str]:
    """The markdown of per_algorithm's summary: a transition table and the rescue rate per algorithm."""
    if not summary:
        return ["No run has RUN_DIR/groups.jsonl (runs made before it was written).", ""]
    pairs = [f"{a} -> {b}" for a in OUTCOMES for b in OUTCOMES]
    lines = ["Outcome of a prompt's group at one appearance and at its next (RUN_DIR/groups.jsonl, groups the "
             "filter dropped included), summed over runs; rescue = share of the prompts first seen all-wrong "
             "that get a correct response later.", ""]
    rows = [[algo] + [str(s["transitions"][p]) for p in pairs] for algo, s in summary.items()]
    lines += markdown_table(["algorithm"] + pairs, rows) + [""]
    rows = [[algo, str(s["runs"]), str(s["rescue"]["first_all_wrong"]), str(s["rescue"]["seen_again"]),
             str(s["rescue"]["rescued"]),
             "–" if s["rescue"]["rate"] is None else f"{100 * s['rescue']['rate']:.1f} %",
             ", ".join("training row id" if f == "row" else "hash of the prompt text" for f in s["id_from"])]
            for algo, s in summary.items()]
    lines += markdown_table(["algorithm", "runs", "first seen all-wrong", "seen again", "rescued", "rescue rate",
                             "prompt identified by"], rows) + [""]
    return lines


def difficulty_lines(tables: Dict[str, Dict[str, dict]], markdown_table) -> List[str]:
    """The markdown of {algo or model: accuracy_by_difficulty (pooled)}."""
    header = ["model"] + [f"base {b} solved (questions; accuracy)" for b in DIFFICULTY]
    rows = []
    for name, table in tables.items():
        rows.append([name] + [f"{t['questions']}; " + ("–" if t["accuracy"] is None else f"{100 * t['accuracy']:.1f} %")
                              for t in (table[b] for b in DIFFICULTY)])
    return ["Held-out accuracy (share of correct samples) on the questions the base model never, sometimes or "
            "always solved in its own evaluation (eval samples.jsonl).", ""] + markdown_table(header, rows) + [""]


def base_samples(path) -> Optional[List[dict]]:
    """The base model's per-question eval rows (samples.jsonl), or None when there are none."""
    rows = [r for r in read_rows(path) if {"benchmark", "id", "correct"} <= set(r)]
    return rows or None
