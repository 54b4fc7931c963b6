"""What a GPU run's launcher sets, checked on CPU: the worker hook leaves CUDA alone, the Ray
runtime env carries PYTORCH_NVML_BASED_CUDA_CHECK, attention is sdpa without flash-attn."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from openrlhf_patch.config import PatchConfig
from pipelines.launch import gpu_run, training
from pipelines.launch.recipes import build_recipe

REPO_ROOT = Path(__file__).resolve().parents[1]

GPU_CONFIG = PatchConfig(estimator="ngrpo", device="cuda", seed=1)

# The real hook in a fresh interpreter, as a Ray worker runs it (the config comes from the env).
HOOK_PROBE = """
import json, sys, torch
{before}
from openrlhf_patch import install
try:
    install.worker_setup()
except install.CudaInitialisedInHook as err:
    print(json.dumps({{"error": str(err)}}))
    sys.exit(0)
print(json.dumps({{"initialised": torch.cuda.is_initialized(), "applied": install.active_config() is not None,
                  "device": install.active_config().device}}))
"""


def _run_hook(before=""):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **GPU_CONFIG.to_env(), **gpu_run.GPU_WORKER_ENV}
    out = subprocess.run([sys.executable, "-c", HOOK_PROBE.format(before=before)], env=env, cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_worker_hook_in_gpu_mode_leaves_cuda_uninitialised():
    result = _run_hook()
    assert result == {"initialised": False, "applied": True, "device": "cuda"}


@pytest.mark.slow
def test_worker_hook_refuses_to_return_with_cuda_initialised():
    # Stand-in for an import that made a CUDA call (this torch has no CUDA to initialise).
    result = _run_hook(before="torch.cuda.is_initialized = lambda: True")
    assert "initialised CUDA, before Ray set CUDA_VISIBLE_DEVICES" in result["error"]
    assert "PYTORCH_NVML_BASED_CUDA_CHECK=1" in result["error"]


class _StopAtRayInit(Exception):
    pass


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_ray_runtime_env_of_gpu_runs_asks_nvml(monkeypatch, device, tmp_path, layout_args):
    import ray

    from openrlhf_patch import install

    captured = {}

    def fake_init(**kwargs):
        captured.update(kwargs)
        raise _StopAtRayInit()

    monkeypatch.setattr(install, "apply", lambda *a, **k: None)
    monkeypatch.setattr(training, "parse_with_openrlhf", lambda argv: layout_args)
    monkeypatch.setattr(ray, "init", fake_init)
    with pytest.raises(_StopAtRayInit):
        training.run_openrlhf([], PatchConfig(device=device, run_dir=str(tmp_path)))
    env = captured["runtime_env"]["env_vars"]
    assert (env.get("PYTORCH_NVML_BASED_CUDA_CHECK") == "1") == (device == "cuda")
    # CPU runs size vLLM's KV cache to one rollout: 4 prompts x 8 samples
    assert env.get("NGRPO_ROLLOUT_SEQUENCES") == ("32" if device == "cpu" else None)
    assert captured["runtime_env"]["worker_process_setup_hook"] == install.HOOK


@pytest.mark.parametrize("usable", [False, True], ids=["no-flash-attn", "flash-attn"])
def test_gpu_attention_is_sdpa_without_flash_attn(monkeypatch, usable):
    monkeypatch.setattr(gpu_run, "flash_attn_usable", lambda: usable)
    argv = training.build_openrlhf_argv(build_recipe("ngrpo", "paper"), model="m",
                                        layout=training.Layout(device="cuda", gpus_per_node=8))
    assert argv[argv.index("--ds.attn_implementation") + 1] == ("flash_attention_2" if usable else "sdpa")
    assert ("--ds.packing_samples" in argv) == usable


def test_flash_attn_stub_is_not_a_usable_flash_attn():
    from openrlhf_patch.cpu import cpu_mode

    cpu_mode.ensure_flash_attn_importable()  # the stub is importable from here on
    gpu_run.flash_attn_usable.cache_clear()
    assert not gpu_run.flash_attn_usable()


@pytest.mark.parametrize("usable", [False, True], ids=["no-flash-attn", "flash-attn"])
def test_the_paper_preset_on_gpu_passes_openrlhf_parser(monkeypatch, usable):
    """ZeRO-3, gradient checkpointing, eager vLLM with sleep mode; packing and dynamic batching by
    tokens per GPU where flash-attn allows; the algorithm's settings untouched."""
    from openrlhf_patch import install

    install.apply(PatchConfig(device="cuda"), role="test")
    monkeypatch.setattr(gpu_run, "flash_attn_usable", lambda: usable)
    argv = training.build_openrlhf_argv(build_recipe("grpo", "paper"), model="Qwen/Qwen2.5-Math-7B",
                                        layout=training.Layout(device="cuda", gpus_per_node=8))
    args = training.parse_with_openrlhf(training.materialise_argv(argv, "/tmp/r"))
    assert args.ds.zero_stage == 3 and args.actor.gradient_checkpointing_enable and args.vllm.enforce_eager
    assert args.vllm.enable_sleep and args.ds.enable_sleep and args.train.colocate_all
    assert args.ds.attn_implementation == ("flash_attention_2" if usable else "sdpa")
    assert args.ds.packing_samples == usable and args.train.dynamic_batch_enable == usable
    if usable:
        assert args.train.max_tokens_per_gpu == args.rollout.max_tokens_per_gpu == 16384
    assert (args.rollout.batch_size, args.rollout.n_samples_per_prompt, args.train.batch_size) == (1024, 8, 2048)
    assert (args.actor.adam.lr, args.rollout.temperature, args.data.max_len) == (1e-6, 1.0, 4096)
