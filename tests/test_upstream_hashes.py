"""openrlhf_patch/upstream.py COPIES: the OpenRLHF bodies ngrpo carries a copy of are hashed, and a
changed upstream source stops the driver (`check`) and a worker importing the module (`checked`),
naming the function and the ngrpo copy to port again."""
import importlib
import inspect
import re
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from openrlhf_patch.cpu import cpu_mode
from openrlhf_patch import on_import, upstream

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def openrlhf_importable():
    cpu_mode.ensure_flash_attn_importable()  # OpenRLHF imports flash_attn at module level


def test_the_hashes_match_the_installed_openrlhf():
    assert upstream.changed() == []
    upstream.check()  # what install.apply runs in the driver


def test_the_hashed_text_is_inspect_getsource_of_the_unpatched_function():
    """sha256 of inspect.getsource, dedented, trailing whitespace stripped; read from the module's
    file, so that ngrpo's own patches of these functions (and a second worker check after them)
    do not count as an upstream change."""
    compared = 0
    for copy in upstream.COPIES:
        obj = importlib.import_module(copy.module)
        for part in copy.qualname.split("."):
            obj = getattr(obj, part)
        obj = inspect.unwrap(obj)
        if obj.__module__ != copy.module:  # replaced by ngrpo in this process (another test applied the patch)
            continue
        compared += 1
        text = inspect.getsource(obj)
        assert upstream.installed_source(copy.module, copy.qualname) == text
        assert upstream.source_sha256(text) == copy.sha256
        assert upstream.normalised_source(text) == "\n".join(
            line.rstrip() for line in textwrap.dedent(text).splitlines()) + "\n"
    assert compared >= len(upstream.COPIES) - 3  # is_vlm_model too, once remote_code.py replaced it


def test_every_copy_names_ngrpo_code_that_exists():
    for copy in upstream.COPIES:
        path, names = copy.ngrpo.split(": ", 1)
        text = (REPO_ROOT / path).read_text()
        first = re.match(r"[\w.]+", names).group(0)
        assert f"def {first.split('.')[-1]}" in text, copy


def test_the_copies_table_lists_the_two_hook_copies():
    names = {(c.module, c.qualname): c.ngrpo for c in upstream.COPIES}
    assert names[("openrlhf.trainer.ppo_utils.experience_maker",
                  "RemoteExperienceMaker.compute_advantages_and_returns")] == "openrlhf_patch/advantages.py: _core_advantages"
    assert names[("openrlhf.trainer.ppo_utils.samples_generator", "SamplesGenerator._generate_vllm")] == \
        "openrlhf_patch/sampling.py: make_generate_vllm"


# ------------------------------------------------------------------ a changed upstream


@pytest.fixture
def package(tmp_path, monkeypatch):
    """A fresh package on sys.path (its name unique, so no other test has imported it)."""
    name = f"hashes_{uuid.uuid4().hex[:8]}"
    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name, tmp_path / name
    for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[mod]


def _experience_maker_with(package, old, new, stem="experience_maker") -> str:
    """OpenRLHF's experience_maker.py, installed as PACKAGE.STEM with OLD replaced by NEW."""
    from openrlhf.trainer.ppo_utils import experience_maker

    name, folder = package
    text = inspect.getsource(experience_maker)
    assert text.count(old) == 1
    (folder / f"{stem}.py").write_text(text.replace(old, new))
    return f"{name}.{stem}"


COMPUTE_ADVANTAGES = next(c for c in upstream.COPIES if c.qualname.endswith("compute_advantages_and_returns"))


def test_a_changed_upstream_body_fails_naming_the_function_and_the_copy(package):
    """One constant of group_norm changed, the name still there: the check names the function,
    says its source changed, and which copy of ngrpo to port again."""
    module = _experience_maker_with(package, "(rewards.std(-1, keepdim=True) + 1e-9)",
                                    "(rewards.std(-1, keepdim=True) + 1e-6)")
    copy = COMPUTE_ADVANTAGES._replace(module=module)
    with pytest.raises(upstream.UpstreamMismatch) as err:
        upstream.check(symbols=[], copies=[copy])
    message = str(err.value)
    assert f"{module}: RemoteExperienceMaker.compute_advantages_and_returns: the upstream source changed" in message
    assert "port ngrpo's copy in openrlhf_patch/advantages.py: _core_advantages again" in message
    # a change elsewhere in the module (another method) leaves this copy's hash alone
    unrelated = _experience_maker_with(package, "Calculated as in the original PPO paper",
                                       "Calculated as in the PPO paper", stem="unrelated_change")
    assert upstream.changed([COMPUTE_ADVANTAGES._replace(module=unrelated)]) == []


def test_whitespace_and_indentation_do_not_count():
    text = inspect.getsource(upstream.normalised_source)
    moved = "\n".join("    " + line + "   " for line in text.splitlines()) + "\n\n"
    assert upstream.source_sha256(moved) == upstream.source_sha256(text)
    assert upstream.source_sha256(text.replace("rstrip", "strip")) != upstream.source_sha256(text)


def test_check_reports_a_vanished_name_and_a_changed_body_together(package, monkeypatch):
    module = _experience_maker_with(package, "rewards = rewards - rewards.mean()", "rewards = rewards * 1.0")
    monkeypatch.setattr(upstream, "SYMBOLS", upstream.SYMBOLS + (upstream.Symbol(module, "Gone", "called"),))
    monkeypatch.setattr(upstream, "COPIES", upstream.COPIES + (
        COMPUTE_ADVANTAGES._replace(module=module),
        COMPUTE_ADVANTAGES._replace(module=module, qualname="RemoteExperienceMaker.vanished")))
    with pytest.raises(upstream.UpstreamMismatch) as err:
        upstream.check()
    message = str(err.value)
    assert f"{module}: Gone (called; AttributeError)" in message
    assert f"{module}: RemoteExperienceMaker.compute_advantages_and_returns: the upstream source changed" in message
    assert f"{module}: RemoteExperienceMaker.vanished: {module} defines no RemoteExperienceMaker.vanished" in message
    assert message.count("openrlhf_patch/advantages.py: _core_advantages") == 2


def test_a_worker_stops_at_a_changed_body_when_it_imports_the_module(package, monkeypatch):
    """upstream.checked: the module's copies are checked before its patch runs, and a patch that
    replaces a hashed function in place does not trip a later check of the same module."""
    name, folder = package
    (folder / "m.py").write_text("class C:\n    def f(self):\n        return 1\n")
    digest = upstream.source_sha256("def f(self):\n    return 1\n")
    entry = upstream.Copy(f"{name}.m", "C.f", "openrlhf_patch/advantages.py: _core_advantages", digest)
    monkeypatch.setattr(upstream, "COPIES", upstream.COPIES + (entry,))
    patched = []

    def replace_f(module):
        module.C.f = lambda self: 2
        patched.append(module.__name__)

    on_import.when_imported(f"{name}.m", upstream.checked(f"{name}.m", replace_f))
    on_import.when_imported(f"{name}.m", upstream.checked(f"{name}.m", lambda module: patched.append("second")))
    assert importlib.import_module(f"{name}.m").C().f() == 2 and patched == [f"{name}.m", "second"]

    (folder / "n.py").write_text("class C:\n    def f(self):\n        return 3\n")
    monkeypatch.setattr(upstream, "COPIES", upstream.COPIES + (entry._replace(module=f"{name}.n"),))
    on_import.when_imported(f"{name}.n", upstream.checked(f"{name}.n", patched.append))
    with pytest.raises(upstream.UpstreamMismatch, match=rf"{name}\.n: C\.f: the upstream source changed"):
        importlib.import_module(f"{name}.n")
    assert patched == [f"{name}.m", "second"]
