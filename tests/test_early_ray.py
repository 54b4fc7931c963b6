"""openrlhf_patch/cpu/early_ray.py with a real local Ray: the node started in the background is the one the
launch's ray.init connects to (its runtime env reaches the workers), a node started with other
settings is stopped before the launch starts its own, and a check that fails after the node started
leaves none of Ray's processes behind (through `ngrpo train`). That every `ngrpo train` launch of
the pipeline tests used the early node: tests/test_train_pipeline.py."""
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fixtures_runs import left_in_tmp, tiny_runs  # noqa: F401 - the session fixture
from openrlhf_patch.cpu import early_ray
from pipelines.launch import training
from pipelines.launch.recipes import build_recipe

REPO = Path(__file__).resolve().parents[1]


def _processes(node):
    return [info.process for infos in node.all_processes.values() for info in infos]


def _all_ended(processes, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if all(p.poll() is not None for p in processes):
            return True
        time.sleep(0.2)
    return False


@pytest.mark.parametrize("bad", [["--vllm.num_engines", "many"], ["--actor.num_gpus_per_node"]])
def test_a_command_line_the_flags_cannot_be_read_from_starts_nothing_early(bad, capsys):
    """A bad value is left to OpenRLHF's parser, which reports it in the checks: nothing printed here."""
    argv = training.build_openrlhf_argv(build_recipe("ngrpo", "cpu-tiny"), model="m",
                                        layout=training.Layout.for_device("cpu"))
    assert training.early_node_kwargs(argv, "cpu")["num_gpus"] == 2
    assert training.early_node_kwargs(argv + bad, "cpu") is None
    assert training.early_node_kwargs(argv, "cuda") is None
    assert capsys.readouterr().err == ""


def test_the_launch_connects_to_the_node_started_early(capfd):
    import ray
    from ray._private import ray_constants

    node_kwargs = training.local_node_kwargs("cpu", 1)
    early = early_ray.start(node_kwargs)
    launch = {**node_kwargs, "runtime_env": {"env_vars": {"NGRPO_EARLY_PROBE": "from the launch"}}}
    assert early_ray.take(launch) is early and early_ray.take(launch) is None  # taken once
    processes = _processes(early.node)
    assert all(p.poll() is None for p in processes)
    # a lean node: no autoscaler monitor, log monitor or API server of its own
    assert set(early.node.all_processes) == {ray_constants.PROCESS_TYPE_GCS_SERVER, ray_constants.PROCESS_TYPE_RAYLET}
    early.init(launch)
    try:
        assert ray._private.worker._global_node is early.node

        @ray.remote
        def env():
            print("NGRPO_EARLY_PROBE printed by a worker", flush=True)
            return os.environ.get("NGRPO_EARLY_PROBE")

        assert ray.get(env.remote()) == "from the launch"
        assert ray.cluster_resources()["GPU"] == 1
        # the driver's log thread publishes the worker's line, as Ray's log monitor would
        deadline, seen = time.time() + 20, ""
        while "NGRPO_EARLY_PROBE printed by a worker" not in seen and time.time() < deadline:
            time.sleep(0.2)
            seen += capfd.readouterr().out
        assert "NGRPO_EARLY_PROBE printed by a worker" in seen
    finally:
        ray.shutdown()
        early.release()
    assert _all_ended(processes)
    early._thread.join(10)
    early._log_thread.join(10)
    assert not early._thread.is_alive() and not early._log_thread.is_alive()
    assert "log monitor stopped" not in capfd.readouterr().err
    # ray.init writes the session's spilling directory into the _system_config it is given: the
    # next run's must not carry this session's
    assert training.local_node_kwargs("cpu", 1)["_system_config"] == {"enable_worker_prestart": False,
                                                                       "prestart_worker_first_driver": False}


def test_a_node_started_with_other_settings_is_stopped_and_the_launch_starts_its_own():
    import ray

    early = early_ray.start(training.local_node_kwargs("cpu", 1))
    assert early.ready()
    processes = _processes(early.node)
    wanted = training.local_node_kwargs("cpu", 2)
    assert early_ray.take(wanted) is None
    early._thread.join(10)
    assert _all_ended(processes) and not early._thread.is_alive()
    assert ray._private.worker._global_node is None
    ray.init(**wanted)
    try:
        assert ray.cluster_resources()["GPU"] == 2
    finally:
        ray.shutdown()


def test_a_ray_that_connects_elsewhere_is_undone_and_declined(monkeypatch):
    """Should a Ray version connect without ray._private.worker.connect, the thread's ray.init would
    connect a driver with no runtime env: it is shut down and the node declined."""
    import ray
    from ray._private import worker

    from openrlhf_patch import touchpoints

    real = touchpoints.patched

    def patched(target, value, **kwargs):  # a Ray whose ray.init never calls the patched connect
        if target == "ray._private.worker.connect":
            return contextlib.nullcontext(value)
        return real(target, value, **kwargs)

    monkeypatch.setattr(touchpoints, "patched", patched)
    early = early_ray.start(training.local_node_kwargs("cpu", 1))
    assert not early.ready() and "without ray._private.worker.connect" in str(early.error)
    assert early_ray.take(training.local_node_kwargs("cpu", 1)) is None
    assert not ray.is_initialized() and worker._global_node is None


FAILING_CHECK = """
import sys
from openrlhf_patch.cpu import early_ray
started = []
start = early_ray.start
early_ray.start = lambda kwargs: started.append(start(kwargs)) or started[-1]
from ngrpo_cli.main import cli
try:
    cli(sys.argv[1:])
except SystemExit as e:
    import subprocess, time
    node = started[0].node if started else None
    session = node.session_name if node else None
    deadline = time.time() + 20  # still inside the process that started them
    while session and subprocess.run(["pgrep", "-f", session]).returncode == 0 and time.time() < deadline:
        time.sleep(0.2)
    left = subprocess.run(["pgrep", "-f", str(session)], capture_output=True, text=True).stdout.split()
    print("exit", e.code, "session", session, "left", len(left))
"""


def test_a_check_that_fails_after_the_node_started_leaves_no_ray_process(tmp_path, tiny_model_dir):
    """The prompt-length check runs after Ray's node started: it refuses the data, and every process
    of that Ray session is gone when the command returns."""
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"id": str(i), "problem": "What is one plus one? " * 40, "answer": "2"}) + "\n"
                            for i in range(8)))
    args = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(tmp_path / "run"),
            "--device", "cpu", "--preset", "cpu-tiny", "--prompts-per-step", "4", "--max-prompt-len", "32"]
    proc = subprocess.run([sys.executable, "-c", FAILING_CHECK, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("exit ")), None)
    assert line is not None, proc.stdout + proc.stderr
    code, session, left = line.split()[1], line.split()[3], line.split()[5]
    assert code == "2" and "prompts are longer than --max-prompt-len 32" in proc.stderr
    assert session.startswith("session_")  # the node had started before the check failed
    assert left == "0"
    assert not (tmp_path / "run").exists()


def _children(pid):
    """(pid, command line) of PID's child processes, from /proc."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append((int(entry.name), [a.decode() for a in cmdline if a]))
    return out


def _is_rays_agent(cmd):
    """Ray's dashboard agent, by its command line or the title it gives itself."""
    return any(a.endswith(os.path.join("dashboard", "agent.py")) or a == "ray::DashboardAgent" for a in cmd)


def _is_stand_in(cmd):
    return any(a.endswith("ray_agent_stand_in.py") for a in cmd)


@contextlib.contextmanager
def _early_node_with_a_task_run():
    """An early node taken by `ray.init`, after a task ran on it: (the node, its raylet's children)."""
    import ray
    from ray._private import ray_constants

    early = early_ray.start(training.local_node_kwargs("cpu", 1))
    assert early.ready()
    raylet = early.node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process
    early.init(training.local_node_kwargs("cpu", 1))
    try:
        assert ray.get(ray.remote(lambda: 7).remote()) == 7
        yield early.node, _children(raylet.pid)
    finally:
        ray.shutdown()
        early.release()


def test_the_raylet_runs_the_agent_stand_in_and_takes_its_ports(tmp_path):
    """The raylet of the early node starts openrlhf_patch/cpu/ray_agent_stand_in.py, not Ray's dashboard agent;
    it takes the stand-in's "-1" ports (Ray's services off), runs tasks, and the stand-in ends with it."""
    with _early_node_with_a_task_run() as (node, children):
        stand_ins = [pid for pid, cmd in children if _is_stand_in(cmd)]
        assert len(stand_ins) == 1
        assert not any(_is_rays_agent(cmd) for _, cmd in children), children
        for name in ("metrics_agent_port", "metrics_export_port", "dashboard_agent_listen_port"):
            assert (Path(node.get_session_dir_path()) / f"{name}_{node.node_id}").read_text() == "-1"
    deadline = time.time() + 10
    while Path(f"/proc/{stand_ins[0]}").exists() and time.time() < deadline:
        time.sleep(0.2)
    assert not Path(f"/proc/{stand_ins[0]}").exists() or "Z" in Path(f"/proc/{stand_ins[0]}/stat").read_text().split()[2]


def test_the_stand_in_is_used_only_with_the_ray_it_speaks():
    import ray

    assert [early_ray.stand_in_speaks_ray(v) for v in ("2.55.0", "2.55.1", "2.56.0", "2.5.5", "3.0.0")] == \
        [True, True, False, False, False]
    assert early_ray.stand_in_speaks_ray(ray.__version__)  # the installed Ray: re-check the stand-in when it moves


def test_with_another_ray_the_raylet_runs_rays_own_agent(monkeypatch, capfd):
    """A Ray release the stand-in is not known to fit keeps Ray's dashboard agent, and the node works."""
    monkeypatch.setattr(early_ray, "_ray_version", lambda: "2.99.0")
    with _early_node_with_a_task_run() as (_, children):
        assert any(_is_rays_agent(cmd) for _, cmd in children), children
        assert not any(_is_stand_in(cmd) for _, cmd in children)
    assert "[ngrpo] Ray 2.99.0: its own dashboard agent runs" in capfd.readouterr().err


def test_the_agent_flag_keeps_the_agents_arguments():
    flag = early_ray.DASHBOARD_AGENT_FLAG + subprocess.list2cmdline(
        ["/venv/bin/python", "-u", "/venv/ray/dashboard/agent.py", "--node-id=ab12", "--session-dir=/tmp/s x"])
    stand_in = "/repo/openrlhf_patch/cpu/ray_agent_stand_in.py"
    command = early_ray._with_stand_in(flag, stand_in)[len(early_ray.DASHBOARD_AGENT_FLAG):]
    import shlex
    assert shlex.split(command) == [sys.executable, "-S", stand_in, "--node-id=ab12", "--session-dir=/tmp/s x"]


@pytest.mark.pipeline
def test_a_run_leaves_nothing_of_vllm_in_the_temp_folder(tiny_runs):
    """vLLM's engines put a FileStore file (vllm_dist_*) and ZMQ sockets in the temp folder and left
    them when the run ended (~5 a run); a CPU run's engines now get a folder of their own, removed
    at the end. The shared runs ran with a TMPDIR of their own."""
    for name in ("ngrpo", "grpo"):
        left = left_in_tmp(tiny_runs[name])
        assert [(kind, n) for kind, n in left if kind == "socket" or n.startswith("vllm_dist_")] == []
        # what is left is torch's own cache folder (torchinductor_<user>), kept across runs by design
        assert all(kind == "dir" and n.startswith("torchinductor_") for kind, n in left)
