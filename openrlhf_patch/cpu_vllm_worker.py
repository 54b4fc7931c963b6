"""vLLM worker extension for CPU runs (the CPU twin of OpenRLHF's `WorkerWrap`).

vLLM's CPU engine runs the model in processes of its own, which Ray's worker set-up hook never
reaches; vLLM imports this module there because the engine is created with
`worker_extension_cls="openrlhf_patch.cpu_vllm_worker.CPUWorkerWrap"`. Importing it:
  * keeps vLLM CPU's weight prepacking off: by default linear layers are repacked into oneDNN
    handles and their `weight` emptied after loading, so later `load_weights` calls (the weight
    sync after every training step) would silently be ignored;
and the class receives the actor's weights over a gloo group on the CPU.
"""
import torch

from openrlhf_patch.cpu_mode import GlooBroadcastGroup


def _plain_cpu_linear(layer, remove_weight=False):
    """Replacement for vLLM's `dispatch_cpu_unquantized_gemm`: F.linear on the live weight."""
    layer.cpu_linear = lambda x, weight, bias: torch.nn.functional.linear(x, weight, bias)


def _keep_weights_unpacked() -> None:
    from vllm.model_executor.layers import utils as layer_utils

    # linear.py and vocab_parallel_embedding.py import it at call time, so this reaches them.
    layer_utils.dispatch_cpu_unquantized_gemm = _plain_cpu_linear


_keep_weights_unpacked()


class CPUWorkerWrap:
    def init_process_group(self, master_address, master_port, rank_offset, world_size, group_name,
                           backend="gloo", use_ray=False):
        if use_ray:
            raise NotImplementedError("CPU mode syncs weights through gloo; --vllm.sync_with_ray is not supported")
        base_rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        self._model_update_group = GlooBroadcastGroup(master_address, master_port, base_rank + rank_offset, world_size)

    def update_weight(self, name, dtype, shape, empty_cache=False):
        if dtype != self.model_config.dtype:
            raise TypeError(f"weight sync dtype mismatch for {name}: actor {dtype}, vLLM {self.model_config.dtype}")
        weight = torch.empty(shape, dtype=dtype, device="cpu")
        self._model_update_group.broadcast(weight, src=0)
        # A broken sync otherwise shows up only as empty generations steps later.
        if not torch.isfinite(weight).all():
            raise FloatingPointError(f"weight sync received non-finite values for {name}")
        self.model_runner.model.load_weights(weights=[(name, weight)])
