"""`ngrpo study`: several algorithms x seeds, trained and evaluated alike, then compared.

    STUDY_DIR/
      study.json          the plan (what every run and evaluation uses), the state of each, the results
      study.md, *.png     the comparison (pipelines/study_report.py)
      eval/base/          `ngrpo eval` of the base model
      runs/ALGO-sSEED/    ordinary `ngrpo train` run directories; their eval/ holds the final model's eval
      logs/               the console output of every train and eval process

Every run and evaluation is a child process running the ordinary CLI (`ngrpo train`, `ngrpo
eval`), so a study is exactly the runs a user would make by hand, one Ray instance at a time.
Only the algorithm's recipe and the seed differ between runs; all evaluations share one set of
settings and one sampling seed. The same command again skips what is finished, resumes an
interrupted run from its checkpoint and refuses a changed plan unless overwrite is given.
"""
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional

from pipelines import rundir

STUDY_FILE = "study.json"


class StudyError(Exception):
    """A study that cannot go on; the message says what to change."""


@dataclasses.dataclass
class StudyPlan:
    model: str
    data: str
    benchmarks: List[str]
    algos: List[str]
    seeds: List[int]
    max_steps: Optional[int] = None
    preset: str = "auto"
    device: str = "auto"
    recipe: dict = dataclasses.field(default_factory=dict)   # recipe settings shared by every run
    train_args: List[str] = dataclasses.field(default_factory=list)  # other `ngrpo train` flags, shared
    eval: dict = dataclasses.field(default_factory=dict)     # `ngrpo eval` settings, shared
    # sha256 of every input *file* (data, benchmark files, --eval-data, --reward-file): the same
    # path with other contents is another study, not one to continue.
    input_files: dict = dataclasses.field(default_factory=dict)

    def key(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    def runs(self) -> List[tuple]:
        """(name, algo, seed), seeds outside: a study stopped early has every algorithm's first seeds."""
        return [(f"{algo}-s{seed}", algo, seed) for seed in self.seeds for algo in self.algos]


def fingerprint_files(paths) -> dict:
    """{path: sha256 prefix} of the PATHS that are files (a benchmark name or Hub id is skipped)."""
    from pipelines.models import file_sha256

    return {os.path.abspath(p): file_sha256(p)[:16] for p in paths if p and os.path.isfile(p)}


def _flag_args(settings: dict) -> List[str]:
    out = []
    for name, value in settings.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(value, (list, tuple)):
            out += [flag, *map(str, value)]
        elif value is not None:
            out += [flag, str(value)]
    return out


def train_argv(plan: StudyPlan, algo: str, seed: int, run_dir: Path) -> List[str]:
    argv = ["train", "--model", plan.model, "--data", plan.data, "--output", str(run_dir), "--algo", algo,
            "--preset", plan.preset, "--device", plan.device, "--seed", str(seed)]
    if plan.max_steps is not None:
        argv += ["--max-steps", str(plan.max_steps)]
    return argv + _flag_args(plan.recipe) + list(plan.train_args)


def eval_argv(plan: StudyPlan, model: str, out_dir: Path) -> List[str]:
    return ["eval", "--model", model, "--benchmarks", ",".join(plan.benchmarks), "-o", str(out_dir)] + \
        _flag_args(plan.eval)


class Study:
    def __init__(self, study_dir, plan: StudyPlan, overwrite: bool = False,
                 log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr)):
        self.dir = Path(study_dir).resolve()
        self.plan, self.log = plan, log
        self.state = self._open(overwrite)

    # --------------------------------------------------------------------- state (study.json)
    def _open(self, overwrite: bool) -> dict:
        path = self.dir / STUDY_FILE
        if path.exists():
            try:
                state = json.loads(path.read_text())
            except ValueError as err:
                raise StudyError(f"{path} is not readable JSON ({err}); remove it or pass --overwrite") from None
            if state.get("plan_key") == self.plan.key():
                return state
            if not overwrite:
                old = state.get("plan", {})
                changed = [k for k, v in dataclasses.asdict(self.plan).items() if old.get(k) != v]
                raise StudyError(f"{self.dir} holds a study with other settings ({', '.join(changed)} changed); "
                                 "run the same command to continue it, or pass --overwrite to start it again")
            for sub in ("runs", "eval", "logs"):
                shutil.rmtree(self.dir / sub, ignore_errors=True)
        self.dir.mkdir(parents=True, exist_ok=True)
        state = {"plan": dataclasses.asdict(self.plan), "plan_key": self.plan.key(), "created": time.time(),
                 "runs": {name: {"algo": algo, "seed": seed, "status": "pending"}
                          for name, algo, seed in self.plan.runs()},
                 "base_eval": {"status": "pending"}}
        self.save(state)
        return state

    def save(self, state=None) -> None:
        path = self.dir / STUDY_FILE
        tmp = path.with_name(f".{STUDY_FILE}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(state or self.state, indent=2))
        os.replace(tmp, path)

    def run_dir(self, name: str) -> Path:
        return self.dir / "runs" / name

    # --------------------------------------------------------------------- child processes
    def _ngrpo(self, argv: List[str], log_name: str) -> int:
        """Run `ngrpo ARGV` in a child process, its console into logs/LOG_NAME; returns its exit code."""
        logs = self.dir / "logs"
        logs.mkdir(exist_ok=True)
        with open(logs / log_name, "a") as out:
            out.write(f"\n$ ngrpo {' '.join(argv)}\n")
            out.flush()
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            return subprocess.run([sys.executable, "-m", "ngrpo_cli.main", *argv], stdout=out,
                                  stderr=subprocess.STDOUT, env=env).returncode

    def _evaluate(self, model: str, out_dir: Path, entry: dict, log_name: str) -> None:
        if (out_dir / "summary.json").exists() and entry.get("status") == "finished":
            return
        started = time.time()
        code = self._ngrpo(eval_argv(self.plan, model, out_dir), log_name)
        entry.update(status="finished" if code == 0 else "failed", wall_time_s=round(time.time() - started, 1))
        if code != 0:
            entry["error"] = f"ngrpo eval exited with {code}; see logs/{log_name}"
        self.save()

    def _train(self, name: str, algo: str, seed: int, entry: dict) -> None:
        run = self.run_dir(name)
        manifest = rundir.read_manifest(run) if rundir.is_run_dir(run) else None
        if manifest and manifest.get("status") == "finished" and (run / rundir.FINAL_MODEL / "config.json").exists():
            return
        started = time.time()
        if manifest:  # interrupted or failed: continue from its last checkpoint
            self.log(f"resuming {name} from its checkpoint")
            argv = ["train", "--resume", str(run)]
        else:
            shutil.rmtree(run, ignore_errors=True)  # a folder without a manifest holds nothing to keep
            argv = train_argv(self.plan, algo, seed, run)
        code = self._ngrpo(argv, f"{name}.train.log")
        entry["wall_time_s"] = round(entry.get("wall_time_s", 0) + time.time() - started, 1)
        entry["status"] = "trained" if code == 0 else "failed"
        if code != 0:
            entry["error"] = f"ngrpo train exited with {code}; see logs/{name}.train.log"
        self.save()

    # --------------------------------------------------------------------- the study
    def execute(self, progress: bool = True) -> dict:
        """Evaluate the base model, then train and evaluate every run that is not finished."""
        from tqdm.auto import tqdm

        todo = [(name, algo, seed) for name, algo, seed in self.plan.runs()
                if self.state["runs"][name]["status"] != "finished"]
        bar = tqdm(total=len(self.plan.runs()), initial=len(self.plan.runs()) - len(todo), desc="study", unit="run",
                   disable=not progress, file=sys.stderr, dynamic_ncols=True)
        try:
            bar.set_postfix_str("evaluating the base model")
            self._evaluate(self.plan.model, self.dir / "eval" / "base", self.state["base_eval"], "base.eval.log")
            if self.state["base_eval"]["status"] != "finished":
                raise StudyError(f"the base model's evaluation failed: {self.state['base_eval']['error']}")
            for name, algo, seed in todo:
                entry = self.state["runs"][name]
                bar.set_postfix_str(f"{name}: training")
                self._train(name, algo, seed, entry)
                if entry["status"] == "trained":
                    bar.set_postfix_str(f"{name}: evaluating")
                    eval_entry = entry.setdefault("eval", {})
                    self._evaluate(str(self.run_dir(name)), self.run_dir(name) / rundir.EVAL_DIR, eval_entry,
                                   f"{name}.eval.log")
                    entry["status"] = "finished" if eval_entry["status"] == "finished" else "failed"
                    entry.setdefault("error", eval_entry.get("error"))
                    self.save()
                bar.update(1)
                bar.write(self._run_line(name, entry), file=sys.stderr)
        finally:
            bar.close()
        return self.state

    def _run_line(self, name: str, entry: dict) -> str:
        if entry["status"] != "finished":
            return f"{name}: {entry['status']} ({entry.get('error')})"
        summary = json.loads((self.run_dir(name) / rundir.EVAL_DIR / "summary.json").read_text())
        n = summary["settings"]["n"]
        scores = ", ".join(f"{b} avg@{n} {100 * m[f'avg@{n}']:.1f}%" for b, m in summary["benchmarks"].items())
        return f"{name}: finished in {entry['wall_time_s'] / 60:.1f} min; {scores}"

    @property
    def failed(self) -> List[str]:
        return [name for name, e in self.state["runs"].items() if e["status"] == "failed"]
