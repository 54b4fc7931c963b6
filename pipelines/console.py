"""What a training launch prints: ngrpo's own progress on the terminal, everything else in a log.

Ray, vLLM, DeepSpeed and OpenRLHF print thousands of lines (Ray forwards every worker's output to
the driver). While a launch runs, the process's file descriptors 1 and 2 point at
RUN_DIR/logs/launch-N.log, so every one of those lines, from any library or worker, lands there
even if the process is killed. The terminal keeps ngrpo's own output: a progress bar over the
training steps with an ETA, one line per step (reward, accuracy, all-wrong groups, loss), and,
when a launch fails, the caller shows the error and the end of the log (log_tail). `verbose`
also copies the log to the terminal live.
"""
import contextlib
import os
import sys
import threading
from pathlib import Path
from typing import Optional

from pipelines.launch import rundir

ERROR_TAIL_LINES = 40  # lines of the log shown when a launch fails
POLL_SECONDS = 0.5     # how often the progress thread looks at progress.json and metrics.jsonl


def next_log_path(run_dir, kind: str = "launch") -> Path:
    """The next RUN_DIR/logs/KIND-N.log (a training launch's, or an eval's in its output folder)."""
    logs = Path(run_dir) / rundir.LOGS
    logs.mkdir(parents=True, exist_ok=True)
    n = 1 + max((int(p.stem.split("-")[-1]) for p in logs.glob(f"{kind}-*.log") if p.stem.split("-")[-1].isdigit()),
                default=0)
    return logs / f"{kind}-{n}.log"


def step_line(step: int, metrics: dict) -> str:
    def get(*keys):
        for k in keys:
            if isinstance(metrics.get(k), (int, float)):
                return metrics[k]
        return float("nan")

    return (f"step {step}: reward {get('rollout/reward_mean', 'reward'):.3f}  accuracy {get('ngrpo/accuracy'):.3f}  "
            f"all-wrong groups {get('ngrpo/frac_all_wrong'):.2f}  entropy {get('entropy_loss'):.3f}  "
            f"policy loss {get('policy_loss'):.4f}  ({get('timing/step_total'):.1f} s)")


class _Progress(threading.Thread):
    """Follows progress.json and metrics.jsonl and draws the bar on the real terminal."""

    def __init__(self, run_dir: Path, terminal, total: Optional[int], start_step: int):
        super().__init__(daemon=True)
        self.run_dir, self.terminal, self.total, self.start_step = run_dir, terminal, total, start_step
        self.stop_event = threading.Event()

    def run(self):
        from tqdm.auto import tqdm

        bar = tqdm(total=self.total, initial=self.start_step, desc="training", unit="step", file=self.terminal,
                   dynamic_ncols=True, leave=True, mininterval=0)
        shown = self.start_step
        printed = set()
        while True:
            stopping = self.stop_event.wait(POLL_SECONDS)
            done = rundir.completed_steps(self.run_dir)
            if done > shown:
                bar.update(done - shown)
                shown = done
            for row in rundir.read_step_log(self.run_dir / rundir.METRICS).rows:
                if row["step"] > self.start_step and row["step"] not in printed:
                    printed.add(row["step"])
                    bar.write(step_line(row["step"], row), file=self.terminal)
            if stopping:
                break
        bar.close()


class _Tail(threading.Thread):
    """Copies the log file to the terminal as it grows (verbose mode)."""

    def __init__(self, path: Path, terminal):
        super().__init__(daemon=True)
        self.path, self.terminal = path, terminal
        self.stop_event = threading.Event()

    def run(self):
        with open(self.path, "rb") as f:
            while True:
                stopping = self.stop_event.wait(POLL_SECONDS)
                chunk = f.read()
                if chunk:
                    self.terminal.buffer.write(chunk)
                    self.terminal.flush()
                if stopping:
                    break


@contextlib.contextmanager
def launch_console(run_dir, *, total_steps: Optional[int], start_step: int = 0, verbose: bool = False):
    """Redirect this process's stdout/stderr to a new RUN_DIR/logs/launch-N.log for the block,
    and show ngrpo's progress on the terminal meanwhile. Yields the log's path."""
    run_dir = Path(run_dir)
    log_path = next_log_path(run_dir)
    with output_to_log(log_path, verbose=verbose) as terminal:
        progress = _Progress(run_dir, terminal, total_steps, start_step)
        progress.start()
        try:
            yield log_path
        finally:
            progress.stop_event.set()
            progress.join(timeout=5)


@contextlib.contextmanager
def output_to_log(log_path: Path, verbose: bool = False):
    """For the block, file descriptors 1 and 2 of this process (and of every child it starts) write
    to LOG_PATH; yields a text stream onto the real terminal (stderr) for ngrpo's own lines.
    VERBOSE also copies the log to the terminal live."""
    sys.stdout.flush()
    sys.stderr.flush()
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    try:
        sys.stderr.fileno()
        terminal = os.fdopen(os.dup(saved[2]), "w", buffering=1, encoding="utf-8", errors="replace")
        own_terminal = True
    except (AttributeError, OSError, ValueError):  # a stream of Python's own (click's CliRunner): write to it
        terminal, own_terminal = sys.stderr, False
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    for fd in (1, 2):
        os.dup2(log_fd, fd)
    os.close(log_fd)
    tail = _Tail(Path(log_path), terminal) if verbose else None
    if tail:
        tail.start()
    try:
        yield terminal
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError):  # a full disk: the log takes no more, the terminal must come back
                stream.flush()
        if tail:
            tail.stop_event.set()
            tail.join(timeout=5)
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        if own_terminal:
            terminal.close()


def log_tail(log_path, lines: int = ERROR_TAIL_LINES) -> str:
    tail = Path(log_path).read_text(errors="replace").splitlines()[-lines:]
    return "\n".join([f"--- last {len(tail)} lines of {log_path} ---", *tail, "---"])

