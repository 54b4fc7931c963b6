"""The comparison a study writes: study.json's "results", study.md and the figures.

Per benchmark and algorithm, over seeds: mean, standard deviation (n - 1) and a 95 % interval
(Student's t) of avg@n, pass@k (k = 1, 2, 4, ... n), maj@n and the authors' final score; the
change from the base model; and the paired difference NGRPO - each baseline, seed by seed (runs
with the same seed see the same data order), with its interval. Training curves are the mean over
seeds with a band of one standard deviation. Every number comes from the runs' own files:
eval/summary.json (`ngrpo eval`), metrics.jsonl and eval_metrics.jsonl.
"""
import json
import math
from pathlib import Path
from typing import Dict, List, Optional

from pipelines.launch import rundir
from pipelines.studies import rescue, statistics
from pipelines.studies.study import budget_text
from pipelines.studies.report import finish_axes, fmt_duration, markdown_table, new_figure, palette, save_figure

# Two-sided 95 % quantiles of Student's t by degrees of freedom (no scipy here); 1.96 above 30.
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
       20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
       29: 2.045, 30: 2.042}
REFERENCE_ALGO = "ngrpo"
# Training curves: (title, metrics.jsonl keys in order of preference, y label).
CURVES = (
    ("Mean reward", ("rollout/reward_mean", "reward"), "reward"),
    ("Accuracy of the rollouts", ("ngrpo/accuracy",), "share correct"),
    ("Share of all-wrong groups", ("ngrpo/frac_all_wrong",), "share of groups"),
    ("Entropy", ("entropy_loss",), "nats / token"),
    ("Response length", ("rollout/response_length_mean", "response_length"), "tokens"),
    ("Clipped at the lower bound (A < 0)", ("clip_frac_low",), "share of tokens"),
    ("Clipped at the upper bound (A > 0)", ("clip_frac_high",), "share of tokens"),
)
# The x-axis of the "by generated responses" figure: cumulative responses generated, dropped groups included.
SAMPLES_KEY = "ngrpo/generated_samples"
BY_SAMPLES = ("rollout/reward_mean", "reward", "ngrpo/accuracy", "ngrpo/frac_all_wrong")


def describe(values: List[float]) -> dict:
    """mean, std (n - 1) and the 95 % t interval of the mean; std and interval need two values."""
    n = len(values)
    mean = sum(values) / n
    out = {"values": values, "n": n, "mean": mean, "std": None, "ci95": None}
    if n >= 2:
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
        half = T95.get(n - 1, 1.96) * std / math.sqrt(n)
        out.update(std=std, ci95=[mean - half, mean + half])
    return out


def _metric_names(scores: dict) -> List[str]:
    """The headline metrics of an eval summary, in table order."""
    n = [k for k in scores if k.startswith("avg@")]
    keys = n + sorted((k for k in scores if k.startswith("pass@") and k != "pass@1"), key=lambda k: int(k[5:]))
    keys += [k for k in scores if k.startswith("maj@")] + [k for k in ("final_score",) if k in scores]
    return keys


def _read_summary(path: Path) -> Optional[dict]:
    return json.loads(path.read_text())["benchmarks"] if path.exists() else None


def collect(study_dir, state: dict) -> dict:
    """study.json's "results" from the files of the finished runs."""
    study_dir = Path(study_dir)
    plan = state["plan"]
    finished = {name: e for name, e in state["runs"].items() if e["status"] == "finished"}
    base = _read_summary(study_dir / "eval" / "base" / "summary.json") or {}
    evals = {name: _read_summary(study_dir / "runs" / name / rundir.EVAL_DIR / "summary.json") for name in finished}
    results = {"benchmarks": {}, "training": {}, "wall_time_s": {}}
    for bench, base_scores in base.items():
        entry = {"base": {k: base_scores[k] for k in _metric_names(base_scores)}, "algos": {}, "paired": {}}
        for algo in plan["algos"]:
            runs = [(e["seed"], evals[name][bench]) for name, e in finished.items() if e["algo"] == algo]
            if not runs:
                continue
            runs.sort(key=lambda r: r[0])
            entry["algos"][algo] = {"seeds": [s for s, _ in runs]}
            for metric in _metric_names(runs[0][1]):
                stats = describe([scores[metric] for _, scores in runs])
                stats["change_from_base"] = stats["mean"] - base_scores[metric] if metric in base_scores else None
                entry["algos"][algo][metric] = stats
        ref = entry["algos"].get(REFERENCE_ALGO)
        for algo, other in entry["algos"].items():
            seeds = sorted(set(ref["seeds"]) & set(other["seeds"])) if ref and algo != REFERENCE_ALGO else []
            if seeds:
                entry["paired"][algo] = {"seeds": seeds}
                for metric in entry["base"]:
                    diffs = [ref[metric]["values"][ref["seeds"].index(s)] - other[metric]["values"][other["seeds"].index(s)]
                             for s in seeds]
                    entry["paired"][algo][metric] = describe(diffs)
        results["benchmarks"][bench] = entry
    for algo in plan["algos"]:
        names = [name for name, e in finished.items() if e["algo"] == algo]
        if names:
            results["training"][algo] = _training_curves([study_dir / "runs" / name for name in names])
    # Steps each run trained: a run whose data ran out (a group filter draws extra prompts) stops
    # short of max_steps, and the comparison must say so.
    results["steps_trained"] = {name: rundir.read_manifest(study_dir / "runs" / name).get("global_step")
                                for name in finished}
    by_algo = {algo: [study_dir / "runs" / name for name, e in finished.items() if e["algo"] == algo]
               for algo in plan["algos"]}
    results["rescue"] = rescue.per_algorithm(by_algo)
    results["difficulty"] = _difficulty(study_dir, by_algo)
    results["bootstrap"] = _bootstrap(study_dir, finished, plan["algos"], list(results["benchmarks"]))
    results["wall_time_s"] = {name: e.get("wall_time_s") for name, e in state["runs"].items()}
    results["wall_time_s"]["total"] = sum(v for v in results["wall_time_s"].values() if v)
    return results


def _bootstrap(study_dir: Path, finished: dict, algos: List[str], benches: List[str]) -> dict:
    """Per benchmark: each algorithm's avg accuracy with an interval over seeds and questions, and
    each paired difference with the seeds it needs (pipelines/studies/statistics.py), from the
    runs' per-question eval results (eval/samples.jsonl)."""
    rows = {name: rescue.read_rows(study_dir / "runs" / name / rundir.EVAL_DIR / "samples.jsonl") for name in finished}
    out = {}
    for bench in benches:
        per_algo = {algo: {e["seed"]: statistics.per_question(r for r in rows[name] if r.get("benchmark") == bench)
                           for name, e in finished.items() if e["algo"] == algo} for algo in algos}
        per_algo = {algo: {s: q for s, q in seeds.items() if q} for algo, seeds in per_algo.items()}
        entry = {"algos": {a: statistics.bootstrap(v) for a, v in per_algo.items() if v}, "paired": {}}
        ref = per_algo.get(REFERENCE_ALGO)
        for algo, other in per_algo.items():
            if ref and other and algo != REFERENCE_ALGO:
                entry["paired"][algo] = statistics.paired_bootstrap(ref, other)
        out[bench] = entry
    return out


def bootstrap_lines(results: dict) -> List[str]:
    """study.md's section on intervals over seeds and questions and on the seeds a difference needs."""
    lines = ["## Intervals over seeds and questions, and the seeds a difference needs", "",
             "Mean share of correct samples (%) with a 95 % bootstrap interval that resamples both the seeds and "
             "the held-out questions; for each paired difference, the seeds for which 1.96 s / sqrt(n) falls "
             "below the difference (s: the spread of the seed-by-seed differences), and below 2 points "
             "(pipelines/studies/statistics.py). With one seed there is no spread and no number.", ""]
    for bench, entry in (results.get("bootstrap") or {}).items():
        rows = [[algo, f"{b['mean']:.1f} [{b['ci95'][0]:.1f}, {b['ci95'][1]:.1f}]", str(b["seeds"]), str(b["questions"])]
                for algo, b in entry["algos"].items() if b]
        lines += [f"{bench}:", ""] + markdown_table(["algorithm", "accuracy [95 % over seeds and questions]", "seeds",
                                                     "questions"], rows) + [""]
        rows = [[f"{REFERENCE_ALGO} - {algo}", f"{p['mean']:+.1f} [{p['ci95'][0]:+.1f}, {p['ci95'][1]:+.1f}]",
                 ", ".join(f"{v:+.1f}" for v in p["by_seed"]), str(p["seeds_needed"] or "–"),
                 str(p["seeds_needed_2pt"] or "–")] for algo, p in entry["paired"].items() if p]
        if rows:
            lines += markdown_table(["difference", "points [95 % over seeds and questions]", "by seed",
                                     "seeds to resolve it", "seeds to resolve 2 points"], rows) + [""]
    return lines


def _difficulty(study_dir: Path, by_algo: Dict[str, List[Path]]) -> Optional[dict]:
    """{"base model" and each algo: held-out accuracy by the base model's solve rate}, pooled over
    seeds, from the evals' samples.jsonl; None when the base model's eval has no per-question rows."""
    base = rescue.base_samples(study_dir / "eval" / "base" / "samples.jsonl")
    if base is None:
        return None
    tables = {"base model": rescue.accuracy_by_difficulty(base, base)}
    for algo, dirs in by_algo.items():
        per_run = [rescue.read_rows(d / rundir.EVAL_DIR / "samples.jsonl") for d in dirs]
        per_run = [rows for rows in per_run if rows]
        if per_run:
            tables[algo] = rescue.pooled_difficulty([rescue.accuracy_by_difficulty(base, rows) for rows in per_run])
    return tables


def _training_curves(run_dirs: List[Path]) -> dict:
    """Per curve: steps, mean and std over runs at each step, and the mean over all steps."""
    logs = [rundir.read_step_log(d / rundir.METRICS).rows for d in run_dirs]
    validation = [rundir.read_step_log(d / rundir.EVAL_METRICS).rows for d in run_dirs]
    out = {}
    for title, keys, _ in CURVES:
        key = next((k for k in keys if any(k in row for rows in logs for row in rows)), None)
        if key:
            out[key] = _mean_curve([{r["step"]: r[key] for r in rows if isinstance(r.get(key), (int, float))}
                                    for rows in logs])
    if any(SAMPLES_KEY in row for rows in logs for row in rows):  # the x-axis of the by-samples figure
        out[SAMPLES_KEY] = _mean_curve([{r["step"]: r[SAMPLES_KEY] for r in rows
                                         if isinstance(r.get(SAMPLES_KEY), (int, float))} for rows in logs])
    val_keys = sorted({k for rows in validation for r in rows for k in r if k.startswith("eval_")})
    for key in val_keys:
        out[key] = _mean_curve([{r["step"]: r[key] for r in rows if isinstance(r.get(key), (int, float))}
                                for rows in validation])
    return out


def _mean_curve(per_run: List[Dict[int, float]]) -> dict:
    steps = sorted(set.intersection(*(set(d) for d in per_run))) if per_run else []
    stats = [describe([d[s] for d in per_run]) for s in steps]
    values = [v for d in per_run for v in d.values()]
    return {"steps": steps, "mean": [s["mean"] for s in stats], "std": [s["std"] or 0.0 for s in stats],
            "runs": len(per_run), "overall_mean": sum(values) / len(values) if values else None}


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------
def draw(results: dict, out_dir: Path, algos: List[str]) -> List[str]:
    colors = dict(zip(algos, palette(len(algos))))
    files = []
    for bench, entry in results["benchmarks"].items():
        if not entry["algos"]:
            continue
        fig, (ax_bar, ax_k) = new_figure(2, f"{bench}: evaluation of the final models")
        head = next(iter(entry["base"]))  # avg@n
        names = list(entry["algos"])
        for i, algo in enumerate(names):
            stats = entry["algos"][algo][head]
            err = None if stats["ci95"] is None else [[stats["mean"] - stats["ci95"][0]], [stats["ci95"][1] - stats["mean"]]]
            ax_bar.bar(i, stats["mean"], color=colors[algo], yerr=err, capsize=4, label=algo)
            ax_bar.scatter([i] * len(stats["values"]), stats["values"], color="black", s=12, zorder=3)
        ax_bar.axhline(entry["base"][head], color="grey", linestyle="--", label="base model")
        ax_bar.set_xticks(range(len(names)), names)
        finish_axes(ax_bar, f"{head}: mean over seeds, 95 % interval, seeds as dots", head, xlabel="algorithm")
        ks = [k for k in entry["base"] if k.startswith("pass@")]
        if ks:
            xs = [int(k[5:]) for k in ks]
            for algo in names:
                ax_k.plot(xs, [entry["algos"][algo][k]["mean"] for k in ks], marker="o", color=colors[algo], label=algo)
            ax_k.plot(xs, [entry["base"][k] for k in ks], marker="o", color="grey", linestyle="--", label="base model")
            ax_k.set_xscale("log", base=2)
            finish_axes(ax_k, "pass@k (mean over seeds)", "pass@k", xlabel="k")
        else:
            ax_k.set_visible(False)
        files.append(save_figure(fig, out_dir, f"eval_{bench}", bench, [])["file"])
    curves = [(title, keys, ylabel) for title, keys, ylabel in CURVES
              if any(k in results["training"].get(a, {}) for a in algos for k in keys)]
    val_keys = sorted({k for a in algos for k in results["training"].get(a, {}) if k.startswith("eval_")})
    panels = curves + [(f"Validation during training: {k}", (k,), "score") for k in val_keys]
    if panels:
        fig, axes = new_figure(len(panels), "Training, mean over seeds (band: one standard deviation)")
        for ax, (title, keys, ylabel) in zip(axes, panels):
            for algo in algos:
                curve = next((results["training"].get(algo, {}).get(k) for k in keys
                              if k in results["training"].get(algo, {})), None)
                if curve and curve["steps"]:
                    lo = [m - s for m, s in zip(curve["mean"], curve["std"])]
                    hi = [m + s for m, s in zip(curve["mean"], curve["std"])]
                    ax.plot(curve["steps"], curve["mean"], color=colors[algo], label=algo)
                    ax.fill_between(curve["steps"], lo, hi, color=colors[algo], alpha=0.2)
            finish_axes(ax, title, ylabel)
        files.append(save_figure(fig, out_dir, "training_curves", "Training curves", [])["file"])
    by_samples = _draw_by_samples(results, out_dir, algos, colors)
    return files + ([by_samples] if by_samples else [])


def _draw_by_samples(results: dict, out_dir: Path, algos: List[str], colors: dict) -> Optional[str]:
    """Reward, accuracy and all-wrong share against the responses generated (mean over seeds at
    each step, dropped groups included): algorithms compared at equal generation cost."""
    panels = [(title, keys, ylabel) for title, keys, ylabel in CURVES if set(keys) & set(BY_SAMPLES)
              and any(k in results["training"].get(a, {}) for a in algos for k in keys)]
    if not panels or not any(SAMPLES_KEY in results["training"].get(a, {}) for a in algos):
        return None
    fig, axes = new_figure(len(panels), "Training by generated responses, mean over seeds")
    for ax, (title, keys, ylabel) in zip(axes, panels):
        for algo in algos:
            curves = results["training"].get(algo, {})
            x, curve = curves.get(SAMPLES_KEY), next((curves[k] for k in keys if k in curves), None)
            if not x or not curve:
                continue
            at = dict(zip(x["steps"], x["mean"]))
            points = [(at[s], m) for s, m in zip(curve["steps"], curve["mean"]) if s in at]
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], color=colors[algo], label=algo, marker="o",
                        markersize=3)
        finish_axes(ax, title, ylabel, xlabel="generated responses")
    return save_figure(fig, out_dir, "training_by_samples", "Training by generated responses", [])["file"]


# ---------------------------------------------------------------------------------------------
# study.md
# ---------------------------------------------------------------------------------------------
def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _stat_cell(stats: dict) -> str:
    if stats["std"] is None:
        return _pct(stats["mean"])
    return f"{_pct(stats['mean'])} ± {_pct(stats['std'])} [{_pct(stats['ci95'][0])}, {_pct(stats['ci95'][1])}]"


def conclusion(entry: dict, metric: str) -> str:
    """One sentence on what the spread between seeds allows one to conclude (paired intervals)."""
    parts = []
    for algo, paired in entry["paired"].items():
        stats = paired.get(metric)
        if not stats or stats["ci95"] is None:
            continue
        lo, hi = stats["ci95"]
        verdict = ("better" if lo > 0 else "worse" if hi < 0 else "not distinguishable from it")
        parts.append(f"{REFERENCE_ALGO} - {algo} = {_pct(stats['mean'])} points, 95 % interval "
                     f"[{_pct(lo)}, {_pct(hi)}] over {stats['n']} seeds: {REFERENCE_ALGO} is {verdict}"
                     + ("" if verdict.startswith("not") else f" than {algo}"))
    return "; ".join(parts) + "." if parts else ""


def _seeds(seeds: list) -> str:
    return f"{len(seeds)} seed" + ("s" if len(seeds) != 1 else "")


def write_markdown(results: dict, state: dict, out_dir: Path, figures: List[str], header: str = "") -> Path:
    plan = state["plan"]
    lines = ["# Study: " + ", ".join(plan["algos"]) + f" x seeds {', '.join(map(str, plan['seeds']))}", ""]
    if header:
        lines += [header, ""]
    lines += [f"Model `{plan['model']}`, training data `{plan['data']}`, "
              f"{budget_text(plan)}, preset {plan['preset']}; evaluation "
              f"{', '.join(plan['benchmarks'])} with " + ", ".join(f"{k} {v}" for k, v in plan["eval"].items()) + ".",
              "All scores in %: mean ± standard deviation over seeds [95 % interval of the mean].", ""]
    for bench, entry in results["benchmarks"].items():
        metrics = list(entry["base"])
        lines += [f"## {bench}", ""]
        rows = [["base model"] + [_pct(entry["base"][m]) for m in metrics] + ["–"]]
        for algo, stats in entry["algos"].items():
            rows.append([f"{algo} ({_seeds(stats['seeds'])})"] + [_stat_cell(stats[m]) for m in metrics]
                        + [f"{100 * stats[metrics[0]]['change_from_base']:+.1f}"])
        lines += markdown_table(["algorithm"] + metrics + [f"{metrics[0]} change from base"], rows) + [""]
        if entry["paired"]:
            rows = [[f"{REFERENCE_ALGO} - {algo} ({_seeds(p['seeds'])})"] + [_stat_cell(p[m]) for m in metrics]
                    for algo, p in entry["paired"].items()]
            lines += ["Paired difference, seed by seed:", ""] + markdown_table(["difference"] + metrics, rows) + [""]
            sentence = conclusion(entry, metrics[0])
            if sentence:
                lines += [f"On {metrics[0]}: {sentence}", ""]
    lines += bootstrap_lines(results)
    lines += ["## Training", ""]
    keys = [("ngrpo/frac_all_wrong", "all-wrong groups"), ("ngrpo/accuracy", "rollout accuracy"),
            ("clip_frac_low", "clipped at low bound"), ("clip_frac_high", "clipped at high bound"),
            ("entropy_loss", "entropy")]
    rows = []
    for algo, curves in results["training"].items():
        rows.append([algo] + [("–" if k not in curves or curves[k]["overall_mean"] is None
                               else f"{curves[k]['overall_mean']:.4g}") for k, _ in keys])
    lines += ["Means over all steps and seeds. The rollout numbers are those of the batch each algorithm trains on, "
              "after its group filter (ngrpo drops all-correct groups, dapo all-correct and all-wrong ones), so "
              "they are lower or higher than what the policy samples.", ""] + markdown_table(["algorithm"] + [label for _, label in keys], rows)
    lines += ["", "## Prompts across a run: transitions and rescue", ""]
    lines += rescue.transition_lines(results.get("rescue") or {}, markdown_table)
    lines += ["## Held-out accuracy by the base model's solve rate", ""]
    if results.get("difficulty"):
        lines += rescue.difficulty_lines(results["difficulty"], markdown_table)
    else:
        lines += ["Skipped: the base model's evaluation has no per-question results (eval/base/samples.jsonl).", ""]
    wall = results["wall_time_s"]
    lines += ["## Wall time", "", f"Total {fmt_duration(wall['total'])}; per run: "
              + ", ".join(f"{name} {fmt_duration(v)}" for name, v in wall.items() if name != "total" and v), ""]
    short = [f"{name} ({steps})" for name, steps in results.get("steps_trained", {}).items()
             if plan["max_steps"] and steps is not None and steps < plan["max_steps"]]
    if short:
        lines += [f"Stopped short of {plan['max_steps']} steps (the training data ran out): " + ", ".join(short), ""]
    if plan.get("budget") and plan["budget"][0] != "steps":
        lines += [f"Steps trained within the {budget_text(plan)}: " + ", ".join(
            f"{name} {steps}" for name, steps in results.get("steps_trained", {}).items()), ""]
    failed = [f"{name} ({e.get('error')})" for name, e in state["runs"].items() if e["status"] != "finished"]
    if failed:
        lines += ["Not finished: " + "; ".join(failed), ""]
    lines += [f"![{f}]({f})" for f in figures] + [""]
    path = out_dir / "study.md"
    path.write_text("\n".join(lines))
    return path


def write_report(study_dir, state: dict, header: str = "") -> dict:
    """Collect, draw and write; store the results in STATE (the caller saves study.json)."""
    study_dir = Path(study_dir)
    results = collect(study_dir, state)
    figures = draw(results, study_dir, state["plan"]["algos"])
    write_markdown(results, state, study_dir, figures, header)
    state["results"] = results
    return results
