"""Every fault ends in one line and a true status (issue 29, item 4), with real processes and signals.

* Ctrl-C in `ngrpo study` reaches its training child as one SIGINT, and the study waits while the
  child marks its run interrupted and shuts Ray down (before: SIGKILL 0.25 s later, a run that
  read "killed", Ray's runtime-env agent alive ~60-100 s more, an ngrpo-vllm-* folder left).
* Nothing of vLLM's stays in the temp folder: a killed owner's scratch folder is removed by its
  reaper at once, or by the next start; a live owner's never.
* A vLLM engine that dies is named: "vLLM engine 0 died: ..." (before: Ray's generic ActorDiedError).
* A reward file that recurses through ngrpo's reward entry logs one traceback (before: one per
  level of the recursion, 609 MB of run log and 433 MB of Ray logs in 107 s).

Every test runs its processes with a temp folder (TMPDIR, RAY_TMPDIR) of its own, and marks them
with an environment variable, so it sees only its own files and processes.
"""
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from child_process import sigint_as_in_a_terminal

from pipelines.launch import rundir

REPO = Path(__file__).resolve().parents[1]
CPU = ["--device", "cpu", "--preset", "cpu-tiny"]
MARK = "NGRPO_TEST_PROCESS_MARK"


def write_problems(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"id": str(i), "problem": f"What is {i} + {i % 7}?", "answer": str(i + i % 7)})
                            + "\n" for i in range(n)))
    return path


class Sandbox:
    """A private temp folder (short: Ray's socket paths are limited) and a mark for the processes
    started with ENV, so that what they leave behind can be found."""

    def __init__(self):
        self.tmp = Path(tempfile.mkdtemp(prefix="ngrpo-fc-", dir="/tmp"))
        self.mark = uuid.uuid4().hex
        self.env = dict(os.environ, TMPDIR=str(self.tmp), RAY_TMPDIR=str(self.tmp), PYTHONUNBUFFERED="1",
                        **{MARK: self.mark})
        self.env.pop("RAY_ADDRESS", None)

    def processes(self) -> dict:
        """{pid: command line} of the live processes started with ENV (a zombie has no environment)."""
        found, needle = {}, f"{MARK}={self.mark}".encode()
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                try:
                    if needle in (proc / "environ").read_bytes():
                        found[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ")[:120].decode()
                except OSError:
                    pass
        return found

    def wait_until_no_process(self, timeout: float) -> float:
        """Seconds until no process of ENV is left; fails naming them after TIMEOUT."""
        start = time.time()
        while self.processes():
            if time.time() - start > timeout:
                raise AssertionError(f"still alive {timeout:.0f} s later: {self.processes()}")
            time.sleep(0.2)
        return time.time() - start

    def vllm_leftovers(self) -> list:
        return sorted(p.name for p in self.tmp.iterdir() if p.name.startswith(("ngrpo-vllm-", "vllm_dist_")))

    def ray_log_bytes(self) -> int:
        return sum(p.stat().st_size for p in (self.tmp / "ray").glob("session_*/logs/**/*") if p.is_file())

    def close(self):
        import shutil

        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture
def sandbox():
    box = Sandbox()
    yield box
    for pid in box.processes():  # a failed test's processes, by pid (nothing else is touched)
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    box.close()


def _wait_for(predicate, timeout, what, proc=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process ended (exit {proc.returncode}) before {what}")
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


# ------------------------------------------------------------------ vLLM's temp folder, without vLLM


OWNER_THEN_SLEEP = textwrap.dedent('''
    import sys, time
    from openrlhf_patch.cpu import cpu_mode
    with cpu_mode.vllm_scratch_dir({}) as path:
        print(path, flush=True)
        time.sleep(600)
''')


def _scratch(parent: Path, name: str, owner) -> Path:
    path = parent / name
    path.mkdir()
    (path / "vllm_dist_0123").write_text("")
    if owner is not None:
        (path / "owner.json").write_text(json.dumps(owner))
    return path


def test_stale_vllm_folders_go_and_live_ones_stay(sandbox):
    """The next start removes what killed owners left, and nothing a live process owns; a killed
    owner's reaper removes its folder at once."""
    import socket

    from openrlhf_patch.cpu import cpu_mode

    host = socket.gethostname()
    gone = subprocess.Popen(["true"])
    gone.wait()
    sleeper = subprocess.Popen(["sleep", "600"])
    me = {"pid": os.getpid(), "start": cpu_mode._process_start(os.getpid()), "host": host}
    try:
        dead = _scratch(sandbox.tmp, f"ngrpo-vllm-{gone.pid}-a", {"pid": gone.pid, "start": 1, "host": host})
        reused = _scratch(sandbox.tmp, f"ngrpo-vllm-{sleeper.pid}-b",  # a live pid, another process's start time
                          {"pid": sleeper.pid, "start": cpu_mode._process_start(sleeper.pid) - 1, "host": host})
        live = _scratch(sandbox.tmp, f"ngrpo-vllm-{os.getpid()}-c", me)
        elsewhere = _scratch(sandbox.tmp, f"ngrpo-vllm-{gone.pid}-d", {"pid": gone.pid, "host": host + "-other"})
        unknown = _scratch(sandbox.tmp, "ngrpo-vllm-e", None)  # no owner file: an older ngrpo's, or being made
        other = sandbox.tmp / "not-ngrpo"
        other.mkdir()
        env = {}
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(tempfile, "tempdir", str(sandbox.tmp))
            with cpu_mode.vllm_scratch_dir(env) as path:
                assert Path(path).parent == sandbox.tmp and env[cpu_mode.VLLM_SCRATCH_ENV] == path
                assert Path(path).name.startswith(f"ngrpo-vllm-{os.getpid()}-")
                assert json.loads((Path(path) / "owner.json").read_text()) == me
            assert not Path(path).exists()
        assert not dead.exists() and not reused.exists()
        assert live.exists() and elsewhere.exists() and unknown.exists() and other.exists()
    finally:
        sleeper.kill()
        sleeper.wait()

    owner = subprocess.Popen([sys.executable, "-c", OWNER_THEN_SLEEP], cwd=REPO, env=sandbox.env, text=True,
                             stdout=subprocess.PIPE, start_new_session=True)
    path = Path(owner.stdout.readline().strip())
    assert path.is_dir() and path.parent == sandbox.tmp
    os.killpg(owner.pid, signal.SIGKILL)  # the owner and its whole process group; the reaper has its own
    owner.wait()
    _wait_for(lambda: not path.exists(), 10, "the reaper to remove the killed owner's folder")
    sandbox.wait_until_no_process(5)  # the reaper too


@pytest.mark.pipeline
def test_a_killed_vllm_eval_leaves_nothing_in_the_temp_folder(sandbox, tiny_model_dir):
    """`ngrpo eval` with vLLM, SIGKILLed while it generates: before, vLLM's FileStore file
    (vllm_dist_*) stayed in the temp folder; now vLLM's files go to the eval's own folder, which
    its reaper removes."""
    bench = write_problems(sandbox.tmp / "bench.jsonl", 64)
    out = sandbox.tmp / "eval"
    proc = subprocess.Popen([sys.executable, "-m", "ngrpo_cli.main", "eval", "--model", str(tiny_model_dir),
                             "--benchmarks", str(bench), "-o", str(out), "--n", "64", "--max-new-tokens", "512"],
                            cwd=REPO, env=sandbox.env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        _wait_for(lambda: any(p.name.startswith("ngrpo-vllm-") and any(p.glob("vllm_dist_*"))
                              for p in sandbox.tmp.iterdir()), 300, "vLLM's FileStore file in the eval's folder", proc)
        time.sleep(1)
        assert not list(sandbox.tmp.glob("vllm_dist_*"))
        proc.kill()
        proc.wait(60)
    finally:
        proc.kill()
    _wait_for(lambda: not sandbox.vllm_leftovers(), 10, "the eval's vLLM folder to be removed")
    sandbox.wait_until_no_process(10)


# ------------------------------------------------------------------ real runs


@pytest.mark.pipeline
def test_ctrl_c_in_a_study_interrupts_its_run_and_leaves_nothing(sandbox, tiny_model_dir):
    """Ctrl-C while a study trains: the run is marked interrupted (not killed), the study says so,
    and no process or vLLM file of it is left. A study killed outright takes its child along, and
    that run too ends interrupted. (test_study.py resumes an interrupted study to its end.)"""
    train = write_problems(sandbox.tmp / "train.jsonl", 64)
    bench = write_problems(sandbox.tmp / "bench.jsonl", 4)
    out = sandbox.tmp / "study"
    cmd = [sys.executable, "-m", "ngrpo_cli.main", "study", "-o", str(out), "--model", str(tiny_model_dir),
           "--data", str(train), "--eval", str(bench), "--algos", "ngrpo", "--seeds", "0", "--max-steps", "8",
           "--save-steps", "1", *CPU, "--eval-n", "1", "--eval-max-new-tokens", "8", "--eval-backend", "hf"]
    console = sandbox.tmp / "study.out"
    with open(console, "w") as sink:
        study = subprocess.Popen(cmd, cwd=REPO, env=sandbox.env, stdout=sink, stderr=subprocess.STDOUT, text=True,
                                 start_new_session=True, preexec_fn=sigint_as_in_a_terminal)
    run = out / "runs" / "ngrpo-s0"
    try:
        _wait_for(lambda: run.is_dir() and rundir.checkpoint_step(run) >= 1, 900, "the run's first checkpoint", study)
        os.killpg(study.pid, signal.SIGINT)  # Ctrl-C in the terminal: the study's process group
        study.wait(600)
    finally:
        study.kill()
    output = console.read_text()
    gone_after = sandbox.wait_until_no_process(10)
    assert study.returncode != 0
    assert "Error: interrupted; run the same command to continue the study" in output, output[-3000:]
    # the child got SIGINT, ended by itself (exit 1: `ngrpo train`'s interrupted error), not SIGKILL (-9)
    assert "stopping ngrpo train (ngrpo-s0.train.log)" in output and "s (exit 1)" in output, output[-3000:]
    train_log = (out / "logs" / "ngrpo-s0.train.log").read_text()
    assert "Error: interrupted; the run keeps its last checkpoint" in train_log, train_log[-3000:]
    manifest = rundir.read_manifest(run)
    assert manifest["status"] == "interrupted" and rundir.effective_status(run) == "interrupted"
    assert rundir.checkpoint_step(run) >= 1
    entry = json.loads((out / "study.json").read_text())["runs"]["ngrpo-s0"]
    assert entry["status"] == "interrupted" and entry["run_status"] == "interrupted"
    assert sandbox.vllm_leftovers() == []
    stopped_in = float(output.split("ngrpo train (ngrpo-s0.train.log) stopped in ")[1].split(" s")[0])
    print(f"child stopped {stopped_in} s after Ctrl-C; no process left {gone_after:.1f} s after the study")

    # The same command resumes the run; then the study is killed outright (SIGKILL: no code of it
    # runs). Its child is told by the kernel (SIGINT) and still ends with its run interrupted.
    done = rundir.checkpoint_step(run)
    console = sandbox.tmp / "study-again.out"
    with open(console, "w") as sink:
        again = subprocess.Popen(cmd, cwd=REPO, env=sandbox.env, stdout=sink, stderr=subprocess.STDOUT, text=True,
                                 start_new_session=True)
    try:
        _wait_for(lambda: rundir.checkpoint_step(run) > done, 900, "the resumed run's next checkpoint", again)
        again.kill()
        again.wait(60)
    finally:
        again.kill()
    killed_gone_after = sandbox.wait_until_no_process(60)
    assert "resuming ngrpo-s0 from its checkpoint" in console.read_text()
    assert rundir.read_manifest(run)["status"] == "interrupted" and rundir.checkpoint_step(run) > done
    train_log = (out / "logs" / "ngrpo-s0.train.log").read_text()
    assert train_log.count("Error: interrupted; the run keeps its last checkpoint") == 2  # both launches
    assert sandbox.vllm_leftovers() == []
    print(f"study SIGKILLed: its child ended interrupted, no process left {killed_gone_after:.1f} s later")


@pytest.mark.pipeline
def test_a_dead_vllm_engine_is_named(sandbox, tiny_model_dir):
    """The rollout actor (the vLLM engine) is SIGKILLed mid-run: the run fails with "vLLM engine 0
    died" and Ray's cause on one line, whether the death shows in generation (ActorDiedError) or in
    the weight sync (gloo's "Connection closed by peer"); nothing of the run is left."""
    run = sandbox.tmp / "run"
    stderr = sandbox.tmp / "train.err"
    with open(stderr, "w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "ngrpo_cli.main", "train", "--model", str(tiny_model_dir),
                                 "--data", str(write_problems(sandbox.tmp / "d.jsonl", 256)), "--output", str(run),
                                 *CPU, "--max-steps", "40", "--save-steps", "100"],
                                cwd=REPO, env=sandbox.env, stdout=subprocess.DEVNULL, stderr=sink, text=True,
                                start_new_session=True)
    try:
        _wait_for(lambda: (run / rundir.METRICS).exists() and (run / rundir.METRICS).read_text().strip(), 600,
                  "the first training step", proc)
        engines = [pid for pid, command in sandbox.processes().items() if command.startswith("ray::RolloutRayActor")]
        assert len(engines) == 1, sandbox.processes()
        os.kill(engines[0], signal.SIGKILL)
        proc.wait(300)
    finally:
        proc.kill()
    err = stderr.read_text()
    assert proc.returncode != 0
    first_error = err[err.index("Error: "):]
    assert first_error.startswith("Error: training failed: vLLM engine 0 died: its worker process has died."), \
        err[-3000:]
    manifest = rundir.read_manifest(run)
    assert manifest["status"] == "failed" and "\n" not in manifest["error"]
    assert manifest["error"].startswith("vLLM engine 0 died: its worker process has died.")
    sandbox.wait_until_no_process(10)
    assert sandbox.vllm_leftovers() == []


RECURSING_REWARD = textwrap.dedent('''
    from pipelines.reward import reward_func as ngrpo_reward

    def reward_func(queries, prompts, labels, **kwargs):  # meant: ngrpo's reward, adjusted
        return ngrpo_reward(queries, prompts, labels, **kwargs)
''')


@pytest.mark.pipeline
def test_a_recursing_reward_file_fails_once_with_a_small_log(sandbox, tiny_model_dir):
    """A reward file calling ngrpo's reward entry, which calls it again: one clear error naming the
    file, and the run's logs and Ray's session logs together stay under 2 MB."""
    reward = sandbox.tmp / "recursing_reward.py"
    reward.write_text(RECURSING_REWARD)
    run = sandbox.tmp / "run"
    proc = subprocess.run([sys.executable, "-m", "ngrpo_cli.main", "train", "--model", str(tiny_model_dir),
                           "--data", str(write_problems(sandbox.tmp / "d.jsonl", 256)), "--output", str(run), *CPU,
                           "--reward-file", str(reward), "--max-steps", "2"],
                          cwd=REPO, env=sandbox.env, capture_output=True, text=True, timeout=900)
    assert proc.returncode != 0
    err = proc.stderr
    first_error = err[err.index("Error: "):]
    assert first_error.startswith(f"Error: training failed: the reward function in {reward} failed:\nTraceback"), \
        err[-3000:]
    assert (f"RecursionError: reward_func in {reward} calls ngrpo's reward entry (pipelines.reward.reward_func), "
            "which calls it again: endless recursion") in first_error
    assert err.count("Traceback") == 1 and err.count("RecursionError: ") == 1
    run_logs = sum(p.stat().st_size for p in (run / rundir.LOGS).rglob("*") if p.is_file())
    ray_logs = sandbox.ray_log_bytes()
    assert run_logs + ray_logs < 2_000_000, (run_logs, ray_logs)
    launch_log = next((run / rundir.LOGS).glob("launch-*.log")).read_text()
    assert launch_log.count(f"the reward function in {reward} failed:") == 1  # the rollout actor's, once
    manifest = rundir.read_manifest(run)
    assert manifest["status"] == "failed" and manifest["global_step"] == 0
    sandbox.wait_until_no_process(10)
    assert sandbox.vllm_leftovers() == []
    print(f"run logs {run_logs} bytes, Ray's session logs {ray_logs} bytes")


# ------------------------------------------------------------------ the reward path, in this process


MUTUAL_RECURSION = textwrap.dedent('''
    def ping(q, n):
        return pong(q, n + 1)

    def pong(q, n):
        return ping(q, n + 1)

    def reward_func(queries, prompts, labels, **kwargs):
        return ping(queries, 0)
''')


@pytest.mark.parametrize("kind", ["mutual_recursion", "calls_the_entry"])
def test_a_failing_reward_is_printed_once_then_counted(kind, tmp_path, monkeypatch, capfd):
    """25 calls of a reward file that fails the same way each time: one traceback (a deep one cut to
    its first and last frames), then a count at the 10th call; reward_error.txt holds the first."""
    from pipelines import reward as reward_module

    path = tmp_path / f"{kind}.py"
    path.write_text(MUTUAL_RECURSION if kind == "mutual_recursion" else RECURSING_REWARD)
    monkeypatch.setenv(reward_module.USER_REWARD_ENV, str(path))
    monkeypatch.setenv(reward_module.RUN_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(reward_module, "_seen", {})
    for _ in range(25):
        with pytest.raises(RecursionError):
            reward_module.reward_func(["What is 1+1? 2"], ["What is 1+1?"], ["2"])
    err = capfd.readouterr().err
    assert err.count("Traceback") == 1 and err.count(f"the reward function in {path} failed:") == 1
    assert err.count("failed again the same way (RecursionError): 10 times so far in this process") == 1
    assert "20 times" not in err
    recorded = (tmp_path / reward_module.ERROR_FILE).read_text()
    assert recorded == err[:len(recorded)] and recorded.startswith(f"the reward function in {path} failed:\nTraceback")
    if kind == "mutual_recursion":
        frames = recorded.count('  File "')
        assert frames == reward_module.TRACEBACK_HEAD + reward_module.TRACEBACK_TAIL, recorded
        assert "frames left out ..." in recorded and recorded.rstrip().endswith("maximum recursion depth exceeded")
        assert len(recorded) < 5000
    else:
        assert recorded.rstrip().endswith("For ngrpo's own reward, call pipelines.reward.math_verify_reward")
        assert recorded.count(f'File "{path}"') == 1  # stopped at the first re-entry
