"""Patch 5, optimizer (inside PolicyModelActor and CriticModelActor): where DeepSpeed's FusedAdam
cannot be compiled (on CPU, and on a GPU node without nvcc), DeepSpeed is told to use torch's
AdamW.
"""
import functools
import os

from openrlhf_patch.config import active


def fused_adam_buildable(device: str) -> bool:
    """DeepSpeed compiles FusedAdam at first use: CUDA needs nvcc; on CPU ngrpo never asks for it
    (a C++ build at every fresh environment's first step, for an optimizer no faster here)."""
    import shutil

    if device == "cpu":
        return False
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or ""
    return bool(shutil.which("nvcc") or (cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))))


def wrap_train_ds_config(upstream):
    """OpenRLHF's get_train_ds_config, with DeepSpeed's `torch_adam` set for Adam when FusedAdam
    cannot be built here: the same AdamW update (betas, eps, weight decay) by torch.optim.AdamW."""
    @functools.wraps(upstream)
    def get_train_ds_config(*args, **kwargs):
        config = upstream(*args, **kwargs)
        optimizer = config.get("optimizer")
        if optimizer and str(optimizer.get("type", "")).lower() in ("adam", "adamw") and \
                not fused_adam_buildable(active().device):
            optimizer.setdefault("params", {})["torch_adam"] = True
        return config

    return get_train_ds_config
