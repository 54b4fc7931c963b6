"""CPU mode's process layout: three processes fewer than OpenRLHF's and vLLM's own.

Upstream, a run is a Ray driver, a PPOTrainer actor (the single controller), a DeepSpeed policy
actor, a vLLM rollout actor and the engine-core process that the rollout actor's AsyncLLM starts.
On a GPU cluster each earns its place; on a 2-core laptop each is ~0.5 GB of imported torch,
transformers, DeepSpeed and vLLM, and seconds of start-up spent importing them again. Three of them
need not exist there:

  * the trainer runs in the driver (`run_trainer_in_driver`), which has already imported all of
    it and otherwise only waits on `ray.get(trainer.fit.remote())`;
  * so does the policy, where one process holds it (`policy_in_driver`): the phases of a step run
    one after another on CPU, so the driver was idle while the policy worked and vice versa;
  * the engine core runs in a thread of the rollout actor (openrlhf_patch/cpu/vllm_engine_thread.py).
The vLLM rollout actor stays a Ray actor: its methods are coroutines on the actor's event loop,
and it must take in new weights while the policy sends them.

`NGRPO_CPU_LAYOUT=upstream` keeps the upstream layout (a trainer actor, a policy actor, a spawned
engine core); GPU runs always have it, and on a Ray cluster the policy stays on the cluster.
"""
import contextlib
import functools
import gc
import os
import sys
import weakref

LAYOUT_ENV = "NGRPO_CPU_LAYOUT"
LAYOUTS = ("lean", "upstream")


def lean_layout() -> bool:
    layout = os.environ.get(LAYOUT_ENV, "lean")
    if layout not in LAYOUTS:
        raise ValueError(f"{LAYOUT_ENV}={layout!r}: use one of {', '.join(LAYOUTS)}")
    from openrlhf_patch.cpu import speedups

    return layout == "lean" and speedups.on("lean-layout")


class InProcessActor:
    """Stands in for a @ray.remote class whose one instance CPU mode keeps in the driver.

    `Cls.remote(*args)` builds the object here and returns a handle; `handle.method.remote(*args)`
    runs the method at once and returns its result as an ObjectRef. So OpenRLHF's launcher and
    trainer (`ray.get(trainer.fit.remote())`, `actor.execute_batch.remote(name, chunk_ref, ...)`)
    run unchanged. What the actor could rely on in a process of its own it keeps:
      * arguments by value, as Ray passes them, with ObjectRefs among them resolved (PPOTrainer's
        constructor edits `strategy.args`, which the driver hands on to the policy afterwards;
        the policy keeps the experiences it is given);
      * its own global random state (torch's CPU generator, `random`, NumPy's), so the trainer and
        the policy draw the same numbers as in OpenRLHF's layout;
      * a handle that pickles as a reference, as a Ray actor handle does (the trainer is handed
        the policy's actor group)."""

    def __init__(self, actor_class, before_init=None):
        self.actor_class = actor_class
        self.before_init = before_init

    def remote(self, *args, **kwargs):
        args, kwargs = _by_value(args, kwargs)
        if self.before_init is not None:
            self.before_init()
        random_state = _RandomState()
        with random_state.installed():
            obj = self.actor_class.__ray_metadata__.modified_class(*args, **kwargs)
        return _InProcessHandle(obj, random_state)


def _by_value(args, kwargs):
    import ray

    args, kwargs = ray.get(ray.put((args, kwargs)))
    args = [ray.get(a) if isinstance(a, ray.ObjectRef) else a for a in args]
    kwargs = {k: ray.get(v) if isinstance(v, ray.ObjectRef) else v for k, v in kwargs.items()}
    return args, kwargs


class _RandomState:
    """The global random generators of a process of its own, kept aside between calls."""

    def __init__(self):
        self._state = self._read()

    @staticmethod
    def _read():
        import random

        import numpy as np
        import torch

        return torch.random.get_rng_state(), random.getstate(), np.random.get_state()

    @staticmethod
    def _write(state):
        import random

        import numpy as np
        import torch

        torch.random.set_rng_state(state[0])
        random.setstate(state[1])
        np.random.set_state(state[2])

    @contextlib.contextmanager
    def installed(self):
        outer = self._read()
        self._write(self._state)
        try:
            yield
        finally:
            self._state = self._read()
            self._write(outer)


_HANDLES = weakref.WeakValueDictionary()


def _handle_by_key(key):
    return _HANDLES[key]


class _InProcessHandle:
    def __init__(self, obj, random_state):
        self._obj, self._random_state = obj, random_state

    def __getattr__(self, name):
        if name.startswith("__"):  # pickle and copy probe dunders before __init__ has run
            raise AttributeError(name)
        return _InProcessMethod(getattr(self._obj, name), self._random_state)

    def __reduce__(self):
        _HANDLES[id(self)] = self
        return _handle_by_key, (id(self),)


class _InProcessMethod:
    def __init__(self, method, random_state):
        self.method, self.random_state = method, random_state

    def remote(self, *args, **kwargs):
        import ray

        args, kwargs = _by_value(args, kwargs)
        with self.random_state.installed():
            return ray.put(self.method(*args, **kwargs))


def run_trainer_in_driver(seed=None) -> None:
    """OpenRLHF's launcher builds `PPOTrainer.remote(...)` from the name in openrlhf.trainer.ppo_trainer,
    imported inside `train()`: that name becomes an InProcessActor. SEED seeds torch before the
    trainer is built, as the worker hook does in a trainer actor (its prompt loader's order)."""
    from openrlhf.trainer import ppo_trainer

    from openrlhf_patch import touchpoints

    def seed_torch():
        if seed is not None:
            import torch

            torch.manual_seed(seed)

    # a second run in this process puts its own seed in place of the first run's
    upstream = touchpoints.original("openrlhf.trainer.ppo_trainer.PPOTrainer", owner=ppo_trainer)
    touchpoints.patch("openrlhf.trainer.ppo_trainer.PPOTrainer", InProcessActor(upstream, before_init=seed_torch),
                      owner=ppo_trainer, reinstall=True)
    print("[ngrpo] CPU layout: the PPOTrainer runs in the driver", file=sys.stderr, flush=True)


def freeze_imported_objects() -> int:
    """Move every object the driver holds now (its whole imported stack: ~6,000 modules) out of the
    garbage collector's reach, and return how many. The trainer and the policy run in the driver,
    and each full collection walked all of it: OpenRLHF's save_ckpt ends in gc.collect(), which
    took ~0.4 s of every tiny-model checkpoint (0.41 -> 0.035 s). Collections then see only what
    the run creates; cycles among the frozen objects are never freed (there are few at import)."""
    gc.freeze()
    count = gc.get_freeze_count()
    print(f"[ngrpo] CPU layout: {count:,} objects of the imported stack frozen out of garbage collection",
          file=sys.stderr, flush=True)
    return count


# What BaseDistributedActor sets in its process's environment for torch.distributed.
DISTRIBUTED_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK")
_launch = {"policy_in_driver": False}


@contextlib.contextmanager
def policy_in_driver():
    """For the launch inside it, OpenRLHF's actor group of one PolicyModelActor (one node, one
    logical GPU: every CPU recipe on a private node) is an InProcessActor in the driver. The
    driver has imported DeepSpeed, transformers and OpenRLHF's actor already, to check the command
    line and to run the trainer; the policy's own process imported them again (~0.4 GB).
    Afterwards the driver is as before: no torch.distributed group, the environment restored."""
    import torch

    _patch_actor_groups()
    saved = {key: os.environ.get(key) for key in DISTRIBUTED_ENV}
    _launch["policy_in_driver"] = True
    try:
        yield
    finally:
        _launch["policy_in_driver"] = False
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _patch_actor_groups() -> None:
    from openrlhf.trainer.ray import launcher
    from openrlhf_patch import touchpoints

    upstream = launcher.RayActorGroup._initiate_actors

    @functools.wraps(upstream)
    def _initiate_actors(self, pg, num_gpus_per_actor):
        one = self._num_nodes * self._num_gpus_per_node == 1
        if not (_launch["policy_in_driver"] and one and
                self.ray_actor_type.__ray_metadata__.class_name == "PolicyModelActor"):
            return upstream(self, pg, num_gpus_per_actor)
        # BaseDistributedActor(world_size, rank, master_addr, master_port), as upstream makes rank 0
        self._actor_handlers = [InProcessActor(self.ray_actor_type).remote(1, 0, None, None)]
        print("[ngrpo] CPU layout: the policy runs in the driver", file=sys.stderr, flush=True)

    touchpoints.patch("openrlhf.trainer.ray.launcher.RayActorGroup._initiate_actors", _initiate_actors)
