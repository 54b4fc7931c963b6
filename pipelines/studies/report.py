"""`ngrpo report`: plots and a markdown table comparing the training logs of one or more runs.

Reads each run's ``metrics.jsonl`` (one JSON object per training step), and when present its
``eval_metrics.jsonl`` (OpenRLHF's in-training evaluation: ``eval_<dataset>_pass1`` ...) and
``eval/summary.json`` (``ngrpo eval``: one dict of scores per benchmark). Draws PNG figures with
matplotlib's Agg canvas (no pyplot, no display), every run overlaid in every panel with one colour
per run and a legend "algo: run"; a run without a metric is simply not drawn in that panel, and a
panel (figure) no run has data for is left out. Writes ``report.md`` (tables + the figures by
relative path) and ``report.json`` (the same numbers and, per panel, the metric keys drawn and the
legend texts read back from the drawn axes).
"""
import dataclasses
import datetime
import json
import math
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from pipelines.launch import rundir

EVAL_SUMMARY = Path(rundir.EVAL_DIR) / "summary.json"


class ReportError(Exception):
    """A run that cannot be reported; the message names the file that is wrong."""


@dataclasses.dataclass(frozen=True)
class Panel:
    title: str
    keys: Tuple[str, ...]  # the first key a run has is drawn (newer / preferred names first)
    ylabel: str = ""


@dataclasses.dataclass(frozen=True)
class Figure:
    name: str  # the PNG's file name without .png
    title: str
    panels: Tuple[Panel, ...]


FIGURES = (
    Figure("reward_accuracy", "Reward and accuracy", (
        Panel("Mean reward", ("rollout/reward_mean", "reward"), "reward"),
        Panel("Accuracy (share of correct responses)", ("ngrpo/accuracy",), "accuracy"))),
    Figure("group_outcomes", "Share of groups by outcome", (
        Panel("All-wrong groups", ("ngrpo/frac_all_wrong",), "share"),
        Panel("All-correct groups", ("ngrpo/frac_all_correct",), "share"),
        Panel("Mixed groups", ("ngrpo/frac_mixed",), "share"))),
    Figure("response_length", "Response length", (
        Panel("Mean response length", ("rollout/response_length_mean", "response_length"), "tokens"),)),
    Figure("entropy", "Policy entropy", (
        Panel("Entropy", ("entropy_loss", "entropy"), "nats/token"),)),
    Figure("clip_fractions", "Clipped tokens", (
        Panel("Clipped at the lower bound (ratio < 1 - eps_low, A < 0)", ("clip_frac_low",), "share"),
        Panel("Clipped at the upper bound (ratio > 1 + eps_high, A > 0)", ("clip_frac_high",), "share"),
        Panel("Clipped, both bounds", ("ppo_clip_ratio",), "share"))),
    Figure("kl", "KL divergence", (
        Panel("KL to the reference policy", ("kl",), "KL"),)),
)

# The comparison table: (column label, metric keys, which value is best: "max", "min" or None).
MAIN_METRICS = (
    ("Reward", ("rollout/reward_mean", "reward"), "max"),
    ("Accuracy", ("ngrpo/accuracy",), "max"),
    ("All-wrong", ("ngrpo/frac_all_wrong",), "min"),
    ("All-correct", ("ngrpo/frac_all_correct",), None),
    ("Response length", ("rollout/response_length_mean", "response_length"), None),
    ("Entropy", ("entropy_loss", "entropy"), None),
    ("KL", ("kl",), None),
)

PASS1_RE = re.compile(r"^eval_(.+)_pass1$")
# The same panels against the responses generated (dropped groups included): equal generation cost.
SAMPLES_KEY = "ngrpo/generated_samples"
BY_SAMPLES = Figure("by_generated_samples", "By generated responses (dropped groups included)", (
    Panel("Mean reward", ("rollout/reward_mean", "reward"), "reward"),
    Panel("Accuracy (share of correct responses)", ("ngrpo/accuracy",), "accuracy"),
    Panel("All-wrong groups", ("ngrpo/frac_all_wrong",), "share")))


def budget_of(manifest: dict) -> str:
    """The run's training budget in words: --max-steps, --max-samples, --max-generated-tokens."""
    parts = [f"{manifest[k]} {label}" for k, label in (("max_steps", "steps"), ("max_samples", "generated responses"),
                                                         ("max_generated_tokens", "generated tokens"))
             if manifest.get(k) is not None]
    return ", ".join(parts) or "the whole schedule"


def fmt(value) -> str:
    """How report.md writes a number: 6 significant digits; '–' for none."""
    if value is None:
        return "–"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.6g}"


def fmt_duration(seconds) -> str:
    """h:mm:ss, as report.md writes wall times."""
    if seconds is None:
        return "–"
    return str(datetime.timedelta(seconds=round(seconds)))


# ---------------------------------------------------------------------------------------------
# Reading runs
# ---------------------------------------------------------------------------------------------
def _number(value) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def read_eval_summary(run_dir) -> Optional[Dict[str, Dict[str, float]]]:
    """RUN_DIR/eval/summary.json as {benchmark: {metric: number}}, or None when there is none.

    The schema is read loosely: a dict of per-benchmark dicts (optionally under "benchmarks"), or a
    list of dicts naming their benchmark ("benchmark"/"name"); non-numeric fields are dropped, and
    nested {"pass@k": {"1": x}} style dicts are flattened to "pass@k/1"."""
    path = Path(run_dir) / EVAL_SUMMARY
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError as err:
        raise ReportError(f"{path} is not valid JSON: {err}")
    if isinstance(data, dict) and isinstance(data.get("benchmarks"), (dict, list)):
        data = data["benchmarks"]
    if isinstance(data, list):
        data = {str(d.get("benchmark") or d.get("name") or i): d for i, d in enumerate(data) if isinstance(d, dict)}
    if not isinstance(data, dict):
        return None
    summary = {}
    for bench, scores in data.items():
        if not isinstance(scores, dict):
            continue
        flat = {}
        for key, value in scores.items():
            if isinstance(value, dict):
                for sub, v in value.items():
                    if _number(v) is not None:
                        flat[f"{key}/{sub}"] = _number(v)
            elif _number(value) is not None:
                flat[str(key)] = _number(value)
        if flat:
            summary[str(bench)] = flat
    return summary or None


def pass1_metric(scores: Dict[str, float]) -> Optional[str]:
    """The pass@1-like score of a benchmark's summary: pass@1, else avg@n (the mean pass@1 over n)."""
    for key in scores:
        if key.lower().replace(" ", "") in ("pass@1", "pass1", "pass@k/1"):
            return key
    for key in scores:
        if key.lower().startswith("avg@"):
            return key
    return None


@dataclasses.dataclass
class RunData:
    path: Path
    name: str
    manifest: dict
    rows: List[dict]
    eval_rows: List[dict]
    eval_summary: Optional[dict]
    label: str = ""

    @property
    def algo(self) -> str:
        return str(self.manifest.get("algo") or "?")

    def series(self, keys: Sequence[str]):
        """(key, steps, values) of the first of KEYS this run logged, else None."""
        for key in keys:
            points = [(r["step"], _number(r.get(key))) for r in self.rows]
            points = [(s, v) for s, v in points if v is not None]
            if points:
                return key, [s for s, _ in points], [v for _, v in points]
        return None

    def eval_series(self) -> Dict[str, Tuple[List[int], List[float]]]:
        out = {}
        for row in self.eval_rows:
            for key, value in row.items():
                m = PASS1_RE.match(key)
                if m and _number(value) is not None:
                    steps, values = out.setdefault(m.group(1), ([], []))
                    steps.append(row["step"])
                    values.append(_number(value))
        return out

    @property
    def steps(self) -> int:
        return max(r["step"] for r in self.rows)

    @property
    def wall_time(self) -> Optional[float]:
        """Seconds from the manifest's start to its finish (or to the last logged step)."""
        started, finished = _number(self.manifest.get("started")), _number(self.manifest.get("finished"))
        if started is not None and finished is not None:
            return finished - started
        last = _number(self.rows[-1].get("time"))
        if started is not None and last is not None:
            return last - started
        first = _number(self.rows[0].get("time"))
        return last - first if first is not None and last is not None else None


def load_run(run_dir, log=lambda msg: None) -> RunData:
    """A run's manifest and logs (rundir's readers: a damaged line is skipped and reported by LOG)."""
    path = Path(run_dir).expanduser().resolve()
    if not path.is_dir():
        raise ReportError(f"{path} is not a run directory (not a folder)")
    try:
        manifest = rundir.read_manifest(path)
    except rundir.RunDirError as err:
        raise ReportError(str(err)) from None
    metrics_path = path / rundir.METRICS
    if not metrics_path.exists():
        raise ReportError(f"{metrics_path} is missing: the run has not logged a training step")
    logs = {name: rundir.read_step_log(path / name) for name in (rundir.METRICS, rundir.EVAL_METRICS)}
    for name, read in logs.items():
        if read.bad_lines:
            log(f"warning: {read.describe_bad(path / name)}")
    if not logs[rundir.METRICS].rows:
        raise ReportError(f"{metrics_path} is empty: the run has not logged a training step")
    return RunData(path=path, name=path.name, manifest=manifest, rows=logs[rundir.METRICS].rows,
                   eval_rows=logs[rundir.EVAL_METRICS].rows, eval_summary=read_eval_summary(path))


def _label_runs(runs: List[RunData]) -> None:
    """'algo: name', with enough parent folders in the name to tell runs apart."""
    depth = 1
    while True:
        names = ["/".join(r.path.parts[-depth:]) for r in runs]
        if len(set(names)) == len(names) or depth >= max(len(r.path.parts) for r in runs):
            break
        depth += 1
    for run, name in zip(runs, names):
        run.name = name
    labels = [f"{r.algo}: {r.name}" for r in runs]
    for i, run in enumerate(runs):
        run.label = labels[i] if labels.count(labels[i]) == 1 else f"{labels[i]} [{i + 1}]"


# ---------------------------------------------------------------------------------------------
# Summaries
# ---------------------------------------------------------------------------------------------
def summarize(run: RunData) -> dict:
    """Final and best values of MAIN_METRICS, steps, wall time: what the table shows, unformatted."""
    final, best, best_step, keys = {}, {}, {}, {}
    for label, metric_keys, mode in MAIN_METRICS:
        found = run.series(metric_keys)
        if not found:
            continue
        key, steps, values = found
        keys[label] = key
        final[label] = values[-1]
        if mode:
            pick = max if mode == "max" else min
            i = values.index(pick(values))
            best[label], best_step[label] = values[i], steps[i]
    evals = {}
    for bench, scores in (run.eval_summary or {}).items():
        metric = pass1_metric(scores)
        if metric:
            evals[bench] = {"metric": metric, "value": scores[metric]}
    generated = run.series((SAMPLES_KEY,))
    tokens = run.series(("ngrpo/generated_tokens",))
    return {"name": run.name, "label": run.label, "path": str(run.path), "algo": run.algo,
            "budget": budget_of(run.manifest), "generated_samples": generated[2][-1] if generated else None,
            "generated_tokens": tokens[2][-1] if tokens else None,
            "preset": run.manifest.get("preset"), "model": run.manifest.get("model"),
            "status": run.manifest.get("status"), "steps": run.steps, "wall_time_s": run.wall_time,
            "keys": keys, "final": final, "best": best, "best_step": best_step, "eval": evals}


def _differing_settings(runs: List[RunData]) -> List[Tuple[str, List]]:
    recipes = [run.manifest.get("recipe") or {} for run in runs]
    names = []
    for recipe in recipes:
        names += [k for k in recipe if k not in names]
    rows = []
    for name in names:
        values = [recipe.get(name) for recipe in recipes]
        if len(runs) == 1 or any(json.dumps(v) != json.dumps(values[0]) for v in values):
            rows.append((name, values))
    return rows


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------
def new_figure(n_panels: int, title: str):
    from matplotlib.figure import Figure as MplFigure

    cols = min(n_panels, 3)
    rows = math.ceil(n_panels / cols)
    fig = MplFigure(figsize=(5.2 * cols, 3.8 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig, axes[:n_panels]


def _smooth(values: List[float], window: int) -> List[float]:
    if window <= 1:
        return values
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1): i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def _draw_line(ax, steps, values, color, label, smooth):
    marker = "o" if len(steps) <= 40 else None
    if smooth > 1:
        ax.plot(steps, values, color=color, alpha=0.25, linewidth=1)
        ax.plot(steps, _smooth(values, smooth), color=color, label=label, linewidth=1.8)
    else:
        ax.plot(steps, values, color=color, label=label, marker=marker, markersize=3, linewidth=1.6)


def finish_axes(ax, title, ylabel, xlabel="step"):
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    if xlabel == "step":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return [t.get_text() for t in ax.get_legend().get_texts()]


def palette(n):
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def draw_figures(runs: List[RunData], out_dir: Path, smooth: int = 1) -> Dict[str, dict]:
    """Write the PNGs; returns {figure name: {"file", "title", "panels": [{"title", "series", "legend"}]}}."""
    colors = palette(len(runs))
    drawn = {}
    for spec in FIGURES:
        panels = []
        for panel in spec.panels:
            series = [(run, color, run.series(panel.keys)) for run, color in zip(runs, colors)]
            series = [(run, color, s) for run, color, s in series if s]
            if series:
                panels.append((panel, series))
        if not panels:
            continue
        fig, axes = new_figure(len(panels), spec.title)
        meta = []
        for ax, (panel, series) in zip(axes, panels):
            for run, color, (key, steps, values) in series:
                _draw_line(ax, steps, values, color, run.label, smooth)
            legend = finish_axes(ax, panel.title, panel.ylabel)
            meta.append({"title": panel.title, "legend": legend,
                         "series": {run.label: {"key": key, "steps": steps, "values": values}
                                    for run, _, (key, steps, values) in series}})
        drawn[spec.name] = save_figure(fig, out_dir, spec.name, spec.title, meta)

    by_samples = _draw_by_samples(runs, colors, out_dir)
    if by_samples:
        drawn[BY_SAMPLES.name] = by_samples
    # Evaluation during training (eval_metrics.jsonl): pass@1 per dataset over steps.
    per_bench = {}
    for run, color in zip(runs, colors):
        for bench, (steps, values) in run.eval_series().items():
            per_bench.setdefault(bench, []).append((run, color, steps, values))
    if per_bench:
        fig, axes = new_figure(len(per_bench), "Evaluation pass@1 during training")
        meta = []
        for ax, (bench, series) in zip(axes, per_bench.items()):
            for run, color, steps, values in series:
                _draw_line(ax, steps, values, color, run.label, 1)
            legend = finish_axes(ax, bench, "pass@1")
            meta.append({"title": bench, "legend": legend,
                         "series": {run.label: {"key": f"eval_{bench}_pass1", "steps": steps, "values": values}
                                    for run, _, steps, values in series}})
        drawn["eval_pass1"] = save_figure(fig, out_dir, "eval_pass1", "Evaluation pass@1 during training", meta)

    # Final evaluation (eval/summary.json): grouped bars, one group per benchmark.
    benches = []
    for run in runs:
        for bench, scores in (run.eval_summary or {}).items():
            if pass1_metric(scores) and bench not in benches:
                benches.append(bench)
    if benches:
        fig, (ax,) = new_figure(1, "Evaluation (ngrpo eval)")
        with_eval = [(run, color) for run, color in zip(runs, colors) if run.eval_summary]
        width = 0.8 / max(len(with_eval), 1)
        series = {}
        for i, (run, color) in enumerate(with_eval):
            xs, ys = [], []
            for j, bench in enumerate(benches):
                scores = run.eval_summary.get(bench) or {}
                metric = pass1_metric(scores)
                if metric:
                    xs.append(j + (i - (len(with_eval) - 1) / 2) * width)
                    ys.append(scores[metric])
            ax.bar(xs, ys, width=width, color=color, label=run.label)
            series[run.label] = {"benchmarks": [b for b in benches if pass1_metric(run.eval_summary.get(b) or {})],
                                 "values": ys}
        ax.set_xticks(range(len(benches)), benches, rotation=20)
        legend = finish_axes(ax, "pass@1 (avg@n where there is no pass@1)", "pass@1", xlabel="benchmark")
        drawn["eval_summary"] = save_figure(fig, out_dir, "eval_summary", "Evaluation (ngrpo eval)",
                                      [{"title": "pass@1", "legend": legend, "series": series}])
    return drawn


def _draw_by_samples(runs: List[RunData], colors, out_dir: Path) -> Optional[dict]:
    """BY_SAMPLES: each run's metrics at the cumulative responses generated by its step."""
    panels = []
    for panel in BY_SAMPLES.panels:
        series = []
        for run, color in zip(runs, colors):
            x, y = run.series((SAMPLES_KEY,)), run.series(panel.keys)
            if x and y:
                at = dict(zip(x[1], x[2]))
                points = [(at[s], v) for s, v in zip(y[1], y[2]) if s in at]
                if points:
                    series.append((run, color, y[0], [p[0] for p in points], [p[1] for p in points]))
        if series:
            panels.append((panel, series))
    if not panels:
        return None
    fig, axes = new_figure(len(panels), BY_SAMPLES.title)
    meta = []
    for ax, (panel, series) in zip(axes, panels):
        for run, color, _, xs, ys in series:
            ax.plot(xs, ys, color=color, label=run.label, marker="o" if len(xs) <= 40 else None, markersize=3)
        legend = finish_axes(ax, panel.title, panel.ylabel, xlabel="generated responses")
        meta.append({"title": panel.title, "legend": legend, "x": SAMPLES_KEY,
                     "series": {run.label: {"key": key, "samples": xs, "values": ys} for run, _, key, xs, ys in series}})
    return save_figure(fig, out_dir, BY_SAMPLES.name, BY_SAMPLES.title, meta)


def save_figure(fig, out_dir: Path, name: str, title: str, panels: list) -> dict:
    file = f"{name}.png"
    fig.savefig(out_dir / file, dpi=110)
    return {"file": file, "title": title, "panels": panels}


# ---------------------------------------------------------------------------------------------
# report.md
# ---------------------------------------------------------------------------------------------
def markdown_table(header: List[str], rows: List[List[str]]) -> List[str]:
    esc = lambda cell: str(cell).replace("|", "\\|")
    return ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]


def metrics_table(summaries: List[dict]) -> Tuple[List[str], List[List[str]]]:
    header = ["Run", "Algorithm", "Steps", "Wall time"]
    for label, _, mode in MAIN_METRICS:
        header += [f"{label} final", f"{label} best"] if mode else [f"{label} final"]
    rows = []
    for s in summaries:
        row = [s["label"], s["algo"], str(s["steps"]), fmt_duration(s["wall_time_s"])]
        for label, _, mode in MAIN_METRICS:
            row.append(fmt(s["final"].get(label)))
            if mode:
                row.append(fmt(s["best"].get(label)))
        rows.append(row)
    return header, rows


def _prompt_sections(runs: List[RunData]) -> List[str]:
    """Transitions and rescue per algorithm (groups.jsonl), and held-out accuracy by the base model's
    solve rate where the runs sit in a study (its eval/base/samples.jsonl)."""
    from pipelines.studies import rescue

    by_algo: Dict[str, List[Path]] = {}
    for run in runs:
        by_algo.setdefault(run.algo, []).append(run.path)
    lines = ["", "## Prompts across a run: transitions and rescue", ""]
    lines += rescue.transition_lines(rescue.per_algorithm(by_algo), markdown_table)
    lines += ["## Held-out accuracy by the base model's solve rate", ""]
    studies = {run.path.parent.parent for run in runs if run.path.parent.name == "runs"}
    base = rescue.base_samples(next(iter(studies)) / "eval" / "base" / "samples.jsonl") if len(studies) == 1 else None
    tables = {}
    if base is not None:
        tables["base model"] = rescue.accuracy_by_difficulty(base, base)
        for algo, dirs in by_algo.items():
            per_run = [rows for rows in (rescue.read_rows(d / rundir.EVAL_DIR / "samples.jsonl") for d in dirs) if rows]
            if per_run:
                tables[algo] = rescue.pooled_difficulty([rescue.accuracy_by_difficulty(base, r) for r in per_run])
    if len(tables) > 1:
        return lines + rescue.difficulty_lines(tables, markdown_table)
    return lines + ["Skipped: it needs the base model's per-question eval results (a study's eval/base/samples.jsonl, "
                    "found when every run is in one study's runs/ folder) and the runs' own `ngrpo eval` samples.", ""]


def write_markdown(runs: List[RunData], summaries: List[dict], figures: Dict[str, dict], out_dir: Path,
                   smooth: int = 1) -> Path:
    lines = ["# Training report", "",
             f"{len(runs)} run(s), generated {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} by `ngrpo report`.",
             "", "## Runs", ""]
    lines += markdown_table(["Run", "Algorithm", "Preset", "Base model", "Status", "Steps", "Wall time", "Path"],
                    [[s["label"], s["algo"], s["preset"] or "–", f"`{s['model']}`" if s["model"] else "–",
                      s["status"] or "–", str(s["steps"]), fmt_duration(s["wall_time_s"]), f"`{s['path']}`"]
                     for s in summaries])
    lines += ["", "Budget: the limit each run trained under, and what it generated (responses and response tokens, "
              "groups the filter dropped included; `ngrpo/generated_*` in metrics.jsonl).", ""]
    lines += markdown_table(["Run", "Budget", "Generated responses", "Generated tokens"],
                            [[s["label"], s["budget"], fmt(s["generated_samples"]), fmt(s["generated_tokens"])]
                             for s in summaries])
    lines += _prompt_sections(runs)
    lines += ["", "## Metrics", "",
              "Final = the value at the last logged step; best = the highest (reward, accuracy) or lowest "
              "(all-wrong share) value over the run. Numbers from `metrics.jsonl`, 6 significant digits.", ""]
    lines += markdown_table(*metrics_table(summaries))

    evals = [s for s in summaries if s["eval"]]
    if evals:
        benches = []
        for s in evals:
            benches += [b for b in s["eval"] if b not in benches]
        lines += ["", "## Evaluation", "", "pass@1 from `ngrpo eval` (`eval/summary.json`; avg@n where no pass@1).", ""]
        lines += markdown_table(["Run"] + benches, [[s["label"]] + [fmt(s["eval"][b]["value"]) if b in s["eval"] else "–"
                                                           for b in benches] for s in evals])

    settings = _differing_settings(runs)
    if settings:
        lines += ["", "## Settings" + (" that differ" if len(runs) > 1 else ""), ""]
        lines += markdown_table(["Setting"] + [s["label"] for s in summaries],
                        [[name] + ["–" if v is None else json.dumps(v) if isinstance(v, (list, dict)) else str(v)
                                   for v in values] for name, values in settings])

    lines += ["", "## Figures", ""]
    if smooth > 1:
        lines += [f"Lines are moving averages over {smooth} steps; the raw values are drawn faintly.", ""]
    for name, fig in figures.items():
        lines += [f"### {fig['title']}", "", f"![{fig['title']}]({fig['file']})", ""]
    if not figures:
        lines += ["No plottable metrics were logged.", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path


def build_report(run_dirs: Sequence, out_dir, smooth: int = 1, log=lambda msg: None) -> dict:
    """Read RUN_DIRS, write the PNGs, report.md and report.json into OUT_DIR; returns report.json's data."""
    if not run_dirs:
        raise ReportError("no run directory given")
    if smooth < 1:
        raise ReportError("--smooth must be at least 1")
    runs = [load_run(d, log) for d in run_dirs]
    seen = set()
    for run in runs:
        if run.path in seen:
            raise ReportError(f"{run.path} is given twice")
        seen.add(run.path)
    _label_runs(runs)
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise ReportError(f"{out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    summaries = [summarize(run) for run in runs]
    figures = draw_figures(runs, out, smooth)
    report_md = write_markdown(runs, summaries, figures, out, smooth)
    data = {"out_dir": str(out), "report": str(report_md), "runs": summaries, "figures": figures}
    (out / "report.json").write_text(json.dumps(data, indent=2) + "\n")
    return data
