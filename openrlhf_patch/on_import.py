"""Patches that run when their module is imported, so that a process patches only what it uses.

Ray runs ngrpo's worker hook when a worker process starts, before the worker knows which actor it
will host. Patching every module there made every worker import all of OpenRLHF's trainer: the
vLLM rollout actor imported DeepSpeed and the PPO actor code, the DeepSpeed policy actor vLLM's
engine arguments (seconds of CPU and ~100 MB each, while the actors start side by side).

`when_imported(name, patch)` calls PATCH(module) at once when NAME is already imported, else right
after the module's own code has run and before the import that loaded it returns, so a name that
another module imports from it (`from m import f`) is already the patched one.
"""
import importlib.abc
import sys
import threading
from typing import Callable, Dict, List

_pending: Dict[str, List[Callable]] = {}
_lock = threading.RLock()


def when_imported(name: str, patch: Callable) -> None:
    with _lock:
        module = sys.modules.get(name)
        if module is None:
            if not any(isinstance(f, _PatchingFinder) for f in sys.meta_path):
                sys.meta_path.insert(0, _PatchingFinder())
            _pending.setdefault(name, []).append(patch)
            return
    patch(module)


def pending() -> List[str]:
    """Modules with patches waiting for their import (for tests and probes)."""
    with _lock:
        return sorted(_pending)


class _PatchingFinder(importlib.abc.MetaPathFinder):
    """Finds a waiting module with the finders after it and wraps its loader; declines the rest."""

    def find_spec(self, name, path=None, target=None):
        if name not in _pending:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _PatchingLoader(spec.loader, name)
                return spec
        return None


class _PatchingLoader(importlib.abc.Loader):
    """The module's own loader, then its patches."""

    def __init__(self, loader, name):
        self._loader, self._name = loader, name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        with _lock:
            patches = _pending.pop(self._name, [])
        # a module may put another object in its place in sys.modules while it runs
        module = sys.modules.get(self._name, module)
        for patch in patches:
            patch(module)

    def __getattr__(self, attr):  # get_source, get_resource_reader, ... as the real loader has them
        return getattr(self._loader, attr)
