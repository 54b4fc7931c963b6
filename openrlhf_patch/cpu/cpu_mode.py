"""CPU mode: the runtime patches that let OpenRLHF's unmodified GPU pipeline run on a CPU.

Applied in every Ray worker (by the set-up hook) and in the driver, each to its module when the
process imports it (openrlhf_patch/on_import.py); never in GPU mode. Each patch replaces one
CUDA-only assumption and nothing else:
  * torch.cuda bookkeeping calls (current_device/set_device/synchronize/current_stream) become
    CPU no-ops, so DeepSpeed strategy, actors and trainer code paths run as written;
  * the replay buffer moves micro-batches to the CPU instead of `cuda:N`;
  * actor -> vLLM weight sync goes through a stateless gloo group instead of vLLM's NCCL
    communicator (`--vllm.sync_backend gloo`). Without it the run still exits 0 but vLLM's
    weights silently become NaN, which `CPUWorkerWrap.update_weight` guards against; and it
    sends the weights in a few flat buffers instead of one round trip per tensor
    (`broadcast_to_vllm_in_buckets`);
  * vLLM engines load `CPUWorkerWrap` (openrlhf_patch.cpu.cpu_vllm_worker) as their worker extension,
    because vLLM's CPU engine runs the model in its own process, which Ray's hook never reaches;
  * three processes fewer than upstream: openrlhf_patch/cpu/cpu_layout.py.
"""
import contextlib
import datetime
import functools
import os
import shutil
import sys
import tempfile

import torch

CPU_STUBS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_stubs")
CPU_WORKER_EXTENSION = "openrlhf_patch.cpu.cpu_vllm_worker.CPUWorkerWrap"
UPSTREAM_WORKER_EXTENSION = "openrlhf.trainer.ray.vllm_worker_wrap.WorkerWrap"

# How vLLM serves on CPU, for the training engines and `ngrpo eval`'s alike.
VLLM_CPU_ENV = {
    # vLLM would otherwise keep one core for its scheduler: one sampling thread of two on a laptop.
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    # vLLM's CPU platform runs the model in a worker process beside the engine core, a further
    # process importing vLLM (~5 s of start-up, ~0.7 GB) for a model that one process serves. With
    # this the model runs in the engine core, and `ngrpo eval`'s synchronous engine in the eval
    # process itself; OpenRLHF's AsyncLLM keeps its engine-core process either way (OpenRLHF sets
    # the same for --full_determinism).
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
}

# torch's bf16 matmul on CPU runs through oneDNN, which compiles a kernel for each matmul shape and
# keeps it in two caches of 1024 entries each by default: ideep's (LRU_CACHE_CAPACITY, one per
# thread) and oneDNN's own. Generation and training bring new shapes every step (each batch of
# prompt and response lengths), ~0.6 MB each, so a long run grew for hours: vLLM's engine core on
# the tiny model went from 0.41 to 0.94 GB in 200 steps. 64 entries hold what a step reuses:
# generation no slower (tiny, SmolLM2), a training step within the noise (docs/BENCHMARKS.md).
ONEDNN_CACHE_ENV = {"LRU_CACHE_CAPACITY": "64", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64"}


def bound_onednn_caches() -> None:
    """Give this process ONEDNN_CACHE_ENV (a user's values win). oneDNN reads it at its first matmul."""
    for key, value in ONEDNN_CACHE_ENV.items():
        os.environ.setdefault(key, value)


# Environment every CPU-mode process needs: DeepSpeed's CPU accelerator, threads, vLLM's CPU
# serving and no torch.compile (the KV cache is sized to the run by `patch_vllm_engine_args`).
# The phases of a step (generate, score, train, sync) run one after another on CPU, so each may
# use every core: Ray gives an actor one OpenMP thread unless told otherwise.
CPU_ENV = {
    "VLLM_TARGET_DEVICE": "cpu",
    "DS_ACCELERATOR": "cpu",
    "OMP_NUM_THREADS": str(os.cpu_count() or 1),
    **VLLM_CPU_ENV,
    **ONEDNN_CACHE_ENV,
    # OpenRLHF wraps compute_entropy in @torch.compile. On CPU the first call makes inductor build
    # C++ (15 s on a cold cache, 4 s warm, again when shapes change) for a softmax that eager runs
    # in milliseconds (tiny model: step 1 4.4 -> 0.5 s, steady steps unchanged).
    "TORCHDYNAMO_DISABLE": "1",
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


# What CPU needs in order to run; the rest of CPU_ENV is the optional part "cpu-env" (speedups.py).
REQUIRED_CPU_ENV = ("VLLM_TARGET_DEVICE", "DS_ACCELERATOR")


def cpu_env() -> dict:
    """Environment variables for Ray workers in CPU mode (user-set values win)."""
    from openrlhf_patch.cpu import speedups

    optional = speedups.on("cpu-env")
    env = {k: os.environ.get(k, v) for k, v in CPU_ENV.items() if optional or k in REQUIRED_CPU_ENV}
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
    from openrlhf_patch import touchpoints

    touchpoints.patch("torch.cuda.current_device", lambda: "cpu")
    for name in ("set_device", "synchronize", "current_stream", "empty_cache"):
        touchpoints.patch(f"torch.cuda.{name}", _cpu_noop(name))


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


SYNC_BUCKET_BYTES = 256 << 20  # bounds the extra memory a bucket costs on both sides of the sync


def weight_buckets(named_params, max_bytes=SYNC_BUCKET_BYTES):
    """Consecutive runs of parameters of one dtype, each up to `max_bytes` (a larger tensor alone)."""
    bucket, size = [], 0
    for name, param in named_params:
        nbytes = param.numel() * param.element_size()
        if bucket and (param.dtype != bucket[0][1].dtype or size + nbytes > max_bytes):
            yield bucket
            bucket, size = [], 0
        bucket.append((name, param))
        size += nbytes
    if bucket:
        yield bucket


def broadcast_to_vllm_in_buckets(self):
    """CPU replacement of `ActorPPOTrainer.broadcast_to_vllm` (gloo path). Upstream makes one Ray
    call, one RPC into vLLM's engine core and one broadcast per tensor; on CPU that round trip,
    not the bytes, was the cost: 0.1 s of a 0.37 s step on the tiny model (27 tensors), ~3 s a
    step on SmolLM2 (272). Here each bucket of `weight_buckets` is one flat buffer and one call;
    `CPUWorkerWrap.update_weight` takes the lists of names and shapes and splits it."""
    import deepspeed
    import ray
    from openrlhf.trainer.ray import ppo_actor

    args = self.strategy.args
    rank0 = torch.distributed.get_rank() == 0
    cache_reset_refs = []
    if getattr(args.vllm, "enable_prefix_caching", False) and rank0:
        cache_reset_refs = [engine.reset_prefix_cache.remote() for engine in self.vllm_engines]
    model = self.actor.model.module
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad or not getattr(self.actor, "is_vlm", False)]
    zero3 = args.ds.zero_stage == 3
    for bucket in weight_buckets(params):
        with deepspeed.zero.GatheredParameters([p for _, p in bucket], enabled=zero3):
            if rank0:
                names = [n for n, _ in bucket]
                shapes = [tuple(p.ds_shape if zero3 else p.shape) for _, p in bucket]
                flat = torch.cat([p.data.reshape(-1) for _, p in bucket])
                refs = [engine.update_weight.remote(names, dtype=flat.dtype, shape=shapes) for engine in self.vllm_engines]
                self._model_update_group.broadcast(flat, src=0)
                ray.get(refs)
                del flat
        ppo_actor.torch_dist_barrier_and_cuda_sync()
    if cache_reset_refs:
        ray.get(cache_reset_refs)


def patch_weight_sync(trainer_cls) -> None:
    """Send weights in buckets where upstream would use the per-tensor gloo broadcast (not for
    CUDA IPC, Ray collectives, or tensor-parallel DeepSpeed, which gathers differently)."""
    from openrlhf_patch import touchpoints
    from openrlhf_patch.cpu import speedups

    if not speedups.on("weight-buckets"):
        return
    upstream = trainer_cls.broadcast_to_vllm

    @functools.wraps(upstream)
    def broadcast_to_vllm(self):
        args = self.strategy.args
        if self.use_cuda_ipc or getattr(args.vllm, "sync_with_ray", False) or args.ds.tensor_parallel_size > 1:
            return upstream(self)
        return broadcast_to_vllm_in_buckets(self)

    touchpoints.patch("openrlhf.trainer.ray.ppo_actor.ActorPPOTrainer.broadcast_to_vllm", broadcast_to_vllm,
                      owner=trainer_cls)


def _patch_distributed_util(distributed_util) -> None:
    from openrlhf_patch import touchpoints

    touchpoints.patch("openrlhf.utils.distributed_util.stateless_init_process_group", stateless_init_gloo_group,
                      owner=distributed_util)


def _patch_ppo_actor(ppo_actor) -> None:
    from openrlhf_patch import touchpoints

    touchpoints.patch("openrlhf.trainer.ray.ppo_actor.stateless_init_process_group", stateless_init_gloo_group,
                      owner=ppo_actor)  # imported by name there
    patch_weight_sync(ppo_actor.ActorPPOTrainer)  # a plain class: reaches PolicyModelActor by reference


def _patch_replay_buffer(replay_buffer) -> None:
    from openrlhf_patch import touchpoints

    upstream_init = replay_buffer.NaiveReplayBuffer.__init__

    @functools.wraps(upstream_init)
    def __init__(self, *args, **kwargs):
        # upstream builds torch.device(f"cuda:{current_device()}"): give it an index, then move to CPU.
        with touchpoints.patched("torch.cuda.current_device", lambda: 0):
            upstream_init(self, *args, **kwargs)
        self.target_device = torch.device("cpu")

    touchpoints.patch("openrlhf.trainer.ppo_utils.replay_buffer.NaiveReplayBuffer.__init__", __init__,
                      owner=replay_buffer.NaiveReplayBuffer)


def _patch_deepspeed_strategy(ds_strategy) -> None:
    from openrlhf_patch import touchpoints

    # DeepSpeed's device mesh is created for "cuda"; on CPU the same mesh lives on "cpu".
    upstream_mesh = ds_strategy.init_device_mesh

    @functools.wraps(upstream_mesh)
    def init_device_mesh(device_type, *args, **kwargs):
        return upstream_mesh("cpu" if device_type == "cuda" else device_type, *args, **kwargs)

    touchpoints.patch("openrlhf.utils.deepspeed.deepspeed.init_device_mesh", init_device_mesh, owner=ds_strategy)


# module -> its CPU patch, applied when (if ever) the process imports it (openrlhf_patch/on_import.py)
OPENRLHF_CPU_PATCHES = {
    "openrlhf.utils.distributed_util": _patch_distributed_util,
    "openrlhf.trainer.ray.ppo_actor": _patch_ppo_actor,
    "openrlhf.trainer.ppo_utils.replay_buffer": _patch_replay_buffer,
    "openrlhf.utils.deepspeed.deepspeed": _patch_deepspeed_strategy,
}


def patch_openrlhf_for_cpu() -> None:
    """Patch the OpenRLHF modules of this process as it imports them (idempotent; those already
    imported at once)."""
    from openrlhf_patch import upstream

    upstream.patch_on_import(OPENRLHF_CPU_PATCHES)


ROLLOUT_SEQUENCES_ENV = "NGRPO_ROLLOUT_SEQUENCES"  # set by the driver: prompts per step x samples per prompt
VLLM_SCRATCH_ENV = "NGRPO_VLLM_SCRATCH"  # set by the driver of a private node: the engines' temp folder


VLLM_SCRATCH_PREFIX = "ngrpo-vllm-"  # then the owner's pid: ngrpo-vllm-PID-XXXXXXXX
SCRATCH_OWNER = "owner.json"         # in each: {"pid", "start" (its start time, /proc), "host"}
# Removes the folder once every holder of its stdin pipe (the owner) is gone, a SIGKILL included.
_SCRATCH_REAPER = "import shutil, sys\nsys.stdin.buffer.read()\nshutil.rmtree(sys.argv[1], ignore_errors=True)\n"


def _process_start(pid: int):
    """PID's start time (clock ticks since boot, /proc/PID/stat), telling a reused pid apart; None if unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _owner_alive(owner: dict) -> bool:
    pid = int(owner["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        pass
    start, now = owner.get("start"), _process_start(pid)
    return start is None or now is None or now == start


def remove_stale_vllm_scratch(parent=None) -> list:
    """Remove the ngrpo-vllm-* folders in PARENT (default: the temp folder) whose owner, a process of
    this machine, is gone: what runs and evals killed before their own cleanup (and their reaper's)
    left. A folder without a readable owner file (being made, or an older ngrpo's) is left alone,
    and so is every folder of a live owner. Returns the removed paths."""
    import glob
    import json
    import socket

    removed = []
    for path in glob.glob(os.path.join(parent or tempfile.gettempdir(), VLLM_SCRATCH_PREFIX + "*")):
        try:
            with open(os.path.join(path, SCRATCH_OWNER)) as f:
                owner = json.load(f)
            if owner.get("host") != socket.gethostname() or _owner_alive(owner):
                continue
        except (OSError, ValueError, KeyError, TypeError):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


@contextlib.contextmanager
def vllm_scratch_dir(env_vars: dict = None):
    """A temp folder for the vLLM engines of a run (its path in ENV_VARS) or of an eval, removed when
    they end. vLLM puts a torch FileStore file (`vllm_dist_*`) and its ZMQ IPC sockets in the temp
    folder and leaves them there when its processes are killed, as they are when a run ends: ~5 a
    run, ~25 a test suite, in /tmp for good. The folder is named after this process and records
    it (SCRATCH_OWNER); a reaper process removes it if this one is killed, and the next start
    removes what a killed reaper left (remove_stale_vllm_scratch)."""
    import json
    import socket
    import subprocess

    remove_stale_vllm_scratch()
    path = tempfile.mkdtemp(prefix=f"{VLLM_SCRATCH_PREFIX}{os.getpid()}-")
    with open(os.path.join(path, SCRATCH_OWNER), "w") as f:
        json.dump({"pid": os.getpid(), "start": _process_start(os.getpid()), "host": socket.gethostname()}, f)
    try:  # its own session: a signal to this process group (Ctrl-C, kill -- -PGID) does not reach it
        reaper = subprocess.Popen([sys.executable, "-S", "-c", _SCRATCH_REAPER, path], stdin=subprocess.PIPE,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    except OSError:
        reaper = None
    if env_vars is not None:
        env_vars[VLLM_SCRATCH_ENV] = path
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        if reaper is not None:
            reaper.stdin.close()
            with contextlib.suppress(Exception):
                reaper.wait(timeout=10)


def use_vllm_scratch_dir() -> None:
    """In a process about to start a vLLM engine: its temp files and sockets, and those of the
    engine core (a thread, or a process it spawns), go to the run's folder."""
    path = os.environ.get(VLLM_SCRATCH_ENV)
    if path and os.path.isdir(path):
        tempfile.tempdir = path
        os.environ["TMPDIR"] = path
        os.environ["VLLM_RPC_BASE_PATH"] = path


KV_CACHE_FALLBACK_BYTES = 1 << 30


def kv_cache_bytes(model: str, dtype: str, max_model_len: int, sequences: int, trust_remote_code=False) -> int:
    """A KV cache that holds every sequence of a rollout at full length (plus a block each). vLLM
    on CPU would otherwise take VLLM_CPU_KVCACHE_SPACE GiB and fill it with zeros: on the tiny
    model 1 GiB of a 4.1 GB process tree, for a rollout that needs 2 MB."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
        config = getattr(config, "text_config", None) or config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        per_token = 2 * config.num_hidden_layers * (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    except Exception:  # noqa: BLE001 - an architecture this estimate does not know: vLLM's old default
        return KV_CACHE_FALLBACK_BYTES
    itemsize = 4 if str(dtype) in ("float32", "torch.float32") else 2
    return per_token * itemsize * max(1, sequences) * (max_model_len + 128)


def patch_vllm_engine_args() -> None:
    """Make vLLM engines created in this process load the CPU worker extension, with a KV cache
    sized to the rollout (a user's VLLM_CPU_KVCACHE_SPACE still wins: vLLM reads it later) and
    without vLLM's statistics, and in the lean layout run their engine core in a thread
    (vllm_engine_thread). Applied when the process imports vLLM."""
    from openrlhf_patch.on_import import when_imported

    when_imported("vllm", _patch_vllm)


def _patch_vllm(vllm) -> None:
    # vLLM's top-level names are lazy: reading vllm.AsyncEngineArgs imports vLLM's engine
    # arguments and config (~0.6 s), which only a process that builds an engine needs.
    def AsyncEngineArgs(*args, **kwargs):
        from vllm.engine.arg_utils import AsyncEngineArgs as upstream

        if kwargs.get("worker_extension_cls") == UPSTREAM_WORKER_EXTENSION:
            kwargs["worker_extension_cls"] = CPU_WORKER_EXTENSION
        from openrlhf_patch.cpu import speedups

        # Required: without a KV size vLLM's CPU engine reserves 95 % of the machine's memory
        # (gpu_memory_utilization) and refuses to start beside the run's other processes.
        if kwargs.get("kv_cache_memory_bytes") is None and kwargs.get("max_model_len"):
            kwargs["kv_cache_memory_bytes"] = kv_cache_bytes(
                kwargs["model"], kwargs.get("dtype", "bfloat16"), kwargs["max_model_len"],
                int(os.environ.get(ROLLOUT_SEQUENCES_ENV) or 256), kwargs.get("trust_remote_code", False))
        if speedups.on("vllm-stats"):
            # vLLM's statistics (Prometheus histograms fed at every output, scheduler stats at every
            # step) serve its API server, and nothing in a run reads them (tiny model: generation
            # 0.112 -> 0.103 s a step, 4 pairs).
            kwargs.setdefault("disable_log_stats", True)
        use_vllm_scratch_dir()
        # Only a process about to start an engine core: the patch imports vLLM's engine package
        # (1,351 modules, 1.2-1.5 s), which the driver and the policy actor never need.
        from openrlhf_patch.cpu import cpu_layout

        if cpu_layout.lean_layout():
            from openrlhf_patch.cpu.vllm_engine_thread import run_engine_core_in_thread

            run_engine_core_in_thread()
        return upstream(*args, **kwargs)

    from openrlhf_patch import touchpoints

    touchpoints.patch("vllm.AsyncEngineArgs", AsyncEngineArgs, owner=vllm)


def apply_cpu_patches() -> None:
    ensure_flash_attn_importable()
    for key, value in cpu_env().items():
        os.environ.setdefault(key, value)
    # torch read TORCHDYNAMO_DISABLE when this process imported it, which in the driver (it checks
    # the command line first) was before the default above was set; the policy runs there on CPU.
    if os.environ.get("TORCHDYNAMO_DISABLE") == "1":
        import torch._dynamo  # noqa: F401 - what the entry resolves
        from openrlhf_patch import touchpoints

        touchpoints.patch("torch._dynamo.config.disable", True)
    patch_torch_cuda()
    patch_openrlhf_for_cpu()
    patch_vllm_engine_args()
