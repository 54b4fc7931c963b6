"""CPU mode's process layout: two fewer Python start-ups than OpenRLHF's and vLLM's own.

Upstream, a run is a Ray driver, a PPOTrainer actor (the single controller), a DeepSpeed policy
actor, a vLLM rollout actor and the engine-core process that the rollout actor's AsyncLLM starts.
On a GPU cluster each earns its place; on a 2-core laptop each is ~0.5 GB of imported torch,
transformers, DeepSpeed and vLLM, and seconds of start-up spent importing them again. Two of them
need not exist there:

  * the trainer runs in the driver (`run_trainer_in_driver`), which has already imported all of
    it and otherwise only waits on `ray.get(trainer.fit.remote())`;
  * the engine core is forked from the rollout actor instead of spawned
    (`patch_engine_core_start`), so it starts at once and shares the actor's pages.

`NGRPO_CPU_LAYOUT=upstream` keeps the upstream layout (a trainer actor, a spawned engine core);
GPU runs always have it.
"""
import gc
import multiprocessing
import os
import sys

LAYOUT_ENV = "NGRPO_CPU_LAYOUT"
LAYOUTS = ("lean", "upstream")
OPENMP_PROBE_TIMEOUT_S = 5.0


def lean_layout() -> bool:
    layout = os.environ.get(LAYOUT_ENV, "lean")
    if layout not in LAYOUTS:
        raise ValueError(f"{LAYOUT_ENV}={layout!r}: use one of {', '.join(LAYOUTS)}")
    return layout == "lean"


class InProcessActor:
    """Stands in for a @ray.remote class whose one instance CPU mode keeps in the driver.

    `Cls.remote(*args)` builds the object here, from copies of its arguments as Ray would pass them
    (PPOTrainer's constructor edits `strategy.args`, which the driver hands on to the policy actors
    afterwards); `handle.method.remote(*args)` runs the method at once and returns its result as an
    ObjectRef. So OpenRLHF's launcher (`ray.get(trainer.fit.remote())`) runs unchanged."""

    def __init__(self, actor_class, before_init=None):
        self.actor_class = actor_class
        self.before_init = before_init

    def remote(self, *args, **kwargs):
        import ray

        args, kwargs = ray.get(ray.put((args, kwargs)))
        if self.before_init is not None:
            self.before_init()
        return _InProcessHandle(self.actor_class.__ray_metadata__.modified_class(*args, **kwargs))


class _InProcessMethod:
    def __init__(self, method):
        self.method = method

    def remote(self, *args, **kwargs):
        import ray

        return ray.put(self.method(*args, **kwargs))


class _InProcessHandle:
    def __init__(self, obj):
        self._obj = obj

    def __getattr__(self, name):
        return _InProcessMethod(getattr(self._obj, name))


def run_trainer_in_driver(seed=None) -> None:
    """OpenRLHF's launcher builds `PPOTrainer.remote(...)` from the name in openrlhf.trainer.ppo_trainer,
    imported inside `train()`: that name becomes an InProcessActor. SEED seeds torch before the
    trainer is built, as the worker hook does in a trainer actor (its prompt loader's order)."""
    from openrlhf.trainer import ppo_trainer

    def seed_torch():
        if seed is not None:
            import torch

            torch.manual_seed(seed)

    actor_class = ppo_trainer.PPOTrainer
    if isinstance(actor_class, InProcessActor):  # a second run in this process: its own seed
        actor_class = actor_class.actor_class
    ppo_trainer.PPOTrainer = InProcessActor(actor_class, before_init=seed_torch)
    print("[ngrpo] CPU layout: the PPOTrainer runs in the driver", file=sys.stderr, flush=True)


def _parallel_region() -> None:
    import torch

    torch.ones(1 << 20).exp_()  # 1M elements: ATen splits this across its OpenMP threads


def openmp_survives_fork(timeout_s: float = OPENMP_PROBE_TIMEOUT_S) -> bool:
    """Whether a child forked now can run an OpenMP parallel region. GNU libgomp (torch's OpenMP on
    Linux) is not fork-safe: once this process has run a parallel region, a forked child hangs at
    its first one. A throwaway child tries one (~20 ms); a hang means no."""
    child = multiprocessing.get_context("fork").Process(target=_parallel_region, daemon=True)
    child.start()
    child.join(timeout_s)
    if child.exitcode is None:
        child.kill()
        child.join()
        return False
    return child.exitcode == 0


def patch_engine_core_start() -> None:
    """vLLM's CPU platform has AsyncLLM spawn its engine core (and forces spawn in any Ray actor),
    so that process imports torch and vLLM again: ~5 s of a tiny run's start-up on two cores and
    ~0.5 GB of its own. Forked, it starts at once and shares the rollout actor's pages. The rollout
    actor has run no torch kernel when it builds its engine, but that is vLLM's and OpenRLHF's
    code, not ngrpo's, so each start checks with `openmp_survives_fork` and spawns otherwise."""
    from vllm.v1.engine import utils as engine_utils

    upstream = engine_utils.get_mp_context
    if getattr(upstream, "_ngrpo_cpu", False):
        return

    def get_mp_context():
        if openmp_survives_fork():
            print("[ngrpo] CPU layout: vLLM's engine core is forked", file=sys.stderr, flush=True)
            # Keep the actor's objects out of the garbage collector's reach in both processes: a
            # collection writes into every object it visits, which would copy their shared pages
            # (rollout actor + engine core PSS 0.92 -> 0.88 GB on the tiny model).
            gc.freeze()
            return multiprocessing.get_context("fork")
        print("[ngrpo] CPU layout: vLLM's engine core is spawned (this process has run OpenMP, which a "
              "forked child could not)", file=sys.stderr, flush=True)
        return upstream()

    get_mp_context._ngrpo_cpu = True
    engine_utils.get_mp_context = get_mp_context
