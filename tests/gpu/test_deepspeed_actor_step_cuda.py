"""(3) A DeepSpeed step of OpenRLHF's Actor on CUDA with ngrpo's patched loss: finite loss, clip
fractions measured on CUDA, weights changed and finite. ZeRO-2 (today's recipe) and ZeRO-3 (the
proposed GPU preset); OpenRLHF's optimizer (DeepSpeed FusedAdam, compiled just in time) and torch's
AdamW (`torch_adam`, no compiler needed)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

KIT = Path(__file__).resolve().parent


def _have_cuda_compiler() -> bool:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    nvcc = shutil.which("nvcc") or (Path(cuda_home) / "bin" / "nvcc").exists()
    return bool(nvcc) and bool(shutil.which("c++") or shutil.which("g++"))


@pytest.mark.parametrize("optimizer", ["torch", "fused"])
@pytest.mark.parametrize("stage", [2, 3])
def test_actor_step_with_patched_loss(stage, optimizer):
    if optimizer == "fused" and not _have_cuda_compiler():
        pytest.skip("DeepSpeed FusedAdam (OpenRLHF's optimizer) is compiled on first use and needs nvcc and a "
                    "C++ compiler; this machine has no nvcc/g++, so GPU training here would fail at its first step")
    env = {**os.environ, "MASTER_PORT": str(29561 + 2 * stage + (optimizer == "fused"))}
    out = subprocess.run([sys.executable, str(KIT / "actor_step.py"), "--device", "cuda", "--zero-stage", str(stage),
                          "--optimizer", optimizer], env=env, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-6000:]
    line = next(l for l in out.stdout.splitlines() if l.startswith("NGRPO-STEP "))
    result = json.loads(line[len("NGRPO-STEP "):])
    print(result)
    assert result["loss_finite"] and result["weights_finite"] and result["log_probs_device"] == "cuda"
    assert result["matrices_changed"] == result["matrices"] == 16  # every weight matrix moved (lr 1e-3)
    assert set(result["clip_fractions"]) == {"clip_frac_low", "clip_frac_high"}
    assert sum(result["clip_fractions"].values()) == pytest.approx(result["clip_ratio"], abs=1e-6)
    assert result["optimizer"] == ("AdamW" if optimizer == "torch" else "FusedAdam")
