"""`ngrpo study`: several algorithms x seeds, trained and evaluated alike, then compared.

    STUDY_DIR/
      study.json          the plan (what every run and evaluation uses), the state of each, the results
      study.md, *.png     the comparison (pipelines/studies/study_report.py)
      eval/base/          `ngrpo eval` of the base model
      runs/ALGO-sSEED/    ordinary `ngrpo train` run directories; their eval/ holds the final model's eval
      logs/               the console output of every train and eval process

Every run and evaluation is a child process running the ordinary CLI (`ngrpo train`, `ngrpo
eval`), so a study is exactly the runs a user would make by hand, one Ray instance at a time.
Only the algorithm's recipe and the seed differ between runs; all evaluations share one set of
settings and one sampling seed. The same command again skips what is finished, resumes an
interrupted run from its checkpoint and refuses a changed plan unless overwrite is given.

Ctrl-C (or SIGTERM) stops a study the way it stops `ngrpo train`: the child runs in a process
group of its own, so the terminal's SIGINT reaches the study only, which passes one SIGINT on
and waits (CHILD_STOP_S) while the child marks its run interrupted and shuts Ray down; a second
Ctrl-C hurries it (SIGTERM), a third kills it. A study that dies takes its child along (the
child gets SIGINT from the kernel, Linux), so no run trains on unseen.
"""
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, List, Optional, Tuple

from pipelines.launch import rundir

STUDY_FILE = "study.json"
CHILD_STOP_S = 300.0  # a child told to stop (SIGINT) marks its run interrupted and shuts Ray down in this time
CHILD_TERM_S = 60.0   # then SIGTERM (its second interrupt), then SIGKILL to its process group


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
    # --budget KIND AMOUNT: [kind, amount], kind "steps", "samples" or "tokens" (BUDGET_FLAGS); every run
    # gets the same. None: max_steps alone.
    budget: Optional[list] = None
    # --drop-checkpoints: a finished run's checkpoints/ is removed once its final model is evaluated
    # (a study of many runs of a real model would fill the disk; the final model stays)
    drop_checkpoints: bool = False

    def key(self) -> str:
        plan = dataclasses.asdict(self)
        if plan["budget"] is None:  # a study planned before budgets existed keeps its key
            del plan["budget"]
        del plan["drop_checkpoints"]  # housekeeping, not what is computed: a study may turn it on later
        return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]

    def runs(self) -> List[tuple]:
        """(name, algo, seed), seeds outside: a study stopped early has every algorithm's first seeds."""
        return [(f"{arm_dirname(algo)}-s{seed}", algo, seed) for seed in self.seeds for algo in self.algos]


# An arm is an algorithm with settings of its own: `grpo@uniform-groups=mask-aux` trains GRPO's
# recipe with `--uniform-groups mask-aux`, beside plain `grpo` in the same study.
ARM_SEP = "@"


def parse_arm(arm: str) -> Tuple[str, List[Tuple[str, str]]]:
    """'grpo@uniform-groups=mask-aux@kl-coef=0' -> ('grpo', [('uniform-groups', 'mask-aux'), ('kl-coef', '0')])."""
    algo, *settings = arm.split(ARM_SEP)
    pairs = []
    for item in settings:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise StudyError(f"arm {arm!r}: {item!r} is not SETTING=VALUE (e.g. grpo@uniform-groups=mask-aux)")
        pairs.append((name, value))
    return algo, pairs


def arm_dirname(arm: str) -> str:
    """The run folder's stem for ARM ('grpo@uniform-groups=mask-aux' -> 'grpo+uniform-groups-mask-aux')."""
    return arm.replace(ARM_SEP, "+").replace("=", "-")


BUDGET_FLAGS = {"steps": "--max-steps", "samples": "--max-samples", "tokens": "--max-generated-tokens"}


def budget_text(plan: dict) -> str:
    """What every run of PLAN (study.json's plan) may use, in words."""
    budget = plan.get("budget")
    if budget:
        kind, amount = budget
        words = {"steps": "training steps", "samples": "generated responses (dropped groups included)",
                 "tokens": "generated response tokens (dropped groups included)"}[kind]
        return f"equal budget of {amount} {words} per run"
    return f"{plan.get('max_steps') or 'all'} steps per run"


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


def train_argv(plan: StudyPlan, arm: str, seed: int, run_dir: Path) -> List[str]:
    algo, own = parse_arm(arm)
    argv = ["train", "--model", plan.model, "--data", plan.data, "--output", str(run_dir), "--algo", algo,
            "--preset", plan.preset, "--device", plan.device, "--seed", str(seed)]
    if plan.max_steps is not None:
        argv += ["--max-steps", str(plan.max_steps)]
    if plan.budget:
        kind, amount = plan.budget
        argv += [BUDGET_FLAGS[kind], str(amount)]
    # the arm's own settings after the shared ones: the later flag wins
    return argv + _flag_args(plan.recipe) + [a for name, value in own for a in (f"--{name}", value)] + \
        list(plan.train_args)


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
        """Run `ngrpo ARGV` in a child process, its console into logs/LOG_NAME; returns its exit code.
        Ctrl-C or SIGTERM while it runs: the child is stopped (stop_child), then KeyboardInterrupt."""
        logs = self.dir / "logs"
        logs.mkdir(exist_ok=True)
        with open(logs / log_name, "a") as out:
            out.write(f"\n$ ngrpo {' '.join(argv)}\n")
            out.flush()
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            with _sigterm_as_interrupt():
                child = subprocess.Popen([sys.executable, "-m", "ngrpo_cli.main", *argv], stdout=out,
                                         stderr=subprocess.STDOUT, env=env, preexec_fn=_child_setup(os.getpid()))
                try:
                    return child.wait()
                except KeyboardInterrupt:
                    stop_child(child, f"ngrpo {argv[0]} ({log_name})", self.log)
                    raise
                finally:
                    end_process_group(child.pid)

    def _evaluate(self, model: str, out_dir: Path, entry: dict, log_name: str) -> None:
        if (out_dir / "summary.json").exists() and entry.get("status") == "finished":
            return
        started = time.time()
        try:
            code = self._ngrpo(eval_argv(self.plan, model, out_dir), log_name)
        except KeyboardInterrupt:
            entry.update(status="interrupted", error="interrupted; the same command evaluates it again")
            self.save()
            raise
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
        try:
            code = self._ngrpo(argv, f"{name}.train.log")
        except KeyboardInterrupt:
            entry.update(status="interrupted", wall_time_s=round(entry.get("wall_time_s", 0) + time.time() - started, 1),
                         error="interrupted; the same command resumes it from its checkpoint",
                         run_status=rundir.read_manifest(run).get("status") if rundir.is_run_dir(run) else None)
            self.save()
            raise
        entry["wall_time_s"] = round(entry.get("wall_time_s", 0) + time.time() - started, 1)
        entry["status"] = "trained" if code == 0 else "failed"
        entry.pop("run_status", None)
        if code != 0:
            entry["error"] = f"ngrpo train exited with {code}; see logs/{name}.train.log"
        else:
            entry.pop("error", None)
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
                    if entry["status"] == "finished" and self.plan.drop_checkpoints:
                        shutil.rmtree(self.run_dir(name) / rundir.CHECKPOINTS, ignore_errors=True)
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


def _child_setup(parent_pid: int):
    """preexec_fn of a study's child: a process group of its own (the terminal's Ctrl-C reaches the
    study only), SIGINT back to its default (a study started with it ignored would pass on a Ctrl-C
    the child ignores), and on Linux SIGINT when the study dies, however it dies (prctl
    PR_SET_PDEATHSIG; the child ends as after Ctrl-C, its run interrupted: SIGTERM would not do, as
    Ray's driver takes SIGTERM over and exits, which reads as a failed run). prctl is looked up
    here, in the parent: the child only calls it."""
    prctl = None
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            prctl = ctypes.CDLL(None, use_errno=True).prctl
        except (OSError, AttributeError):
            prctl = None

    def setup():
        os.setpgid(0, 0)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if prctl is not None:
            prctl(1, int(signal.SIGINT), 0, 0, 0)  # PR_SET_PDEATHSIG
            if os.getppid() != parent_pid:  # the study died before that: do not start unseen
                os._exit(1)

    return setup


class _sigterm_as_interrupt:
    """SIGTERM to the study, while a child runs, stops it like Ctrl-C (the main thread only)."""

    def __enter__(self):
        self.installed = threading.current_thread() is threading.main_thread()
        if self.installed:
            def handler(signum, frame):
                raise KeyboardInterrupt(f"signal {signum}")

            self.previous = signal.signal(signal.SIGTERM, handler)

    def __exit__(self, *exc):
        if self.installed:
            signal.signal(signal.SIGTERM, self.previous if self.previous is not None else signal.SIG_DFL)


def stop_child(child: subprocess.Popen, what: str, log: Callable[[str], None],
               stop_s: float = CHILD_STOP_S, term_s: float = CHILD_TERM_S) -> None:
    """Stop CHILD (in a process group of its own) as Ctrl-C stops `ngrpo` in a terminal: SIGINT, and
    time to mark its run interrupted and shut Ray down; then SIGTERM; then SIGKILL to its group.
    A further Ctrl-C goes to the next step at once."""
    log(f"stopping {what}: it marks its run interrupted and shuts Ray down (Ctrl-C again to hurry it)")
    started = time.time()
    for sig, wait_s in ((signal.SIGINT, stop_s), (signal.SIGTERM, term_s), (signal.SIGKILL, 30.0)):
        if child.poll() is not None:
            break
        try:
            if sig == signal.SIGKILL:
                os.killpg(child.pid, sig)
            else:
                child.send_signal(sig)
        except OSError:
            break
        try:
            child.wait(wait_s)
            break
        except subprocess.TimeoutExpired:
            log(f"{what} did not stop in {wait_s:.0f} s after {signal.Signals(sig).name}")
        except KeyboardInterrupt:
            log(f"Ctrl-C again: {what} is sent the next signal")
    if child.poll() is None:  # a third Ctrl-C during the last wait
        with contextlib.suppress(OSError):
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    log(f"{what} stopped in {time.time() - started:.1f} s (exit {child.returncode})")


def end_process_group(pgid: int, grace_s: float = 5.0) -> None:
    """What is left of an ended child's process group (PGID, the child's pid) gets GRACE_S to end on
    its own, then SIGKILL: no Ray or vLLM process of a run outlives it (Ray's agents, orphaned by a
    killed child, lingered ~100 s). A pid is not reused while it names a group, so this reaches the
    child's own processes only."""
    deadline = time.time() + grace_s
    while True:
        try:
            os.killpg(pgid, 0)
        except OSError:  # no process left in the group
            return
        if time.time() >= deadline:
            with contextlib.suppress(OSError):
                os.killpg(pgid, signal.SIGKILL)
            return
        time.sleep(0.2)

