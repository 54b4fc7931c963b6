"""openrlhf_patch/on_import.py: a patch runs when its module is imported, before the importer goes
on; an imported module is patched at once; a module the process never imports is never loaded.
(That real Ray workers patch only what they import: tests/test_train_pipeline.py.)"""
import importlib
import inspect
import sys
import uuid

import pytest

from openrlhf_patch import on_import, upstream


@pytest.fixture
def package(tmp_path, monkeypatch):
    """A fresh package on sys.path with modules a (defines f), b (`from a import f`, calls it at
    import) and c, d, e; its name is unique, so no other test has imported it."""
    name = f"onimport_{uuid.uuid4().hex[:8]}"
    root = tmp_path / name
    root.mkdir()
    (root / "__init__.py").write_text("")
    (root / "a.py").write_text("def f():\n    return 'upstream'\n")
    (root / "b.py").write_text(f"from {name}.a import f\nRESULT = f()\n")
    for mod in "cde":
        (root / f"{mod}.py").write_text(f"VALUE = {mod!r}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[mod]


def test_a_patch_runs_before_the_importing_module_goes_on(package):
    on_import.when_imported(f"{package}.a", lambda module: setattr(module, "f", lambda: "patched"))
    assert f"{package}.a" in on_import.pending() and f"{package}.a" not in sys.modules
    b = importlib.import_module(f"{package}.b")
    assert b.RESULT == "patched" and b.f() == "patched"  # b imported f by name after the patch
    assert f"{package}.a" not in on_import.pending()


def test_an_imported_module_is_patched_at_once_and_an_unused_one_never(package):
    c = importlib.import_module(f"{package}.c")
    calls = []
    on_import.when_imported(f"{package}.c", lambda module: calls.append(module.VALUE))
    assert calls == ["c"]
    on_import.when_imported(f"{package}.d", lambda module: calls.append(module.VALUE))
    assert calls == ["c"] and f"{package}.d" not in sys.modules and f"{package}.d" in on_import.pending()
    assert c.VALUE == "c"


def test_a_patched_module_keeps_what_its_loader_gives(package):
    on_import.when_imported(f"{package}.a", lambda module: None)
    a = importlib.import_module(f"{package}.a")
    assert inspect.getsource(a) == "def f():\n    return 'upstream'\n"  # the real loader's get_source
    assert a.__spec__.origin.endswith(f"{package}/a.py")


def test_a_worker_checks_a_module_names_when_it_imports_it(package, monkeypatch):
    """upstream.checked: a name ngrpo relies on that the module lacks fails the import, naming it."""
    monkeypatch.setattr(upstream, "SYMBOLS", upstream.SYMBOLS + (
        upstream.Symbol(f"{package}.e", "VALUE", "called"), upstream.Symbol(f"{package}.e", "moved_away", "wrapped")))
    patched = []
    on_import.when_imported(f"{package}.e", upstream.checked(f"{package}.e", patched.append))
    with pytest.raises(upstream.UpstreamMismatch, match=rf"{package}\.e: moved_away \(wrapped; AttributeError\)"):
        importlib.import_module(f"{package}.e")
    assert patched == []
