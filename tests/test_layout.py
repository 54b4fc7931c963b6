"""The layout's rules (docs/DESIGN.md "Layout"): the pure algorithm loads no training stack, the
patch never imports the pipelines above it, and no function outside the tests runs past 80 lines."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CODE_DIRS = ("ngrpo_cli", "openrlhf_patch", "pipelines", "benchmarks", "examples", "docs", ".ci")
MAX_FUNCTION_LINES = 80


def _python_files(*dirs):
    for d in dirs:
        for path in sorted((REPO / d).rglob("*.py")):
            if "cpu_stubs" not in path.parts:  # stand-ins for GPU-only packages, named as upstream names them
                yield path


def _imported_modules(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module


@pytest.mark.parametrize("module", ["openrlhf_patch.algorithms", "openrlhf_patch.config"])
def test_the_pure_algorithm_loads_no_training_stack(module):
    code = (f"import sys, {module}\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'openrlhf', 'ray', 'vllm', 'deepspeed', 'transformers', 'pipelines', 'ngrpo_cli'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_the_patch_never_imports_the_pipelines_or_the_cli():
    upward = []
    for path in _python_files("openrlhf_patch"):
        for name in _imported_modules(ast.parse(path.read_text())):
            if name.split(".")[0] in ("pipelines", "ngrpo_cli"):
                upward.append(f"{path.relative_to(REPO)} imports {name}")
    assert upward == []


def test_the_scan_sees_an_upward_import(tmp_path):
    # the rule above must be able to fail: an import inside a function counts too
    tree = ast.parse("def f():\n    from pipelines.reward import x\n")
    assert list(_imported_modules(tree)) == ["pipelines.reward"]


def test_no_function_outside_the_tests_is_over_80_lines():
    long = []
    for path in _python_files(*CODE_DIRS):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []


def test_cpu_mode_lives_in_its_own_subpackage():
    # CPU-only surgery, the private Ray node's included, sits under openrlhf_patch/cpu/; nothing
    # outside it and the CLI's launch path names a CPU-only module.
    cpu = {p.stem for p in (REPO / "openrlhf_patch" / "cpu").glob("*.py")} - {"__init__"}
    assert {"cpu_mode", "cpu_layout", "cpu_vllm_worker", "vllm_engine_thread", "tokenizer_once", "early_ray",
            "ray_agent_stand_in"} <= cpu
    top = {p.stem for p in (REPO / "openrlhf_patch").glob("*.py")} | {p.stem for p in (REPO / "pipelines").glob("*.py")}
    assert not (cpu & top)
