"""What a GPU run adds to the recipe's OpenRLHF command line and to the Ray workers' environment.

None of it changes the algorithm (batch sizes, learning rate, clipping, KL, lengths, filters stay
the recipe's): it is how the same steps are laid out in GPU memory, following OpenRLHF's own 7B
hybrid-engine examples (examples/scripts/train_ppo_ray_hybrid_engine.sh and
train_dapo_ray_hybrid_engine.sh: ZeRO-3, gradient checkpointing, packing with dynamic batching,
enforce_eager, sleep mode); pipelines/launch/recipes.py's paper preset and pipelines/launch/training.py set them.
pipelines/launch/gpu_memory.py says whether a layout fits.

flash-attn: OpenRLHF packs samples with flash-attention's varlen kernels and forces
`flash_attention_2` whenever packing (and so dynamic batching) is on; with sdpa, packed
sequences would attend across their boundaries. flash-attn 2.8.3 has no wheel for torch 2.13, so
the default GPU install has none: then attention is `sdpa` and micro-batches stay padded, of
--micro-train-batch-size sequences.
"""
from __future__ import annotations

import dataclasses
import functools
import subprocess
import sys
from typing import List

from pipelines.launch import gpu_memory

# Ray workers of a GPU run. vLLM sets this on import, too late for code that runs before it (ngrpo's
# worker hook imports DeepSpeed, whose accelerator detection asks torch.cuda.is_available()): with
# it, torch asks NVML instead of initialising the CUDA driver, which would otherwise fix the
# process's visible GPUs before Ray has set CUDA_VISIBLE_DEVICES.
GPU_WORKER_ENV = {"PYTORCH_NVML_BASED_CUDA_CHECK": "1"}


@functools.lru_cache(maxsize=1)
def flash_attn_usable() -> bool:
    """A real flash-attn (not ngrpo's import stub, which has no dist-info) whose CUDA extension
    loads against the installed torch. Checked in a child process, so that a wheel built for
    another torch (undefined symbols) or the CUDA libraries it loads cannot affect this one."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("flash_attn")
    except PackageNotFoundError:
        return False
    probe = subprocess.run([sys.executable, "-c", "import flash_attn_2_cuda, flash_attn"], capture_output=True)
    return probe.returncode == 0


@dataclasses.dataclass(frozen=True)
class GpuRunSettings:
    """The memory knobs of a GPU run (the paper preset sets ZeRO-3 and checkpointing; packing follows
    flash-attn), for estimating other choices than the recipe's (tests, what-if questions)."""

    zero_stage: int = 3
    gradient_checkpointing: bool = True
    packing: bool = False
    max_tokens_per_gpu: int = gpu_memory.DEFAULT_MAX_TOKENS_PER_GPU

    def memory_setup(self, recipe, *, nodes: int, gpus_per_node: int, colocate: bool = True,
                     vllm_engines: int = None, vllm_tensor_parallel: int = 1,
                     vllm_gpu_memory_utilization: float = 0.5) -> gpu_memory.RunSetup:
        """The memory-relevant setup of `recipe` run with these settings on this layout."""
        world = nodes * gpus_per_node
        return gpu_memory.RunSetup(
            nodes=nodes, gpus_per_node=gpus_per_node, colocate=colocate, sleep=colocate,
            vllm_engines=vllm_engines or max(world // vllm_tensor_parallel, 1), vllm_tensor_parallel=vllm_tensor_parallel,
            vllm_gpu_memory_utilization=vllm_gpu_memory_utilization,
            max_len=recipe.max_prompt_len + recipe.max_response_len,
            micro_train_batch_size=recipe.micro_train_batch_size,
            micro_rollout_batch_size=recipe.micro_rollout_batch_size,
            dynamic_batch=self.packing, train_max_tokens_per_gpu=self.max_tokens_per_gpu,
            rollout_max_tokens_per_gpu=self.max_tokens_per_gpu, zero_stage=self.zero_stage,
            gradient_checkpointing=self.gradient_checkpointing, **gpu_memory.models_for_recipe(recipe),
        )


def recipe_memory_setup(recipe, **layout) -> gpu_memory.RunSetup:
    """The setup of `recipe` exactly as the recipe says (no GPU settings): today's GPU command line."""
    plain = GpuRunSettings(zero_stage=recipe.zero_stage, gradient_checkpointing=False, packing=False)
    return plain.memory_setup(recipe, **layout)
