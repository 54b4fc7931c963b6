"""vLLM's engine core in a thread of the rollout actor, instead of a process of its own (CPU mode).

OpenRLHF's rollout actor serves through vLLM's AsyncLLM, which always starts its engine core (the
scheduler and the model) as a second process and talks to it over ZMQ. On a laptop that process
was a second copy of the rollout actor: forked, the two shared pages only until Python's reference
counts touched them, and on the tiny model the pair held 0.76 GB where one process holding both
holds 0.60 GB. So CPU mode hands vLLM a "process" that is a thread: `EngineCoreProc.run_engine_core`
runs unchanged in it and the front end keeps its ZMQ sockets, now within one process.

What a thread cannot do as a process does, and what stands in for it:
  * signal handlers: only the main thread may install them, so the engine core's SIGTERM/SIGINT
    handlers are kept on the thread object, and vLLM's `terminate()` calls the SIGTERM one (the
    engine then leaves its busy loop as after a real signal);
  * a pid to force-kill after a shutdown timeout: there is none (`pid` is None, which vLLM skips:
    killing it would kill the rollout actor); the thread is a daemon and ends with the actor;
  * the process title and vLLM's log prefix, which would rename the whole actor: left out;
  * `sentinel`, which vLLM waits on to see its engine die: the read end of a pipe whose write end
    the thread closes when it ends, however it ends.
The price is the GIL: the front end's Python (output processing, Ray calls) and the engine core's no
longer run at the same time. On the tiny model that costs ~2 % of a step (docs/BENCHMARKS.md).
"""
import gc
import os
import queue
import signal
import sys
import threading

_current = threading.local()  # .engine: the _EngineCoreThread whose code runs in this thread


class _EngineCoreThread:
    """The part of multiprocessing.Process that vLLM's CoreEngineProcManager and its monitor use."""

    def __init__(self, target=None, name=None, kwargs=None, **_):
        self.name = name or "EngineCore"
        self.pid = None
        self.exitcode = None
        self.signal_handlers = {}
        self._target, self._kwargs = target, kwargs or {}
        self.sentinel, self._sentinel_w = os.pipe()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)

    def _run(self):
        _current.engine = self
        try:
            self._target(**self._kwargs)
            self.exitcode = 0
        except SystemExit as exit_:  # the busy loop ends with SystemExit after a shutdown
            self.exitcode = exit_.code if isinstance(exit_.code, int) else 0
        except BaseException:  # vLLM has logged it ("EngineCore failed to start", "fatal error")
            self.exitcode = 1
        finally:
            os.close(self._sentinel_w)

    def start(self):
        print("[ngrpo] CPU layout: vLLM's engine core runs in a thread of the rollout actor",
              file=sys.stderr, flush=True)
        # The rollout actor's objects (its imported stack) leave the garbage collector's reach, as
        # the driver's do (cpu_layout.freeze_imported_objects): otherwise every full collection
        # the engine's allocations trigger walks them, in start-up and between generation steps
        # (tiny model, against the forked engine core: start-up +0.47 -> -0.30 s, step +9 -> +2 %).
        gc.freeze()
        self._thread.start()

    def is_alive(self):
        return self._thread.is_alive()

    def join(self, timeout=None):
        self._thread.join(timeout)

    def terminate(self):
        handler = self.signal_handlers.get(signal.SIGTERM)
        if callable(handler):
            handler(signal.SIGTERM, None)

    kill = terminate


class _ThreadContext:
    """Stands in for the multiprocessing context vLLM starts its engine core from (and takes its
    multimodal tensor queue from, which within one process is a plain queue)."""

    Process = _EngineCoreThread
    Queue = queue.Queue


class _SignalModule:
    """The `signal` module as vLLM's engine-core module sees it: in an engine thread, `signal()`
    records the handler on the thread object; everywhere else it is the real module."""

    def __getattr__(self, name):
        return getattr(signal, name)

    @staticmethod
    def signal(signum, handler):
        engine = getattr(_current, "engine", None)
        if engine is None:
            return signal.signal(signum, handler)
        previous = engine.signal_handlers.get(signum, signal.SIG_DFL)
        engine.signal_handlers[signum] = handler
        return previous


def _leave_the_process_as_is(*args, **kwargs):
    return None


def run_engine_core_in_thread() -> None:
    """Make AsyncLLM engines built in this process run their engine core in a thread."""
    from vllm.v1.engine import core
    from vllm.v1.engine import utils as engine_utils

    def get_mp_context():
        return _ThreadContext()

    from openrlhf_patch import touchpoints

    touchpoints.patch("vllm.v1.engine.utils.get_mp_context", get_mp_context, owner=engine_utils)
    touchpoints.patch("vllm.v1.engine.core.signal", _SignalModule(), owner=core)
    touchpoints.patch("vllm.v1.engine.core.set_process_title", _leave_the_process_as_is, owner=core)
    touchpoints.patch("vllm.v1.engine.core.decorate_logs", _leave_the_process_as_is, owner=core)
