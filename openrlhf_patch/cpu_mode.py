"""CPU mode: the runtime patches that let OpenRLHF's unmodified GPU pipeline run on a CPU.

Applied in every Ray worker (by the set-up hook) and in the driver; never in GPU mode. Each patch
replaces one CUDA-only assumption and nothing else:
  * torch.cuda bookkeeping calls (current_device/set_device/synchronize/current_stream) become
    CPU no-ops, so DeepSpeed strategy, actors and trainer code paths run as written;
  * the replay buffer moves micro-batches to the CPU instead of `cuda:N`;
  * actor -> vLLM weight sync goes through a stateless gloo group instead of vLLM's NCCL
    communicator (`--vllm.sync_backend gloo`). Without it the run still exits 0 but vLLM's
    weights silently become NaN, which `verify_vllm_weights_finite` guards against;
  * vLLM engines load `CPUWorkerWrap` (openrlhf_patch.cpu_vllm_worker) as their worker extension,
    because vLLM's CPU engine runs the model in its own processes that Ray's hook never reaches.
"""
import datetime
import os
import sys

import torch

CPU_STUBS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_stubs")
CPU_WORKER_EXTENSION = "openrlhf_patch.cpu_vllm_worker.CPUWorkerWrap"
UPSTREAM_WORKER_EXTENSION = "openrlhf.trainer.ray.vllm_worker_wrap.WorkerWrap"

# Environment every CPU-mode process needs: a small KV cache (GiB), DeepSpeed's CPU accelerator,
# and threads. The phases of a step (generate, score, train, sync) run one after another on CPU,
# so each may use every core: vLLM would otherwise keep one core for its scheduler (one thread of
# two on a laptop) and Ray gives an actor one OpenMP thread unless told otherwise.
CPU_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_TARGET_DEVICE": "cpu",
    "DS_ACCELERATOR": "cpu",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    "OMP_NUM_THREADS": str(os.cpu_count() or 1),
}


def flash_attn_missing() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("flash_attn") is None
    except ValueError:
        return True


def ensure_flash_attn_importable() -> None:
    """OpenRLHF imports flash_attn at module level; on CPU give it a stub, only where it is missing.
    The stub's folder also goes on this process's PYTHONPATH, for the processes it starts that no
    hook reaches (vLLM's engine core): computed here, it is right on every node of a cluster,
    wherever Ray unpacked ngrpo's code there."""
    if flash_attn_missing() and CPU_STUBS_DIR not in sys.path:
        sys.path.append(CPU_STUBS_DIR)
        paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
        if CPU_STUBS_DIR not in paths:
            os.environ["PYTHONPATH"] = os.pathsep.join(p for p in [*paths, CPU_STUBS_DIR] if p)


def op_cache_env() -> dict:
    """DeepSpeed compiles its CPU ops (shm_comm, fused_adam) at first use into torch's extension
    cache, by default ~/.cache/torch_extensions, shared by every Python environment of the user:
    another DeepSpeed version's build there is loaded as ours and fails ("deepspeed_shm_comm has no
    attribute vector_kernel_level"). Each environment gets its own cache (a user setting wins)."""
    return {"TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))}


def cpu_env() -> dict:
    """Environment variables for Ray workers in CPU mode (user-set values win)."""
    env = {k: os.environ.get(k, v) for k, v in CPU_ENV.items()}
    env.update(op_cache_env())
    if flash_attn_missing():
        # Reaches processes the hook never runs in (vLLM's engine core) through PYTHONPATH.
        env["PYTHONPATH"] = os.pathsep.join(p for p in [os.environ.get("PYTHONPATH", ""), CPU_STUBS_DIR] if p)
    return env


def _cpu_noop(name):
    # A distinct function per attribute: torch._dynamo refuses one object under several names.
    def noop(*args, **kwargs):
        return None

    noop.__name__ = noop.__qualname__ = f"{name}_on_cpu"
    return noop


def patch_torch_cuda() -> None:
    torch.cuda.current_device = lambda: "cpu"
    for name in ("set_device", "synchronize", "current_stream", "empty_cache"):
        setattr(torch.cuda, name, _cpu_noop(name))


class GlooBroadcastGroup:
    """A stateless two-sided gloo group with the `broadcast(tensor, src, stream)` API of vLLM's
    PyNcclCommunicator, so OpenRLHF's weight sync code runs unchanged between processes that
    already have their own default process groups."""

    def __init__(self, master_address, master_port, rank, world_size, timeout_s=600):
        import torch.distributed as dist

        timeout = datetime.timedelta(seconds=timeout_s)
        self._store = dist.TCPStore(master_address, int(master_port), world_size, is_master=(rank == 0), timeout=timeout)
        self._group = dist.ProcessGroupGloo(self._store, rank, world_size, timeout)
        self.rank, self.world_size = rank, world_size

    def broadcast(self, tensor, src, stream=None):
        self._group.broadcast(tensor, src).wait()


def stateless_init_gloo_group(master_address, master_port, rank, world_size, device=None):
    return GlooBroadcastGroup(master_address, master_port, rank, world_size)


def patch_openrlhf_for_cpu() -> None:
    """Patch the OpenRLHF modules of this process (idempotent; safe before or after import)."""
    import openrlhf.utils.distributed_util as distributed_util
    import openrlhf.utils.deepspeed.deepspeed as ds_strategy
    from openrlhf.trainer.ppo_utils import replay_buffer
    from openrlhf.trainer.ray import ppo_actor

    distributed_util.stateless_init_process_group = stateless_init_gloo_group
    ppo_actor.stateless_init_process_group = stateless_init_gloo_group  # imported by name there

    buffer_cls = replay_buffer.NaiveReplayBuffer
    if not getattr(buffer_cls.__init__, "_ngrpo_cpu", False):
        upstream_init = buffer_cls.__init__

        def __init__(self, *args, **kwargs):
            # upstream builds torch.device(f"cuda:{current_device()}"): give it an index, then move to CPU.
            current_device, torch.cuda.current_device = torch.cuda.current_device, lambda: 0
            try:
                upstream_init(self, *args, **kwargs)
            finally:
                torch.cuda.current_device = current_device
            self.target_device = torch.device("cpu")

        __init__._ngrpo_cpu = True
        buffer_cls.__init__ = __init__

    # DeepSpeed's device mesh is created for "cuda"; on CPU the same mesh lives on "cpu".
    if not getattr(ds_strategy.init_device_mesh, "_ngrpo_cpu", False):
        upstream_mesh = ds_strategy.init_device_mesh

        def init_device_mesh(device_type, *args, **kwargs):
            return upstream_mesh("cpu" if device_type == "cuda" else device_type, *args, **kwargs)

        init_device_mesh._ngrpo_cpu = True
        ds_strategy.init_device_mesh = init_device_mesh


def patch_vllm_engine_args() -> None:
    """Make vLLM engines created in this process load the CPU worker extension."""
    import vllm

    if getattr(vllm.AsyncEngineArgs, "_ngrpo_cpu", False):
        return
    upstream = vllm.AsyncEngineArgs

    def AsyncEngineArgs(*args, **kwargs):
        if kwargs.get("worker_extension_cls") == UPSTREAM_WORKER_EXTENSION:
            kwargs["worker_extension_cls"] = CPU_WORKER_EXTENSION
        return upstream(*args, **kwargs)

    AsyncEngineArgs._ngrpo_cpu = True
    vllm.AsyncEngineArgs = AsyncEngineArgs


def apply_cpu_patches() -> None:
    ensure_flash_attn_importable()
    for key, value in cpu_env().items():
        os.environ.setdefault(key, value)
    patch_torch_cuda()
    patch_openrlhf_for_cpu()
    patch_vllm_engine_args()
