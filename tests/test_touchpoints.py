"""openrlhf_patch/touchpoints.py: the one table of ngrpo's touches of upstream libraries.

  * an AST scan of openrlhf_patch/, pipelines/ and ngrpo_cli/ finds every assignment (and setattr /
    delattr) to an attribute of an upstream module or class, and each must be in the table at its
    site, and none is left: every patch goes through `touchpoints.patch`, `patched` or `reset`;
  * every target resolves in the installed stack, every copy's source hash matches;
  * docs/UPSTREAM.md is the table rendered;
  * `patch`, `undo`, `patched`, `resolve` and `check` on stand-in modules.
"""
import ast
import subprocess
import sys
import textwrap
import types
import uuid
from pathlib import Path

import pytest

from openrlhf_patch import touchpoints
from openrlhf_patch.touchpoints import Touchpoint, TouchpointError

REPO_ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("openrlhf_patch", "pipelines", "ngrpo_cli")
UPSTREAM_ROOTS = ("openrlhf", "vllm", "ray", "torch", "deepspeed", "transformers", "datasets", "huggingface_hub")
HERE = "openrlhf_patch/touchpoints.py"


# ------------------------------------------------------------------------------------------------
# The AST scan
# ------------------------------------------------------------------------------------------------
def _upstream(dotted):
    return dotted is not None and dotted.split(".")[0] in UPSTREAM_ROOTS


class _Scope:
    def __init__(self, node, parent, site):
        self.node, self.parent, self.site = node, parent, site
        self.names = {}  # local name -> dotted upstream path

    def lookup(self, name):
        scope = self
        while scope is not None:
            if name in scope.names:
                return scope.names[name]
            scope = scope.parent
        return None


def _site_name(stack):
    """Class.method or function; a function nested in a function is its outer one (as
    touchpoints._caller_site names it)."""
    names = []
    for node in stack:
        names.append(node.name)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            break
    return ".".join(names)


def scan_file(path: Path):
    """[(file, site, dotted target, line, how)] for every assignment, augmented assignment, del,
    setattr or delattr whose object is an upstream module or class (or an instance name bound to
    one). Names are bound by imports, by `x = <upstream>.attr`, by the parameter of an on-import
    patch registered for an upstream module ({"mod": f}, when_imported("mod", f)), and by calls to
    a function of the same file with an upstream object."""
    rel = path.relative_to(REPO_ROOT).as_posix() if path.is_relative_to(REPO_ROOT) else path.name
    tree = ast.parse(path.read_text())
    constants = {n.targets[0].id: n.value.value for n in tree.body
                 if isinstance(n, ast.Assign) and len(n.targets) == 1 and isinstance(n.targets[0], ast.Name)
                 and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)}
    scopes, functions = {}, {}

    def build(node, parent, stack):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                scope = _Scope(child, parent, _site_name(stack + [child]))
                scopes[child] = scope
                if not isinstance(child, ast.ClassDef):
                    functions.setdefault(child.name, []).append(child)
                build(child, scope, stack + [child])
            else:
                build(child, parent, stack)

    module_scope = _Scope(tree, None, "<module>")
    scopes[tree] = module_scope
    build(tree, module_scope, [])

    def owner_scope(node):
        # the innermost scope whose body holds NODE
        best = module_scope
        for scope_node, scope in scopes.items():
            if scope_node is tree:
                continue
            if scope_node.lineno <= node.lineno <= scope_node.end_lineno and (
                    best is module_scope or scope_node.lineno >= best.node.lineno):
                best = scope
        return best

    def dotted(expr, scope):
        if isinstance(expr, ast.Name):
            return scope.lookup(expr.id)
        if isinstance(expr, ast.Attribute):
            base = dotted(expr.value, scope)
            return f"{base}.{expr.attr}" if base else None
        return None

    def key_string(expr):
        if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
            return expr.value
        if isinstance(expr, ast.Name):
            return constants.get(expr.id)
        return None

    def bind_param(func_name, index, path_):
        changed = False
        for fn in functions.get(func_name, []):
            params = fn.args.posonlyargs + fn.args.args
            if index < len(params) and scopes[fn].names.get(params[index].arg) != path_:
                scopes[fn].names[params[index].arg] = path_
                changed = True
        return changed

    nodes = list(ast.walk(tree))
    located = [(n, owner_scope(n)) for n in nodes if hasattr(n, "lineno")]
    for _ in range(6):  # to a fixpoint: bindings feed each other
        changed = False
        for node, scope in located:
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if _upstream(alias.name):
                        name, path_ = (alias.asname, alias.name) if alias.asname else (alias.name.split(".")[0],
                                                                                       alias.name.split(".")[0])
                        changed |= scope.names.get(name) != path_
                        scope.names[name] = path_
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and _upstream(node.module):
                for alias in node.names:
                    name, path_ = alias.asname or alias.name, f"{node.module}.{alias.name}"
                    changed |= scope.names.get(name) != path_
                    scope.names[name] = path_
            elif isinstance(node, ast.Assign) and len(node.targets) == 1:
                target, value = node.targets[0], node.value
                pairs = (zip(target.elts, value.elts) if isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple)
                         and len(target.elts) == len(value.elts) else [(target, value)])
                for t, v in pairs:
                    path_ = dotted(v, scope)
                    if isinstance(t, ast.Name) and path_ and scope.names.get(t.id) != path_:
                        scope.names[t.id] = path_
                        changed = True
            elif isinstance(node, ast.Dict):
                for k, v in zip(node.keys, node.values):
                    key = key_string(k) if k is not None else None
                    if _upstream(key) and isinstance(v, ast.Name):
                        changed |= bind_param(v.id, 0, key)
            elif isinstance(node, ast.Call):
                key = key_string(node.args[0]) if node.args else None
                via_table = isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name) \
                    and node.func.value.id == "touchpoints"  # touchpoints.patch("mod.attr", value): not an on-import hook
                if _upstream(key) and len(node.args) > 1 and isinstance(node.args[1], ast.Name) and not via_table:
                    changed |= bind_param(node.args[1].id, 0, key)  # when_imported("mod", patch)
                if isinstance(node.func, ast.Name) and node.func.id in functions:
                    for i, arg in enumerate(node.args):
                        path_ = dotted(arg, scope)
                        if path_:
                            changed |= bind_param(node.func.id, i, path_)
        if not changed:
            break

    def loop_values(name_node, at):
        """The string values a loop variable takes (`for name in ("a", "b")`)."""
        for node in nodes:
            if isinstance(node, ast.For) and isinstance(node.target, ast.Name) and node.target.id == name_node.id \
                    and node.lineno <= at.lineno <= node.end_lineno and isinstance(node.iter, (ast.Tuple, ast.List)):
                return [e.value for e in node.iter.elts if isinstance(e, ast.Constant)]
        return None

    found = []
    for node, scope in located:
        targets, how = [], "assign"
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        elif isinstance(node, ast.Delete):
            targets, how = node.targets, "del"
        for target in targets:
            for t in (target.elts if isinstance(target, ast.Tuple) else [target]):
                if isinstance(t, ast.Attribute):
                    base = dotted(t.value, scope)
                    if _upstream(base):
                        found.append((rel, scope.site, f"{base}.{t.attr}", node.lineno, how))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("setattr", "delattr") \
                and len(node.args) >= 2:
            base = dotted(node.args[0], scope)
            if _upstream(base):
                name = key_string(node.args[1])
                names = [name] if name else (loop_values(node.args[1], node) if isinstance(node.args[1], ast.Name)
                                             else None) or ["<dynamic>"]
                for n in names:
                    found.append((rel, scope.site, f"{base}.{n}", node.lineno, node.func.id))
    return found


def scan():
    out = []
    for package in SCANNED:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            if "cpu_stubs" in path.parts or path.relative_to(REPO_ROOT).as_posix() == HERE:
                continue
            out.extend(scan_file(path))
    return out


PATCHES_THE_SCAN_MUST_FIND = """
import ray
from openrlhf.trainer import ppo_trainer
from ray._private import node as ray_node

def run_trainer_in_driver():
    ppo_trainer.PPOTrainer = object()                      # a module attribute, imported by name

def _patch_actor(ppo_actor):                               # an on-import patch: its parameter
    ppo_actor.ActorPPOTrainer.broadcast_to_vllm = None

def patches():
    def patch_vllm(async_llm):
        async_llm.AsyncLLM.generate = None
    return {"vllm.v1.engine.async_llm": patch_vllm, "openrlhf.trainer.ray.ppo_actor": _patch_actor}

class EarlyNode:
    def _start(self):
        from ray._private import worker
        for name in ("connect", "disconnect"):
            setattr(worker, name, None)                    # setattr with a loop variable
        delattr(worker, "connect")

def _builds(make):
    build = ray_node.Node                                  # a local name bound to an upstream class
    ray_node.Node, ray.is_initialized = make(build), None  # a tuple target

def untouched(config):
    config.disable = True                                  # not an upstream object: not reported
"""


def test_the_scan_finds_known_patches(tmp_path):
    """The scanner itself, on a file of the patterns ngrpo used before every patch went through
    the table: imports, on-import patch functions, local names, setattr/delattr, tuple targets."""
    path = tmp_path / "patches.py"
    path.write_text(PATCHES_THE_SCAN_MUST_FIND)
    found = sorted((site, target, how) for _, site, target, _, how in scan_file(path))
    assert found == sorted([
        ("run_trainer_in_driver", "openrlhf.trainer.ppo_trainer.PPOTrainer", "assign"),
        ("_patch_actor", "openrlhf.trainer.ray.ppo_actor.ActorPPOTrainer.broadcast_to_vllm", "assign"),
        ("patches", "vllm.v1.engine.async_llm.AsyncLLM.generate", "assign"),
        ("EarlyNode._start", "ray._private.worker.connect", "setattr"),
        ("EarlyNode._start", "ray._private.worker.disconnect", "setattr"),
        ("EarlyNode._start", "ray._private.worker.connect", "delattr"),
        ("_builds", "ray._private.node.Node", "assign"),
        ("_builds", "ray.is_initialized", "assign"),
    ])


def test_every_assignment_to_an_upstream_attribute_is_in_the_table():
    found = scan()
    listed = {(e.site, e.target) for e in touchpoints.TOUCHPOINTS if e.how in ("replace", "wrap", "read")}
    outside = sorted({(f"{rel}:{site}", target) for rel, site, target, _, _ in found} - listed)
    print(f"\n{len(found)} assignments to upstream attributes; outside the table:")
    for site, target in outside:
        print(f"  {site}: {target}")
    assert outside == [], "add these to openrlhf_patch/touchpoints.py TOUCHPOINTS (or stop patching them)"


def patch_calls():
    """[(file:site, target)] of every touchpoints.patch/patched call with a literal target."""
    out = []
    for package in SCANNED:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            rel = path.relative_to(REPO_ROOT).as_posix()
            tree = ast.parse(path.read_text())
            stack = []

            def visit(node):
                named = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                if named:
                    stack.append(node)
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr in ("patch", "patched", "reset") and isinstance(node.func.value, ast.Name)
                        and node.func.value.id == "touchpoints" and node.args):
                    arg = node.args[0]
                    if isinstance(arg, ast.Constant):
                        out.append((f"{rel}:{_site_name(stack)}", arg.value))
                    elif isinstance(arg, ast.JoinedStr):  # f"torch.cuda.{name}": the literal prefix
                        out.append((f"{rel}:{_site_name(stack)}", "".join(
                            v.value for v in arg.values if isinstance(v, ast.Constant)) + "*"))
                for child in ast.iter_child_nodes(node):
                    visit(child)
                if named:
                    stack.pop()

            visit(tree)
    return out


def test_every_touchpoints_patch_call_names_an_entry_of_its_site():
    calls = patch_calls()
    assert ("openrlhf_patch/cpu/cpu_mode.py:patch_torch_cuda", "torch.cuda.current_device") in calls
    entries = {(e.site, e.target) for e in touchpoints.TOUCHPOINTS if e.how in ("replace", "wrap")}
    for site, target in calls:
        if target.endswith("*"):
            assert any(s == site and t.startswith(target[:-1]) for s, t in entries), (site, target)
        else:
            assert (site, target) in entries, (site, target)


def test_upstream_attributes_are_assigned_only_through_touchpoints_patch():
    direct = [f"{rel}:{line} ({site}): {how} {target}" for rel, site, target, line, how in scan()]
    print(f"\n{len(direct)} direct assignments:\n  " + "\n  ".join(direct))
    assert direct == []


# ------------------------------------------------------------------------------------------------
# The table itself
# ------------------------------------------------------------------------------------------------
def _definition(path: Path, qualname: str):
    from openrlhf_patch.upstream import _definition as in_tree

    return in_tree(ast.parse(path.read_text()), qualname)


def test_entries_are_unique_and_their_sites_exist():
    keys = [(e.target, e.site, e.how) for e in touchpoints.TOUCHPOINTS]
    assert len(keys) == len(set(keys))
    for e in touchpoints.TOUCHPOINTS:
        path, qualname = e.site.split(":", 1)
        assert (REPO_ROOT / path).is_file(), e.site
        assert _definition(REPO_ROOT / path, qualname) is not None, f"{e.site} defines no {qualname}"
        assert e.why and "\n" not in e.why
        assert touchpoints.version_checked(e, e.checked_on.split(",")[0].strip())


def test_the_table_holds_every_name_of_upstream_py():
    """openrlhf_patch/upstream.py's SYMBOLS and COPIES (the OpenRLHF list before this table)."""
    from openrlhf_patch import upstream

    targets = {e.target.split("(")[0] for e in touchpoints.TOUCHPOINTS}
    missing = [f"{s.module}.{s.attribute}" for s in upstream.SYMBOLS if f"{s.module}.{s.attribute}" not in targets]
    assert missing == []
    copies = {e.target: e.sha256 for e in touchpoints.TOUCHPOINTS if e.how == "copy"}
    for c in upstream.COPIES:
        assert copies.get(f"{c.module}.{c.qualname}") == c.sha256, c


def test_the_module_imports_no_upstream_library():
    code = ("import sys, openrlhf_patch.touchpoints as t; t.render_markdown(); "
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({UPSTREAM_ROOTS!r})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_docs_upstream_md_is_the_rendered_table():
    doc = REPO_ROOT / "docs" / "UPSTREAM.md"
    assert doc.read_text() == touchpoints.render_markdown(), \
        "regenerate: python -m openrlhf_patch.touchpoints > docs/UPSTREAM.md"


# ------------------------------------------------------------------------------------------------
# The installed stack
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stack():
    from openrlhf_patch.cpu import cpu_mode

    cpu_mode.ensure_flash_attn_importable()  # OpenRLHF imports flash_attn at module level


def test_every_target_resolves_in_the_installed_stack(stack):
    problems = []
    for e in touchpoints.TOUCHPOINTS:
        if e.how == "env":
            continue
        try:
            touchpoints.resolve(e.target)
        except TouchpointError as err:
            problems.append(f"{e.site}: {err}")
    assert problems == []


def test_every_copy_hash_matches_and_check_all_passes(stack):
    for e in touchpoints.select():
        if e.how == "copy":
            assert touchpoints.source_sha256(touchpoints.installed_source(e.target)) == e.sha256, e.target
    warnings = touchpoints.check_all()
    print("\n".join(warnings))


def test_the_ray_agent_stand_in_writes_the_port_files_ray_waits_for(stack):
    import ray._raylet as raylet

    from openrlhf_patch.cpu import ray_agent_stand_in

    assert set(ray_agent_stand_in.PORT_FILES) == {raylet.METRICS_AGENT_PORT_NAME, raylet.METRICS_EXPORT_PORT_NAME,
                                                  raylet.DASHBOARD_AGENT_LISTEN_PORT_NAME}


# ------------------------------------------------------------------------------------------------
# resolve, check, patch on stand-in modules
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A fresh package `NAME` with a module `mod` (a function, a class with a method and an
    instance field, a function with a nested class, a function taking **kwargs)."""
    name = f"touch_{uuid.uuid4().hex[:8]}"
    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text("")
    (tmp_path / name / "mod.py").write_text(textwrap.dedent('''\
        CONSTANT = 1


        def f(x, *, flag=False):
            return "f"


        def g(**kwargs):
            path = "some.module.Thing"
            return kwargs.pop("_hidden", None)


        def make():
            class Inner:
                def ready(self):
                    return True
            return Inner


        class C:
            def __init__(self):
                self._field = 0

            def method(self):
                return "method"
        '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    # the suite's earlier tests may have left patches of the real stack in this process: only this
    # test's own are checked (_mine) and undone
    before = len(touchpoints.installed())
    _mine.before = before
    yield name
    touchpoints.undo_since(before)
    for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[mod]


def _mine():
    """The patches installed since the `fake` fixture started."""
    return touchpoints.installed()[_mine.before:]


def _entry(target, how="wrap", site="tests/test_touchpoints.py:test", sha256=None):
    return Touchpoint("openrlhf", target, how, "correctness", {"cpu"}, site, "a test", "0.0.1", sha256)


def test_resolve_walks_modules_attributes_fields_nested_definitions_and_keywords(fake):
    import importlib

    mod = importlib.import_module(f"{fake}.mod")
    assert touchpoints.resolve(f"{fake}.mod.f") is mod.f
    assert touchpoints.resolve(f"{fake}.mod.C.method") is mod.C.method
    assert touchpoints.resolve(f"{fake}.mod.C._field").name == "_field"  # self._field in __init__
    assert touchpoints.resolve(f"{fake}.mod.make.Inner.ready").name == "ready"
    assert touchpoints.resolve(f"{fake}.mod.f(flag)") is mod.f
    assert touchpoints.resolve(f"{fake}.mod.g(_hidden)") is mod.g  # **kwargs, read by name
    assert touchpoints.resolve(f"{fake}.mod.g('module.Thing')") is mod.g
    for target, words in [(f"{fake}.mod.h", "has no 'h'"), (f"{fake}.mod.C.gone", "has no 'gone'"),
                          (f"{fake}.mod.f(other)", "takes no keyword 'other'"),
                          (f"{fake}.mod.g('elsewhere')", "no longer holds 'elsewhere'"),
                          (f"{fake}.mod.make.Outer.ready", "has no 'Outer'"),
                          ("no_such_package_ngrpo.x", "no module")]:
        with pytest.raises(TouchpointError) as err:
            touchpoints.resolve(target)
        assert str(err.value).startswith(target.split("(")[0]) and words in str(err.value), str(err.value)


def test_check_hashes_copies_and_warns_on_other_versions(fake):
    source = touchpoints.installed_source(f"{fake}.mod.C.method")
    assert source.lstrip().startswith("def method")
    good = _entry(f"{fake}.mod.C.method", how="copy", sha256=touchpoints.source_sha256(source))
    warning = touchpoints.check(good)
    assert warning is not None and "checked on 0.0.1 only" in warning and good.site in warning
    assert touchpoints.check(dataclass_replace(good, checked_on=touchpoints.installed_version("openrlhf"))) is None
    with pytest.raises(TouchpointError, match="upstream source changed"):
        touchpoints.check(dataclass_replace(good, sha256="0" * 64))
    with pytest.raises(TouchpointError, match=r"has no 'nope'.*\(ngrpo: tests/test_touchpoints.py:test\)"):
        touchpoints.check(_entry(f"{fake}.mod.C.nope"))
    with pytest.raises(TouchpointError) as err:
        touchpoints.check_all([_entry(f"{fake}.mod.x1"), _entry(f"{fake}.mod.x2"), good])
    assert "x1" in str(err.value) and "x2" in str(err.value)


def dataclass_replace(entry, **changes):
    import dataclasses

    return dataclasses.replace(entry, **changes)


def test_patch_checks_records_undoes_and_is_idempotent(fake):
    import functools
    import importlib

    mod = importlib.import_module(f"{fake}.mod")
    original = mod.C.method
    entry = _entry(f"{fake}.mod.C.method")

    def wrap(upstream):
        @functools.wraps(upstream)
        def method(self):
            return "wrapped " + upstream(self)
        return method

    first = touchpoints.patch(entry, wrap(mod.C.method))
    assert mod.C().method() == "wrapped method"
    assert touchpoints.patch(entry, wrap(mod.C.method)) is first  # a second install is a no-op
    assert mod.C().method() == "wrapped method"
    assert touchpoints.markers(mod.C.method) == (entry.key,)
    assert _mine() == [f"{entry.target} ({entry.site})"]

    # another layer on the same name carries both markers (functools.wraps copies the first's)
    other = dataclass_replace(entry, site="tests/test_touchpoints.py:other")
    touchpoints.patch(other, wrap(mod.C.method))
    assert mod.C().method() == "wrapped wrapped method"
    assert touchpoints.markers(mod.C.method) == (entry.key, other.key)
    assert touchpoints.patch(entry, wrap(mod.C.method)) is mod.C.method  # still a no-op
    with pytest.raises(TouchpointError, match="patched again since"):
        touchpoints.undo(entry)
    touchpoints.undo(other)
    touchpoints.undo(entry)
    assert mod.C.method is original and _mine() == []

    # a constant (no attributes to mark): the record marks it
    constant = _entry(f"{fake}.mod.CONSTANT", how="replace")
    assert touchpoints.patch(constant, 2) == 2 and touchpoints.patch(constant, 2) == 2
    assert len(_mine()) == 1
    touchpoints.undo(constant)
    assert mod.CONSTANT == 1


def test_patch_refuses_missing_targets_unlisted_entries_and_wrong_owners(fake):
    import importlib

    mod = importlib.import_module(f"{fake}.mod")
    with pytest.raises(TouchpointError, match=rf"{fake}.mod.C.gone: missing"):
        touchpoints.patch(_entry(f"{fake}.mod.C.gone"), lambda self: None)
    assert not hasattr(mod.C, "gone")  # nothing was added
    with pytest.raises(TouchpointError, match="not in openrlhf_patch/touchpoints.py TOUCHPOINTS"):
        touchpoints.patch(f"{fake}.mod.C.method", lambda self: None)  # a string must name a table entry
    with pytest.raises(TouchpointError, match="is not"):
        touchpoints.patch(_entry(f"{fake}.mod.C.method"), lambda self: None, owner=types.SimpleNamespace())


def test_patch_on_an_instance_and_the_patched_block(fake):
    import importlib

    mod = importlib.import_module(f"{fake}.mod")
    obj = mod.C()
    entry = _entry(f"{fake}.mod.C.method")
    with touchpoints.patched(entry, lambda: "on the instance", owner=obj) as value:
        assert obj.method() == "on the instance" and obj.method is value
        assert mod.C().method() == "method"  # the class is untouched
        with touchpoints.patched(entry, lambda: "again", owner=obj):  # already there: no second layer
            assert obj.method() == "on the instance"
        assert obj.method() == "on the instance"
    assert "method" not in vars(obj) and obj.method() == "method"
    assert _mine() == []


def test_patch_keeps_a_lazy_module_attribute_lazy(fake):
    lazy = types.ModuleType(f"{fake}.lazy")
    lazy.__all__ = ["Heavy"]
    lazy.__getattr__ = lambda name: (_ for _ in ()).throw(AssertionError(f"{name} imported"))
    sys.modules[lazy.__name__] = lazy
    entry = _entry(f"{fake}.lazy.Heavy", how="replace")
    touchpoints.patch(entry, "stand-in", owner=lazy)
    assert lazy.Heavy == "stand-in"
    touchpoints.undo(entry)
    assert "Heavy" not in vars(lazy)


def test_a_table_entry_is_found_by_target_and_by_the_callers_site():
    entry = touchpoints.entry_for("torch.cuda.synchronize")
    assert entry.site == "openrlhf_patch/cpu/cpu_mode.py:patch_torch_cuda"
    with pytest.raises(TouchpointError, match="2 entries"):
        touchpoints.entry_for("torch.cuda.current_device")  # two sites, neither is this test
    assert touchpoints.entry_for("torch.cuda.current_device",
                                 here="openrlhf_patch/cpu/cpu_mode.py:_patch_replay_buffer").site.endswith("_patch_replay_buffer")
    with pytest.raises(ValueError, match="kind"):
        Touchpoint("torch", "torch.x", "wrap", "speed", {"cpu"}, "a.py:f", "why", "1")


def test_reinstall_puts_a_patch_with_other_parameters_in_place_of_the_first(fake):
    import importlib

    mod = importlib.import_module(f"{fake}.mod")
    original = mod.f
    entry = _entry(f"{fake}.mod.f", how="replace")

    def make(seed):
        def f(x, *, flag=False):
            return f"seed {seed}: " + touchpoints.original(entry)(x)
        return f

    touchpoints.patch(entry, make(1))
    touchpoints.patch(entry, make(2))  # the same entry: a no-op
    assert mod.f(0) == "seed 1: f"
    touchpoints.patch(entry, make(2), reinstall=True)
    assert mod.f(0) == "seed 2: f" and len(_mine()) == 1
    assert touchpoints.original(entry) is original
    touchpoints.undo(entry)
    assert mod.f is original


def test_the_callers_site_is_matched_by_the_end_of_its_path():
    entry = touchpoints.entry_for("torch.cuda.synchronize")
    assert touchpoints._at_site(entry, "/tmp/ray/session/runtime_resources/_ray_pkg_1/openrlhf_patch/cpu/cpu_mode.py:"
                                       "patch_torch_cuda")
    assert not touchpoints._at_site(entry, "/elsewhere/not_openrlhf_patch/cpu_mode.py:patch_torch_cuda")
    assert not touchpoints._at_site(entry, "/x/openrlhf_patch/cpu/cpu_mode.py:apply_cpu_patches")
