"""Import-only stand-ins for the packages a lent GPU machine lacks (Ray, vLLM, datasets, aiohttp, PIL).

OpenRLHF's trainer modules (imported by the worker-hook test, which patches them as they load) import Ray and vLLM at
module level and use them only later, inside the run (decorators such as `@ray.remote`, names such
as `vllm.SamplingParams`). The kit can carry at most 64 MiB and Ray's wheel alone is ~74 MB, so
where (and only where) one of these is not installed, `install()` puts a module in its place that
accepts any attribute, call, subscript or subclassing. DeepSpeed, OpenRLHF, peft, transformers and
torch stay real: the CUDA question (does the hook's import chain touch the GPU?) is theirs.
With the full GPU profile installed nothing is stood in for.
"""
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

# Found by running the hook in a torch + transformers environment with the kit's wheels: these five are
# imported at module level by the OpenRLHF trainer modules and used only inside a run.
STANDIN_ROOTS = ("ray", "vllm", "datasets", "aiohttp", "PIL")


class _Anything:
    def __init__(self, name):
        self._name = name

    def __getattr__(self, attr):
        if attr.startswith("__") and attr.endswith("__"):
            raise AttributeError(attr)
        return _Anything(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        if len(args) == 1 and not kwargs and callable(args[0]):
            return args[0]  # used as a decorator (@ray.remote, @ray.remote(num_gpus=1))
        return _Anything(f"{self._name}()")

    def __getitem__(self, item):
        return self

    def __iter__(self):
        return iter(())

    def __or__(self, other):
        return self

    __ror__ = __or__

    def __mro_entries__(self, bases):
        return (object,)  # `class X(vllm.Something)` becomes a plain class

    def __repr__(self):
        return f"<stand-in {self._name}>"


class _StandInModule(types.ModuleType):
    def __getattr__(self, attr):
        if attr.startswith("__") and attr.endswith("__"):
            raise AttributeError(attr)
        return _Anything(f"{self.__name__}.{attr}")


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, roots):
        self.roots = set(roots)

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.roots:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StandInModule(spec.name)
        module.__path__ = []
        module.__ngrpo_standin__ = True
        return module

    def exec_module(self, module):
        pass


def _installed(root) -> bool:
    spec = importlib.util.find_spec(root)
    # A bare folder of that name on sys.path (Ray's /tmp/ray, say) is a namespace package, not Ray.
    return spec is not None and spec.origin is not None


def missing(roots=STANDIN_ROOTS):
    return [root for root in roots if not _installed(root)]


def install(roots=STANDIN_ROOTS):
    """Stand in for those of `roots` that are not installed; returns their names."""
    absent = missing(roots)
    if absent:
        sys.meta_path.insert(0, _Finder(absent))
    return absent
