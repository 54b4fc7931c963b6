"""A full disk and a hung rollout engine (issue 29, item 4): each ends in one line and a true status.

Real filesystems and real processes: a tmpfs too small for a run's second checkpoint, a vLLM
engine stopped with SIGSTOP, a main thread that blocks the watchdog's signal. A tmpfs needs root
(mount); elsewhere run this file inside a user and mount namespace, where you are root:
`unshare --user --map-root-user --mount .venv/bin/python -m pytest tests/test_faults_disk_stall.py`.
"""
import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

from pipelines.launch import rundir, training

REPO = Path(__file__).resolve().parents[1]
CPU = ["--device", "cpu", "--preset", "cpu-tiny"]


@contextlib.contextmanager
def tmpfs(folder: Path, size_bytes: int):
    """FOLDER as a tmpfs of SIZE_BYTES for the block (unmounted after)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root: run under `unshare --user --map-root-user --mount`")
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def resize(folder: Path, size_bytes: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size_bytes}", str(folder)], check=True)


def fill(folder: Path, name: str = "filler") -> Path:
    """Fill FOLDER's filesystem to the last byte; the filler file."""
    filler = folder / name
    with open(filler, "wb", buffering=0) as f:
        for chunk in (65536, 4096, 1):
            with contextlib.suppress(OSError):
                while f.write(b"x" * chunk):
                    pass
    assert shutil.disk_usage(folder).free == 0
    return filler


def temporary_files(folder: Path) -> list:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if ".tmp-" in p.name)


# ------------------------------------------------------------------ the manifest on a full disk


def test_the_manifest_is_written_on_a_full_disk(tmp_path):
    with tmpfs(tmp_path / "fs", 1024 * 1024) as fs:
        run = fs / "run"
        run.mkdir()
        rundir.write_manifest(run, {"status": "running", "error": None})
        assert (run / rundir.MANIFEST_SPARE).stat().st_size == rundir.SPARE_BYTES
        fill(fs)
        failed = {"status": "failed", "error": "no space left on device " + "x" * 5000}  # bigger than before
        rundir.write_manifest(run, failed)  # the spare is given up for it
        assert rundir.read_manifest(run) == failed
        assert not (run / rundir.MANIFEST_SPARE).exists() and temporary_files(fs) == []
        # no spare left, and the room it gave taken: a manifest that fits in the old one's blocks is
        # written in place ...
        fill(fs, "filler2")
        shorter = {"status": "failed", "error": "short"}
        rundir.write_manifest(run, shorter)
        assert rundir.read_manifest(run) == shorter and temporary_files(fs) == []
        # ... one that needs a new block is refused, and the manifest stays whole
        with pytest.raises(OSError) as refused:
            rundir.write_manifest(run, {"status": "failed", "error": "y" * 20_000})
        assert refused.value.errno == 28
        assert rundir.read_manifest(run) == shorter and temporary_files(fs) == []
        (fs / "filler").unlink()
        (fs / "filler2").unlink()
        rundir.write_manifest(run, failed)  # with room again, the spare comes back
        assert (run / rundir.MANIFEST_SPARE).stat().st_size == rundir.SPARE_BYTES


# ------------------------------------------------------------------ a full disk during a real run


def checkpoint_bytes(model_dir: Path) -> int:
    """One DeepSpeed checkpoint of MODEL_DIR on CPU: bf16 weights + fp32 master weights and Adam's
    two moments, 14 bytes a parameter."""
    from safetensors import safe_open

    params = 0
    for shard in model_dir.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            params += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return 14 * params


def ngrpo(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "ngrpo_cli.main", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.pipeline
def test_a_full_disk_while_checkpointing_ends_in_one_line_and_the_run_resumes(tmp_path, tiny_model_dir, problems):
    """The first checkpoint fits on the run's filesystem, the second does not. Before: ~100 lines of
    traceback, the failure handler's own manifest write failing too, the status left "running" and
    an empty temporary manifest behind."""
    ckpt = checkpoint_bytes(tiny_model_dir)
    with tmpfs(tmp_path / "fs", int(ckpt * 1.5) + 1024 * 1024) as fs:
        run = fs / "run"
        proc = ngrpo("train", "--model", tiny_model_dir, "--data", problems, "--output", run, *CPU,
                     "--max-steps", "2", "--save-steps", "1", "--stall-timeout", "900")
        assert proc.returncode == 1, proc.stderr[-4000:]
        output = proc.stdout + proc.stderr
        assert "Traceback" not in output, output[-6000:]
        errors = [line for line in output.splitlines() if "Error" in line or "rror:" in line]
        assert len(errors) == 1 and proc.stderr.rstrip().splitlines()[-1] == errors[0], output[-4000:]
        unfinished = run / "checkpoints" / "_actor" / "global_step2"
        match = re.fullmatch(
            re.escape(f"Error: training failed: no space left on device writing {unfinished}/") + r"[\w.]+\.pt"
            + r" \((\d+) B free on that filesystem\)"
            + re.escape("; the unfinished checkpoint (global_step2) is removed and the run resumes from step 1; "
                        f"free space and resume with `ngrpo train --resume {run}`"), errors[0])
        assert match, errors[0]
        assert int(match.group(1)) < 64 * 1024
        manifest = rundir.read_manifest(run)
        assert manifest["status"] == "failed" and rundir.effective_status(run) == "failed"
        assert manifest["error"] == errors[0][len("Error: training failed: "):] and manifest["global_step"] == 1
        assert manifest["patch_config"]["stall_timeout"] == 900  # recorded for a resume
        # written on the full disk: the spare gave it room
        assert not (run / rundir.MANIFEST_SPARE).exists()
        assert temporary_files(run) == [] and not unfinished.exists()
        assert (run / "checkpoints" / "_actor" / "latest").read_text() == "global_step1"
        said = []
        assert training.usable_checkpoint(run, log=said.append) == 1 and said == []  # complete, nothing to fall back from

        resize(fs, 8 * ckpt)  # space freed
        resumed = ngrpo("train", "--resume", run)
        assert resumed.returncode == 0, resumed.stderr[-4000:]
        assert f"resuming {run} (failed) from step 1" in resumed.stderr
        assert rundir.read_manifest(run)["status"] == "finished"
        assert [r["step"] for r in rundir.read_step_log(run / rundir.METRICS).rows] == [1, 2]
        assert (run / "checkpoints" / "_actor" / "latest").read_text() == "global_step2"
        assert (run / rundir.MANIFEST_SPARE).stat().st_size == rundir.SPARE_BYTES
        # the resumed launch kept the run's stall timeout
        assert "[ngrpo] stall watchdog: stops the run after 900 s without progress (--stall-timeout)" in \
            (run / "logs" / "launch-2.log").read_text()


# ------------------------------------------------------------------ a hung rollout engine


def _engines(pid: int) -> list:
    return [p for p in psutil.Process(pid).children(recursive=True)
            if re.match(r"ray::(RolloutRayActor|LLMRayActor)|VLLM::EngineCore", (p.cmdline() or [""])[0])]


def _of_the_run(run: Path) -> list:
    """Live processes that carry the run's directory in their environment (its Ray workers do)."""
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.status() != psutil.STATUS_ZOMBIE and proc.environ().get("NGRPO_RUN_DIR") == str(run):
                found.append(proc)
    return found


@pytest.mark.pipeline
def test_a_stopped_vllm_engine_stops_the_run_after_the_stall_timeout(tmp_path, tiny_model_dir, problems):
    """SIGSTOP on the rollout engine once training runs. Before: the run waited forever, silently."""
    timeout = 45  # seconds; over the tiny run's start-up on a busy 2-core machine
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "ngrpo_cli.main", "train", "--model", str(tiny_model_dir), "--data", str(problems),
           "--output", str(run), *CPU, "--max-steps", "40", "--episodes", "20", "--stall-timeout", str(timeout)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    seen, stopped = [], None
    out = {}
    readers = [threading.Thread(target=lambda k=k, s=s: out.__setitem__(k, s.read()), daemon=True)
               for k, s in (("stdout", proc.stdout), ("stderr", proc.stderr))]
    for t in readers:
        t.start()
    try:
        deadline = time.time() + 600
        while rundir.completed_steps(run) < 1:
            assert proc.poll() is None and time.time() < deadline, "the run ended or never trained a step"
            time.sleep(0.5)
        seen = psutil.Process(proc.pid).children(recursive=True)
        engines = _engines(proc.pid)
        assert len(engines) == 1, [p.cmdline() for p in seen]
        assert engines[0] in _of_the_run(run)  # what the check after the run looks for
        stopped = engines[0]
        stopped.send_signal(signal.SIGSTOP)
        stopped_at = time.time()
        proc.wait(timeout + 120)
        took = time.time() - stopped_at
        for t in readers:
            t.join(10)
        assert proc.returncode == 1, out["stderr"][-4000:]
        assert took < timeout + 60, took
        lines = out["stderr"].rstrip().splitlines()
        assert "Traceback" not in out["stdout"] + out["stderr"]
        errors = [line for line in lines if line.startswith("Error")]
        assert errors == [lines[-1]], out["stderr"][-4000:]
        assert re.fullmatch(
            re.escape(f"Error: training failed: no progress for {timeout} s: stalled in ")
            + r"(generation|the weight sync to vLLM)"
            + re.escape(f" (vLLM engine 0, pid {stopped.pid}, is stopped (SIGSTOP?)); the run is stopped: "
                        f"resume it with `ngrpo train --resume {run}`"), lines[-1]), lines[-1]
        warning = [line for line in lines if line.startswith("[ngrpo] warning: no progress")]
        assert len(warning) == 1 and re.fullmatch(
            r"\[ngrpo\] warning: no progress for \d+ s, in .*; the run stops after 45 s without progress "
            r"\(--stall-timeout\)", warning[0]), warning
        assert lines.index(warning[0]) < len(lines) - 1
        manifest = rundir.read_manifest(run)
        assert manifest["status"] == "failed" and rundir.effective_status(run) == "failed"
        assert manifest["error"] == lines[-1][len("Error: training failed: "):]
        assert manifest["patch_config"]["stall_timeout"] == timeout
        assert manifest["global_step"] >= 1
        # nothing of the run is left running: Ray shut down, the stopped engine killed
        left = [p for p in seen if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert left == [] and _of_the_run(run) == [], [(p.pid, p.cmdline()) for p in left]
    finally:
        if stopped is not None:
            with contextlib.suppress(psutil.Error):
                stopped.send_signal(signal.SIGCONT)
        for p in seen:
            with contextlib.suppress(psutil.Error):
                p.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


DEAF_MAIN_THREAD = textwrap.dedent('''
    import json, signal, subprocess, sys, time
    from pipelines.launch import rundir, watchdog

    run = sys.argv[1]
    rundir.write_manifest(run, {"status": "running"})
    child = subprocess.Popen(["sleep", "300"])
    print(child.pid, flush=True)

    def hard_stop(line):
        rundir.write_manifest(run, {"status": "failed", "error": line})

    watchdog.Watchdog(run, 2.0, on_hard_stop=hard_stop, grace=3.0).start()
    signal.pthread_sigmask(signal.SIG_BLOCK, {watchdog.STOP_SIGNAL})  # as a thread stuck in C: no signal gets in
    time.sleep(120)
    print("the watchdog did not end the process", flush=True)
''')


def test_the_stall_timeout_defaults_and_what_a_manifest_may_hold():
    from openrlhf_patch.config import PatchConfig
    from pipelines.launch import watchdog

    assert watchdog.timeout_of(PatchConfig(device="cpu")) == 600 and watchdog.timeout_of(PatchConfig()) == 1800
    assert watchdog.timeout_of(PatchConfig(device="cpu", stall_timeout=0)) == 0  # off
    assert watchdog.timeout_of(PatchConfig(device="cpu", stall_timeout=20)) == 20
    for bad in ("20", -1, float("nan"), True):  # a run directory is data: a bad value reads as the default
        assert watchdog.timeout_of(PatchConfig(device="cpu", stall_timeout=bad)) == 600


def test_the_watchdog_ends_a_process_whose_main_thread_never_comes_back(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    started = time.time()
    proc = subprocess.run([sys.executable, "-c", DEAF_MAIN_THREAD, str(run)], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    took = time.time() - started
    assert proc.returncode == 1 and took < 30, (took, proc.stdout, proc.stderr)
    line = (f"Error: training failed: no progress for 2 s: stalled in start-up (Ray, the models, the vLLM engines); "
            f"the run is stopped: resume it with `ngrpo train --resume {run}`")
    assert proc.stderr.strip().splitlines()[-1] == line
    assert rundir.read_manifest(run) == {"status": "failed", "error": line[len("Error: training failed: "):]}
    child = int(proc.stdout.split()[0])
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE
