"""CPU mode's process layout (openrlhf_patch/cpu_layout.py): the trainer in the driver, vLLM's
engine core forked when OpenMP allows it. Both run inside real training runs in
tests/test_train_pipeline.py (the launch log's "[ngrpo] CPU layout" lines, the patch counted per
worker, the same data order as in OpenRLHF's own layout); here are their edges."""
import os
import subprocess
import sys
import textwrap

import pytest

from openrlhf_patch import cpu_layout

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code, timeout=120):
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.split()


def test_the_openmp_probe_sees_what_makes_a_forked_child_hang():
    """Real GNU libgomp: after one parallel region in the parent, a forked child's first one never
    returns; the probe must say so (in its 2 s) before that, and say yes in a fresh process."""
    out = _python("""
        import torch
        from openrlhf_patch.cpu_layout import openmp_survives_fork
        print(torch.get_num_threads(), openmp_survives_fork(timeout_s=30), openmp_survives_fork(timeout_s=30))
        torch.ones(1 << 20).exp_()
        print(openmp_survives_fork(timeout_s=2))
    """)
    assert out == ["2", "True", "True", "False"]


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
        from openrlhf_patch.cpu_layout import InProcessActor

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


def test_the_engine_core_context_is_fork_with_the_parents_objects_frozen():
    out = _python("""
        import gc
        from openrlhf_patch.cpu_layout import patch_engine_core_start
        patch_engine_core_start()
        from vllm.v1.engine import utils
        before = gc.get_freeze_count()
        print(utils.get_mp_context().get_start_method(), before == 0, gc.get_freeze_count() > 10_000)
    """)
    assert out == ["fork", "True", "True"]
