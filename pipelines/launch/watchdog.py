"""The stall watchdog of `ngrpo train --stall-timeout SECONDS`: a run that stops moving is stopped.

A hung rollout engine (a stopped process, a deadlocked collective, a GPU that no longer answers)
used to leave `ngrpo train` waiting forever without a word. The watchdog is a thread of the
driver that looks at what a moving run writes into its directory:

  * heartbeat.json, which the patch rewrites at each stage of a step and with each response,
    training micro-batch and weight sync (openrlhf_patch/heartbeat.py `heartbeat`; it names the stage);
  * progress.json, metrics.jsonl and eval_metrics.jsonl;
  * the size and times of the files under checkpoints/ and final_model/ (a long save moves too).

When none of them changed for half the timeout it prints a warning; after the whole timeout it
stops the run: the driver's main thread gets `Stalled` (through a signal, so that it also leaves
a blocking `ray.get`), the launch shuts Ray down as after any failure, execute_run marks the run
failed with one line naming the stage and the process it waits on (a process stopped by a signal
is named as such), and the processes of the run that outlived the shutdown (a stopped actor
cannot even see its raylet go) are killed. Where the main thread does not come back within
GRACE_S (stuck inside a C call that never looks at signals), the watchdog marks the run failed,
prints the line, kills the run's processes and ends the process itself.
"""
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable, List, Optional

from pipelines.launch import rundir

DEFAULT_STALL_TIMEOUT = {"cpu": 600.0, "cuda": 1800.0}  # seconds: 10 min on CPU, 30 min on GPU
WARN_FRACTION = 0.5     # the warning comes after this share of the timeout without progress
GRACE_S = 60.0          # how long the main thread has to leave the launch once stopped
STOP_SIGNAL = signal.SIGUSR2  # delivered to the main thread only; its Python handler raises Stalled
HEARTBEAT = "heartbeat.json"  # openrlhf_patch/heartbeat.py HEARTBEAT

STAGES = {
    None: "start-up (Ray, the models, the vLLM engines)",
    "generation": "generation",
    "experience": "experience making (rewards, reference and old log-probs)",
    "training": "training",
    "weight sync": "the weight sync to vLLM",
    "step end": "logging, checkpointing or validation",
}


class Stalled(BaseException):
    """Raised in the driver's main thread when the watchdog stops the run (a BaseException, like
    KeyboardInterrupt, so that no `except Exception` on the way up swallows it)."""


def default_timeout(device: str) -> float:
    return DEFAULT_STALL_TIMEOUT["cpu" if device == "cpu" else "cuda"]


def timeout_of(patch_config) -> float:
    """The run's stall timeout in seconds (0: no watchdog): its --stall-timeout, else the default
    of its device. A value that is not a number of seconds reads as the default."""
    value = getattr(patch_config, "stall_timeout", None)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or value != value:
        return default_timeout(patch_config.device)
    return float(value)


def seconds(value: float) -> str:
    return f"{value:.0f} s" if value >= 10 or value == int(value) else f"{value:.1f} s"


class Watchdog:
    """Start it in the main thread (it installs STOP_SIGNAL's handler) before the launch redirects
    the terminal, and stop() it in the main thread when the launch is over."""

    def __init__(self, run_dir, timeout: float, on_hard_stop: Optional[Callable[[str], None]] = None,
                 grace: float = GRACE_S):
        self.run_dir = Path(run_dir)
        self.timeout = timeout
        self.on_hard_stop = on_hard_stop
        self.grace = grace
        self.fired: Optional[str] = None  # the one line, once the watchdog stopped the run
        self.poll = min(5.0, max(0.2, timeout / 40))
        self._stopping = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._terminal: Optional[int] = None
        self._previous_handler = None
        self._processes: List = []

    # ------------------------------------------------------------------ life cycle (main thread)
    def start(self) -> "Watchdog":
        (self.run_dir / HEARTBEAT).unlink(missing_ok=True)  # an earlier launch's
        if self.timeout <= 0:
            return self
        self._terminal = os.dup(2)  # the terminal: launch_console points fd 2 at the log afterwards
        self._previous_handler = signal.signal(STOP_SIGNAL, self._raise_stalled)
        self._thread = threading.Thread(target=self._watch, name="ngrpo-stall-watchdog", daemon=True)
        self._thread.start()
        return self

    def announce(self) -> None:
        """Its setting, for the launch log."""
        what = f"stops the run after {seconds(self.timeout)} without progress" if self.timeout > 0 else "off"
        print(f"[ngrpo] stall watchdog: {what} (--stall-timeout)", file=sys.stderr, flush=True)

    def stop(self) -> Optional[str]:
        """End the watch; the one line when the watchdog stopped the run, else None."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=self.poll + 5)
            self._thread = None
        if self._previous_handler is not None:
            signal.signal(STOP_SIGNAL, self._previous_handler)
            self._previous_handler = None
        if self._terminal is not None:
            os.close(self._terminal)
            self._terminal = None
        return self.fired

    def reap(self) -> List[int]:
        """Kill what is left of the run's processes as they were when the watchdog fired (Ray's
        shutdown cannot reach a stopped actor); the pids killed."""
        import psutil

        killed = [proc for proc in self._processes if _kill(proc)]
        psutil.wait_procs(killed, timeout=10)
        return [proc.pid for proc in killed]

    def _raise_stalled(self, signum, frame):
        if self.fired and not self._stopping.is_set():
            raise Stalled(self.fired)

    # ------------------------------------------------------------------ the watch (its own thread)
    def _watch(self):
        last, since, warned = self._fingerprint(), time.monotonic(), False
        while not self._stopping.wait(self.poll):
            now, seen = time.monotonic(), self._fingerprint()
            if seen != last:
                last, since, warned = seen, now, False
                continue
            idle = now - since
            if not warned and idle >= self.timeout * WARN_FRACTION:
                warned = True
                self._say(f"[ngrpo] warning: no progress for {seconds(idle)}, in {self.where()}; the run stops "
                          f"after {seconds(self.timeout)} without progress (--stall-timeout)")
            if idle >= self.timeout:
                self._fire()
                return

    def _fire(self):
        self._processes = _descendants()
        self.fired = (f"no progress for {seconds(self.timeout)}: stalled in {self.where()}; the run is stopped: "
                      f"resume it with `ngrpo train --resume {self.run_dir}`")
        print(f"[ngrpo] {self.fired}", file=sys.stderr, flush=True)  # into the launch log
        # A stopped process never runs again, nor sees Ray's shutdown: it goes first, and Ray's
        # shutdown then finds it dead instead of waiting for it.
        for proc in _stopped(self._processes):
            _kill(proc)
        signal.pthread_kill(threading.main_thread().ident, STOP_SIGNAL)
        if self._stopping.wait(self.grace):
            return  # the main thread left the launch: execute_run reports, reaps and marks the run
        # The main thread is stuck where no signal reaches it: end the run from here.
        try:
            if self.on_hard_stop is not None:
                self.on_hard_stop(self.fired)
        finally:
            self._say(f"Error: training failed: {self.fired}")
            self.reap()
            os._exit(1)

    def _say(self, line: str) -> None:
        if self._terminal is None or not _same_file(2, self._terminal):
            print(line, file=sys.stderr, flush=True)  # the launch log
        if self._terminal is not None:
            try:
                os.write(self._terminal, f"\n{line}\n".encode(errors="replace"))
            except OSError:
                pass

    # ------------------------------------------------------------------ what moved, and where it stands
    def _fingerprint(self) -> tuple:
        parts = [_stat(self.run_dir / name) for name in (HEARTBEAT, rundir.PROGRESS, rundir.METRICS,
                                                         rundir.EVAL_METRICS)]
        for folder in (rundir.CHECKPOINTS, rundir.FINAL_MODEL):
            total, newest = 0, 0
            for top, _, files in os.walk(self.run_dir / folder):
                for name in files:
                    st = _stat(Path(top) / name)
                    if st is not None:
                        total, newest = total + st[2], max(newest, st[1])
            parts.append((total, newest))
        return tuple(parts)

    def stage(self) -> Optional[str]:
        try:
            stage = json.loads((self.run_dir / HEARTBEAT).read_text()).get("stage")
        except (OSError, ValueError, AttributeError):
            return None
        return stage if isinstance(stage, str) else None

    def where(self) -> str:
        """The stage the run stands in and the process(es) it waits on, as words."""
        stage = self.stage()
        text = STAGES.get(stage, str(stage)[:40])
        blamed = _blame(stage, _descendants())
        return f"{text} ({blamed})" if blamed else text


def _same_file(fd1: int, fd2: int) -> bool:
    try:
        return os.path.sameopenfile(fd1, fd2)
    except OSError:
        return False


def _stat(path: Path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _descendants() -> list:
    """The processes this one started, and theirs (a private Ray node: its raylet, GCS and workers)."""
    import psutil

    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


ROLES = (  # (start of a process title, what it is)
    ("ray::RolloutRayActor", "vLLM engine"),
    ("ray::LLMRayActor", "vLLM engine"),
    ("VLLM::EngineCore", "vLLM engine core"),
    ("ray::PolicyModelActor", "policy actor"),
    ("ray::ReferenceModelActor", "reference model actor"),
    ("ray::CriticModelActor", "critic actor"),
    ("ray::RewardModelActor", "reward model actor"),
    ("ray::PPOTrainer", "trainer actor"),
)


def _title(proc) -> str:
    try:
        cmdline = proc.cmdline()
        return (cmdline[0] if cmdline else "") or proc.name()
    except Exception:  # noqa: BLE001 - a process that ended meanwhile
        return ""


def _roles(procs) -> list:
    """[(label, process)] for the run's actors: 'vLLM engine 0', 'policy actor', ... (engines are
    numbered in the order they started, as OpenRLHF creates them)."""
    found = []
    for proc in procs:
        title = _title(proc)
        role = next((r for prefix, r in ROLES if title.startswith(prefix)), None)
        if role is None:
            name = title.rsplit("/", 1)[-1].split(" ")[0]
            role = {"raylet": "Ray's raylet", "gcs_server": "Ray's GCS server"}.get(name)
        if role is not None:
            found.append([role, proc])
    engines = sorted((item for item in found if item[0] == "vLLM engine"), key=lambda item: _created(item[1]))
    numbers = {item[1].pid: i for i, item in enumerate(engines)}
    for item in found:
        if item[0] == "vLLM engine":
            item[0] = f"vLLM engine {numbers[item[1].pid]}"
        elif item[0] == "vLLM engine core":
            parent = _parent_pid(item[1])
            item[0] = f"vLLM engine {numbers[parent]}'s engine core" if parent in numbers else item[0]
    return [tuple(item) for item in found]


def _created(proc) -> float:
    try:
        return proc.create_time()
    except Exception:  # noqa: BLE001
        return 0.0


def _parent_pid(proc) -> Optional[int]:
    try:
        return proc.ppid()
    except Exception:  # noqa: BLE001
        return None


def _stopped(procs) -> list:
    import psutil

    stopped = []
    for proc in procs:
        try:
            if proc.status() == psutil.STATUS_STOPPED:
                stopped.append(proc)
        except psutil.Error:
            pass
    return stopped


def _kill(proc) -> bool:
    import psutil

    try:
        if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
            proc.kill()  # SIGKILL ends a stopped process too
            return True
    except psutil.Error:
        pass
    return False


def _blame(stage: Optional[str], procs) -> str:
    """Which process the run waits on: any of the run's processes stopped by a signal, else the
    ones the stage works in."""
    stopped = _stopped(procs)
    roles = _roles(procs)
    if stopped:
        label = {proc.pid: role for role, proc in roles}
        return "; ".join(f"{label.get(p.pid, _title(p) or 'process')}, pid {p.pid}, is stopped (SIGSTOP?)"
                         for p in stopped)
    wanted = {"generation": ("vLLM engine",), "weight sync": ("vLLM engine", "policy actor"),
              "training": ("policy actor", "critic actor"),
              "experience": ("policy actor", "reference model actor", "critic actor", "reward model actor")}
    names = [f"{role}, pid {proc.pid}" for role, proc in roles
             if role.startswith(wanted.get(stage, ())) and "engine core" not in role]
    if procs and stage in ("training", "experience", "weight sync") and not any("policy" in n for n in names):
        names.append(f"the policy in the driver, pid {os.getpid()}")  # CPU mode's lean layout (a private node)
    return "; ".join(names)
