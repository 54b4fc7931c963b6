"""(2) ngrpo's Ray worker hook and the patches it applies as OpenRLHF's modules are imported, run for
real in a fresh process on a CUDA machine, leave CUDA alone:
torch's CUDA state uninitialised, and the CUDA driver too (hiding every GPU afterwards still works,
which is what Ray does when it sets CUDA_VISIBLE_DEVICES after the hook)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from openrlhf_patch.config import PatchConfig

KIT = Path(__file__).resolve().parent
REPO_ROOT = KIT.parents[1]
PROBE = """
import json, os, sys
sys.path.insert(0, {kit!r})
import standins
used = standins.install()  # only for Ray / vLLM / datasets when they are not installed
import torch
from openrlhf_patch import install
install.worker_setup()
# the modules an actor imports next, which get their patches as they load (openrlhf_patch/on_import.py)
from openrlhf_patch import on_import
import openrlhf.trainer.ppo_trainer, openrlhf.trainer.ray.ppo_actor
result = dict(standins=used, torch_initialised=torch.cuda.is_initialized(), applied=install.active_config() is not None,
              unpatched=on_import.pending())
os.environ["CUDA_VISIBLE_DEVICES"] = ""  # what Ray does after the hook: here, hide every GPU
result["driver_devices_after_hiding"] = torch._C._cuda_getDeviceCount()
print("NGRPO-PROBE " + json.dumps(result))
"""


def _probe(nvml_check: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "PYTORCH_NVML_BASED_CUDA_CHECK")}
    env.update(PatchConfig(estimator="ngrpo", device="cuda", seed=1).to_env())
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO_ROOT), env.get("PYTHONPATH", "")] if p)
    if nvml_check:
        from pipelines.launch.gpu_run import GPU_WORKER_ENV

        env.update(GPU_WORKER_ENV)
    out = subprocess.run([sys.executable, "-c", PROBE.format(kit=str(KIT))], env=env, cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    line = next(l for l in out.stdout.splitlines() if l.startswith("NGRPO-PROBE "))
    return json.loads(line[len("NGRPO-PROBE "):])


def test_worker_hook_leaves_cuda_and_the_driver_uninitialised():
    result = _probe(nvml_check=True)
    print(f"stand-ins used: {result['standins'] or 'none'}")
    assert result["applied"] and not result["torch_initialised"] and result["unpatched"] == []
    assert result["driver_devices_after_hiding"] == 0, (
        "the CUDA driver was initialised during the hook: CUDA_VISIBLE_DEVICES set afterwards is ignored")


def test_probe_without_the_nvml_check():
    """Not a pass/fail check: says whether PYTORCH_NVML_BASED_CUDA_CHECK=1 is what keeps the driver
    uninitialised on this machine (the answer is in the skip reason, shown by -ra)."""
    result = _probe(nvml_check=False)
    assert not result["torch_initialised"]
    if result["driver_devices_after_hiding"]:
        pytest.skip("without PYTORCH_NVML_BASED_CUDA_CHECK=1 the hook's imports initialise the CUDA driver "
                    "(GPUs hidden afterwards stay visible): the Ray env var is needed")
    pytest.skip("without PYTORCH_NVML_BASED_CUDA_CHECK=1 the hook's imports leave the CUDA driver alone here too")
