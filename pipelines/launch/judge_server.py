"""SGPO's step judge, started by ngrpo itself: `ngrpo train --algo sgpo --judge-model MODEL` without
`--judge-url` serves MODEL with vLLM's OpenAI-compatible server for the length of the launch.

The server runs on the driver's node, bound to 127.0.0.1 (nothing beyond this machine can reach
it), in a process group of its own, its output in RUN_DIR/logs/judge-N.log. The launch waits for
its /v1/models to answer (or for it to die, with the end of its log as the error) and hands the
URL to the workers; the server is stopped when the launch ends, however it ends. A resume starts a
new one. On a GPU node it takes JUDGE_GPU_SHARE of the GPU's memory beside the run's own engines.
A run on several nodes is refused it before anything starts (ngrpo train): the trainer that
calls the judge may sit on a node that cannot reach this one's loopback.
"""
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

START_TIMEOUT_S = 600.0   # vLLM on a CPU: ~50 s for SmolLM2-135M; a larger judge loads longer
JUDGE_GPU_SHARE = 0.2
JUDGE_CPU_KV_GIB = "1"
VLLM_SERVER_MODULE = "vllm.entrypoints.openai.api_server"


class JudgeServerError(RuntimeError):
    """The judge could not be started; the message quotes its log."""


def server_command(model_path: str, served_name: str, port: int, device: str, max_model_len: int) -> list:
    cmd = [sys.executable, "-m", VLLM_SERVER_MODULE, "--model", str(model_path), "--served-model-name", served_name,
           "--host", "127.0.0.1", "--port", str(port), "--max-model-len", str(max_model_len)]
    if device == "cpu":
        cmd += ["--dtype", "bfloat16", "--enforce-eager"]
    else:
        cmd += ["--gpu-memory-utilization", str(JUDGE_GPU_SHARE)]
    return cmd


def server_env(device: str) -> dict:
    env = dict(os.environ)
    if device == "cpu":
        from openrlhf_patch.cpu import speedups
        from openrlhf_patch.cpu.cpu_mode import VLLM_CPU_ENV

        env.update({"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": JUDGE_CPU_KV_GIB})
        if speedups.on("cpu-env"):
            env.update(VLLM_CPU_ENV)
    return env


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/models", timeout=5) as response:
            return response.status == 200 and "data" in json.loads(response.read())
    except (OSError, ValueError):
        return False


def _tail(path: Path, lines: int = 15) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return "".join(text.splitlines(keepends=True)[-lines:])


def wait_until_ready(url: str, proc: subprocess.Popen, log_path: Path, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not _ready(url):
        if proc.poll() is not None:
            raise JudgeServerError(f"the SGPO judge server exited with {proc.returncode} while starting; "
                                   f"its log is {log_path}, ending:\n{_tail(log_path)}")
        if time.monotonic() > deadline:
            raise JudgeServerError(f"the SGPO judge server did not answer at {url} within {timeout:.0f} s; "
                                   f"its log is {log_path}, ending:\n{_tail(log_path)}")
        time.sleep(1.0)


def stop(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM to the server's process group, SIGKILL after GRACE seconds."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def serving(patch_config, run_dir, model_path_of=None):
    """PATCH_CONFIG, with the URL of a judge started here when SGPO is on without --judge-url; the
    judge stops when the block ends. MODEL_PATH_OF maps --judge-model to a local model folder
    (pipelines.models.resolve_model by default)."""
    sgpo = dict(patch_config.sgpo or {})
    if not sgpo or sgpo.get("url"):
        yield patch_config
        return
    if model_path_of is None:
        from pipelines.models import resolve_model

        def model_path_of(spec):
            return resolve_model(spec, allow_run_dir=True).path
    from pipelines.console import next_log_path

    from pipelines.launch.warmup import _free_port  # the warm-up's loopback port helper

    port, device = _free_port(), patch_config.device
    log_path = next_log_path(run_dir, "judge")
    cmd = server_command(model_path_of(sgpo["model"]), sgpo["model"], port, device, max_model_len=4096)
    print(f"[ngrpo] starting the SGPO judge ({sgpo['model']}) with vLLM's OpenAI server on 127.0.0.1:{port}; "
          f"its log: {log_path}", file=sys.stderr, flush=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=server_env(device), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}/v1"
        wait_until_ready(url, proc, log_path)
        yield dataclasses.replace(patch_config, sgpo={**sgpo, "url": url})
    finally:
        stop(proc)
