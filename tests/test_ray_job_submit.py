"""`ray job submit`: `ngrpo train` as a Ray job on a `ray start` head that has its dashboard (the Jobs
API lives there). The job's driver must join that cluster (Ray sets RAY_ADDRESS in a job's
environment), ship ngrpo's code and patch to the workers, and finish a run.

The head is this test's own: bound to 127.0.0.1, on free ports, with its own short temp dir (Ray's
unix socket paths have a length limit). It is stopped by the PIDs this test owns (the `ray start
--block` process and its process group, then anything whose command line names the temp dir or the
run dir), never by `ray stop`, which stops every Ray process on the machine, other users' too.
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipelines.datasets import arith
from pipelines.launch import rundir

BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
NGRPO = str(BIN / "ngrpo") if (BIN / "ngrpo").exists() else shutil.which("ngrpo")
HEAD_START_TIMEOUT = 240
JOB_TIMEOUT = 1800
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def _free_ports(n: int) -> list:
    """N distinct ports free on 127.0.0.1 now (held open together, so no two are the same)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _pids_naming(*markers: str) -> list:
    """This user's processes whose command line contains one of MARKERS (paths only this test made)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if entry.stat().st_uid != os.getuid():
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(m in cmdline for m in markers):
            pids.append(int(entry.name))
    return pids


def _signal(pids, sig) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _stop_head(head: subprocess.Popen, *markers: str) -> None:
    """Stop the head this test started and everything it left: SIGTERM to `ray start --block` (it
    shuts its node down), then SIGTERM, and at last SIGKILL, to its process group and to the
    processes naming MARKERS."""
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(head.pid, sig)  # start_new_session: the group is this head's alone
        except (ProcessLookupError, PermissionError):
            pass
        _signal(_pids_naming(*markers), sig)
        deadline = time.time() + 15
        while time.time() < deadline and _pids_naming(*markers):
            time.sleep(0.5)
    if head.poll() is None:
        head.kill()
    head.wait(timeout=10)


def _env() -> dict:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # the CLI gets --address; nothing may point at another cluster
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


@pytest.fixture
def ray_head(tmp_path):
    """A `ray start --head` node with its dashboard on 127.0.0.1, 6 CPUs and 2 logical GPUs (a
    cpu-tiny run's actor and vLLM engine); yields its dashboard and GCS addresses."""
    temp_dir = tempfile.mkdtemp(prefix="rjs-", dir="/tmp")  # short: Ray's socket paths are limited
    (gcs, dashboard, client, node_manager, object_manager, agent_grpc, agent_http, metrics,
     runtime_env_agent) = _free_ports(9)
    cmd = [RAY, "start", "--head", "--block", "--disable-usage-stats",
           "--node-ip-address", "127.0.0.1", "--port", gcs,
           "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", dashboard,
           "--ray-client-server-port", client, "--node-manager-port", node_manager,
           "--object-manager-port", object_manager, "--dashboard-agent-grpc-port", agent_grpc,
           "--dashboard-agent-listen-port", agent_http, "--metrics-export-port", metrics,
           "--runtime-env-agent-port", runtime_env_agent,
           "--num-cpus", "6", "--num-gpus", "2", "--object-store-memory", str(512 * 2**20),
           "--temp-dir", temp_dir]
    head_log = tmp_path / "ray-start.log"
    workdir = tmp_path / "head-cwd"  # not the checkout: the job must find ngrpo as installed
    workdir.mkdir()
    with open(head_log, "w") as log:
        head = subprocess.Popen(list(map(str, cmd)), cwd=workdir, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    run_dir = tmp_path / "run"
    try:
        url = f"http://127.0.0.1:{dashboard}"
        deadline = time.time() + HEAD_START_TIMEOUT
        while True:
            assert head.poll() is None, f"ray start exited {head.returncode}:\n{head_log.read_text()[-4000:]}"
            try:
                with urllib.request.urlopen(f"{url}/api/version", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline, f"no dashboard at {url} after {HEAD_START_TIMEOUT} s:\n{head_log.read_text()[-4000:]}"
            time.sleep(1)
        yield SimpleNamespace(dashboard=url, gcs=f"127.0.0.1:{gcs}", run_dir=run_dir)
    finally:
        _stop_head(head, temp_dir, str(run_dir))
        shutil.rmtree(temp_dir, ignore_errors=True)


def _ray(*args, timeout=180) -> subprocess.CompletedProcess:
    proc = subprocess.run([RAY, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=_env())
    assert proc.returncode == 0, f"ray {' '.join(map(str, args))}:\n{(proc.stdout + proc.stderr)[-6000:]}"
    return proc


@pytest.mark.pipeline
@pytest.mark.slow
def test_ngrpo_train_runs_as_a_ray_job(ray_head, tmp_path, tiny_model_dir):
    from ray.job_submission import JobSubmissionClient

    assert NGRPO, "the ngrpo command is not installed"
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in arith.problems(32, level=1, split="train", seed=0)))
    run = ray_head.run_dir
    job_id = f"ngrpo-test-{os.getpid()}-{int(time.time())}"
    submit = _ray("job", "submit", "--address", ray_head.dashboard, "--submission-id", job_id, "--no-wait", "--",
                  NGRPO, "train", "--model", tiny_model_dir, "--data", data, "--output", run,
                  "--device", "cpu", "--preset", "cpu-tiny", "--max-steps", "1", "--verbose")
    assert job_id in submit.stdout + submit.stderr

    client = JobSubmissionClient(ray_head.dashboard)
    deadline = time.time() + JOB_TIMEOUT
    try:
        while (info := client.get_job_info(job_id)).status not in TERMINAL:
            assert time.time() < deadline, f"job {job_id} still {info.status} after {JOB_TIMEOUT} s"
            time.sleep(5)
    finally:
        if client.get_job_info(job_id).status not in TERMINAL:
            client.stop_job(job_id)
    logs = _ray("job", "logs", "--address", ray_head.dashboard, job_id).stdout
    status = _ray("job", "status", "--address", ray_head.dashboard, "--log-style", "record", job_id)

    assert info.status == "SUCCEEDED", f"{info.status}: {info.message}\n{logs[-8000:]}"
    assert f"Job '{job_id}' succeeded" in status.stdout + status.stderr, status.stdout + status.stderr  # the CLI agrees
    assert info.driver_exit_code == 0
    # the run finished its one step
    manifest = rundir.read_manifest(run)
    assert manifest["status"] == "finished", manifest
    assert [r["step"] for r in rundir.read_step_log(run / rundir.METRICS).rows] == [1]
    # the patch ran in the driver and in Ray workers of this cluster's one node (not a private Ray
    # instance the driver started for itself)
    driver = re.findall(r"\[ngrpo\] patch active in driver pid (\d+)", logs)
    workers = re.findall(r"\[ngrpo\] patch active in ray-worker pid (\d+) on node (\w+)", logs)
    assert driver, logs[-8000:]
    assert workers, logs[-8000:]
    assert {node for _, node in workers} == {info.driver_node_id}, (workers, info.driver_node_id)
    assert not {pid for pid, _ in workers} & set(driver)
