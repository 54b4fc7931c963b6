"""vLLM worker extension for CPU runs (the CPU twin of OpenRLHF's `WorkerWrap`).

vLLM's CPU engine runs the model in a process of its own (the engine core), which Ray's worker
set-up hook never reaches; vLLM imports this module there because the engine is created with
`worker_extension_cls="openrlhf_patch.cpu.cpu_vllm_worker.CPUWorkerWrap"`. Importing it:
  * keeps vLLM CPU's weight prepacking off: by default linear layers are repacked into oneDNN
    handles and their `weight` emptied after loading, so later `load_weights` calls (the weight
    sync after every training step) would silently be ignored;
and the class receives the actor's weights over a gloo group on the CPU.
"""
import math

import torch

from openrlhf_patch.cpu.cpu_mode import GlooBroadcastGroup


def _plain_cpu_linear(layer, remove_weight=False):
    """Replacement for vLLM's `dispatch_cpu_unquantized_gemm`: F.linear on the live weight."""
    layer.cpu_linear = lambda x, weight, bias: torch.nn.functional.linear(x, weight, bias)


def _keep_weights_unpacked() -> None:
    from vllm.model_executor.layers import utils as layer_utils

    from openrlhf_patch import touchpoints

    # linear.py and vocab_parallel_embedding.py import it at call time, so this reaches them.
    # touchpoints.patch raises when vLLM renames it: vLLM would otherwise keep sampling the base model.
    touchpoints.patch("vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm", _plain_cpu_linear,
                      owner=layer_utils)


_keep_weights_unpacked()


class CPUWorkerWrap:
    def init_process_group(self, master_address, master_port, rank_offset, world_size, group_name,
                           backend="gloo", use_ray=False):
        if use_ray:
            raise NotImplementedError("CPU mode syncs weights through gloo; --vllm.sync_with_ray is not supported")
        base_rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        self._model_update_group = GlooBroadcastGroup(master_address, master_port, base_rank + rank_offset, world_size)

    def update_weight(self, name, dtype, shape, empty_cache=False):
        """One tensor (upstream's call), or a bucket: lists of names and shapes sent as one flat
        buffer by `cpu_mode.broadcast_to_vllm_in_buckets`."""
        names, shapes = (name, shape) if isinstance(name, list) else ([name], [shape])
        if dtype != self.model_config.dtype:
            raise TypeError(f"weight sync dtype mismatch for {names[0]}: actor {dtype}, vLLM {self.model_config.dtype}")
        sizes = [math.prod(s) for s in shapes]
        flat = torch.empty(sum(sizes), dtype=dtype, device="cpu")
        self._model_update_group.broadcast(flat, src=0)
        weights = [(n, t.view(s)) for n, t, s in zip(names, flat.split(sizes), shapes)]
        # A broken sync otherwise shows up only as empty generations steps later.
        if not torch.isfinite(flat).all():
            bad = [n for n, t in weights if not torch.isfinite(t).all()]
            raise FloatingPointError(f"weight sync received non-finite values for {', '.join(bad)}")
        self.model_runner.model.load_weights(weights=weights)
        if not getattr(self, "_ngrpo_sync_reported", False):  # once: the launch log shows the path taken
            self._ngrpo_sync_reported = True
            print(f"[ngrpo] weight sync: {len(names)} tensors in this buffer ({flat.numel() * flat.element_size()} bytes)",
                  flush=True)
