"""How much GPU memory an OpenRLHF run of ngrpo needs, per GPU, before Ray starts anything.

A 7B run that does not fit fails minutes in, inside a Ray actor, with a CUDA out-of-memory error
that names no setting. `estimate()` predicts the peak from the model's shape and the run's layout
and `check_fit()` says, with the numbers, what to change. All sizes are GiB (2**30 bytes; an
"80 GB" H100 has about 79.6 GiB). The model is an upper-bound-style estimate: it leaves out small
things (RMSNorm statistics, attention log-sum-exp, rotary tables) and is meant to separate
"clearly fits" from "clearly does not", not to predict the last GiB.

Symbols: P parameters, h hidden size, L layers, I MLP intermediate size, V vocabulary, kv = KV
heads x head dim (GQA), N the actor's data-parallel world size (nodes x GPUs per node), T tokens
in one micro-batch on one GPU.

Parameters (a Llama/Qwen2 decoder): per layer q (h*h), k and v (h*kv each), o (h*h), the SwiGLU
MLP (3*h*I), two RMSNorms (2*h), plus q/k/v biases for Qwen2; embeddings V*h, a final norm h,
and an lm_head V*h unless tied. Qwen2.5-Math-7B: 7,615,616,512.

Training states, bytes per parameter (mixed precision with Adam, ZeRO paper: Rajbhandari et al.
2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models", sec. 3 and 5):
bf16 weights 2, bf16 gradients 2, fp32 master weights + Adam m + v 12 ("K = 12").
  ZeRO-0: nothing sharded      ZeRO-1: the 12 / N      ZeRO-2: (2 + 12) / N
  ZeRO-3: (2 + 2 + 12) / N, plus the bf16 weights gathered for the module being computed and
          the one prefetched: 2 * 2 * max(one layer, the embedding matrix).
  --ds.adam_offload moves the 12 bytes to the CPU.

Activations kept for backward, bytes per token per layer, bf16, memory-efficient attention
(sdpa / flash-attention: no T x T score matrix), no dropout. Derived as in Korthikanti et al.
2022, "Reducing Activation Recomputation in Large Transformer Models" (sec. 4.1: what each op
saves), for the HF Qwen2/Llama block instead of GPT's:
  two RMSNorms: fp32 copy of the input (4h) + bf16 normalised output (2h) each     24h  -> 12h x 2
  attention: q after RoPE 2h, k and v 2kv each, attention output 2h                 4h + 4kv
  SwiGLU MLP: gate output, SiLU output, up output, their product (2I each)          8I
  = 16h + 4kv + 8I per token per layer (Qwen2.5-7B: 210,944 B, ~5.9 MB per token over 28 layers).
With gradient checkpointing (HF, one checkpoint per decoder layer) only each layer's input is
kept (2h per token per layer) and one layer is recomputed at a time: 2h*L + (16h + 4kv + 8I).

Logits: OpenRLHF's Actor.forward casts the logits to fp32 (openrlhf/models/actor.py) and
computes log-probs and entropy from them, so per token the fp32 logits (4V) are kept for
backward and their fp32 gradient (4V) exists at the start of backward: 8V bytes per token in
training (Qwen2.5: 1.2 MB per token, 19.9 GB for 4 x 4096 tokens). A forward without grad
(reference model, old log-probs) holds the bf16 and fp32 logits at once: 6V bytes per token.
The critic's value head has no vocabulary-sized output.

Tokens per micro-batch T: with packing and dynamic batching (--train.dynamic_batch_enable,
--ds.packing_samples) at most --train.max_tokens_per_gpu; without, micro_batch_size sequences
padded to the longest one, counted at prompt + response length.

Reference model: OpenRLHF builds it as a DeepSpeed inference engine with ZeRO-3 when the actor
uses ZeRO-3 and ZeRO-0 (unsharded bf16 weights, 2P on every GPU) otherwise
(openrlhf/utils/deepspeed/deepspeed.py, get_ds_eval_config).

vLLM: --vllm.gpu_memory_utilization is the share of the whole GPU its engine may take (weights,
activations of its profiling batch, CUDA context, KV cache), so on a GPU it uses exactly
utilization x GPU memory; within that share it needs its weights (2P / tensor-parallel size),
VLLM_RUNTIME_GIB and the KV cache of at least one full-length sequence (2 * L * kv * 2 bytes per
token, divided by the tensor-parallel size).

Colocation (--train.colocate_all with sleep mode) runs the phases one after another on the same
GPUs, so the peak is the largest phase, with everything asleep still holding its share:
  generate:   vLLM awake + every DeepSpeed model asleep
  experience: each model's forward without grad, one at a time (OpenRLHF waits between them)
  train:      actor (or critic) training + the other models asleep + vLLM asleep
Asleep, a DeepSpeed model keeps its bf16 weights on the GPU (OpenRLHF's
offload_deepspeed_states moves optimizer states, fp32 master weights and gradients, not
lp_params); the reference model is not put to sleep at all; a sleeping vLLM keeps its process.
Without colocation each model has its own GPUs and the peak is the largest model's.

Runtime overhead per process on a GPU (CUDA context, NCCL communicators, DeepSpeed buckets,
allocator fragmentation): TRAIN_RUNTIME_GIB for a training process, INFER_RUNTIME_GIB for a
forward-only or sleeping one; a layout fits when the peak is at most (1 - HEADROOM) of the GPU.
"""
from __future__ import annotations

import dataclasses
import json
import math
import subprocess
from pathlib import Path
from typing import Dict, List, Optional

GIB = 2 ** 30
TRAIN_RUNTIME_GIB = 2.0
INFER_RUNTIME_GIB = 1.0
VLLM_RUNTIME_GIB = 2.5
HEADROOM = 0.05
ADAM_BYTES = 12  # fp32 master weights + Adam m + v
# OpenRLHF's 7B hybrid-engine examples (examples/scripts/train_ppo_ray_hybrid_engine.sh).
DEFAULT_MAX_TOKENS_PER_GPU = 16384


class GpuMemoryError(RuntimeError):
    """The layout does not fit; the message names the numbers and what to change."""


@dataclasses.dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tie_embeddings: bool = False
    qkv_bias: bool = True  # Qwen2 has q/k/v biases; Llama has none

    @classmethod
    def from_config(cls, config: dict) -> "ModelShape":
        """From a Hugging Face config.json (Qwen2, Llama, Mistral layouts)."""
        qkv_bias = config.get("attention_bias", config.get("model_type") in ("qwen2", "qwen2_moe"))
        return cls(hidden=config["hidden_size"], layers=config["num_hidden_layers"],
                   heads=config["num_attention_heads"],
                   kv_heads=config.get("num_key_value_heads", config["num_attention_heads"]),
                   intermediate=config["intermediate_size"], vocab=config["vocab_size"],
                   tie_embeddings=bool(config.get("tie_word_embeddings", False)), qkv_bias=bool(qkv_bias))

    @classmethod
    def from_model_dir(cls, path) -> "ModelShape":
        config = Path(path) / "config.json"
        if not config.exists():
            raise FileNotFoundError(f"{config} not found: the memory estimate needs the model's config.json")
        return cls.from_config(json.loads(config.read_text()))

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.hidden // self.heads)

    @property
    def layer_params(self) -> int:
        h, kv = self.hidden, self.kv_dim
        attention = 2 * h * h + 2 * h * kv + ((h + 2 * kv) if self.qkv_bias else 0)
        return attention + 3 * h * self.intermediate + 2 * h

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def params(self) -> int:
        lm_head = 0 if self.tie_embeddings else self.embedding_params
        return self.layers * self.layer_params + self.embedding_params + lm_head + self.hidden

    @property
    def critic_params(self) -> int:
        """OpenRLHF's critic: the same trunk with a value head (h -> 1) instead of the lm_head."""
        lm_head = 0 if self.tie_embeddings else self.embedding_params
        return self.params - lm_head + self.hidden

    def activation_bytes_per_token(self, checkpointing: bool) -> int:
        """Bytes kept for backward per token, all layers (module docstring)."""
        layer = 16 * self.hidden + 4 * self.kv_dim + 8 * self.intermediate
        if checkpointing:
            return 2 * self.hidden * self.layers + layer
        return layer * self.layers

    def kv_cache_bytes_per_token(self, tensor_parallel: int = 1) -> int:
        kv_heads_per_gpu = max(self.kv_heads // tensor_parallel, 1)
        return 2 * self.layers * kv_heads_per_gpu * (self.hidden // self.heads) * 2


@dataclasses.dataclass(frozen=True)
class RunSetup:
    """Everything about a run that decides its GPU memory (OpenRLHF flag in each comment)."""

    nodes: int = 1  # --actor.num_nodes
    gpus_per_node: int = 8  # --actor.num_gpus_per_node
    colocate: bool = True  # --train.colocate_all
    sleep: bool = True  # --ds.enable_sleep (and --vllm.enable_sleep)
    vllm_engines: int = 8  # --vllm.num_engines
    vllm_tensor_parallel: int = 1  # --vllm.tensor_parallel_size
    vllm_gpu_memory_utilization: float = 0.5  # --vllm.gpu_memory_utilization
    max_len: int = 4096  # --data.max_len: prompt + response
    micro_train_batch_size: int = 4  # --train.micro_batch_size
    micro_rollout_batch_size: int = 8  # --rollout.micro_batch_size
    dynamic_batch: bool = False  # --train.dynamic_batch_enable (implies packing)
    train_max_tokens_per_gpu: int = DEFAULT_MAX_TOKENS_PER_GPU  # --train.max_tokens_per_gpu
    rollout_max_tokens_per_gpu: Optional[int] = None  # --rollout.max_tokens_per_gpu (default: train's)
    zero_stage: int = 2  # --ds.zero_stage
    gradient_checkpointing: bool = False  # --actor.gradient_checkpointing_enable
    adam_offload: bool = False  # --ds.adam_offload
    reference: bool = False  # a KL term (--algo.kl.init_coef > 0) makes OpenRLHF build one
    critic: bool = False  # --algo.advantage.estimator gae

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def train_tokens(self) -> int:
        """Tokens in one training micro-batch on one GPU (padded when not packed)."""
        if self.dynamic_batch:
            return self.train_max_tokens_per_gpu
        return self.micro_train_batch_size * self.max_len

    @property
    def rollout_tokens(self) -> int:
        if self.dynamic_batch:
            return self.rollout_max_tokens_per_gpu or self.train_max_tokens_per_gpu
        return self.micro_rollout_batch_size * self.max_len


@dataclasses.dataclass(frozen=True)
class ModelMemory:
    """One DeepSpeed model's memory on one GPU, GiB."""

    weights: float
    grads: float = 0.0
    optimizer: float = 0.0
    zero3_gather: float = 0.0
    activations: float = 0.0
    logits: float = 0.0
    runtime: float = 0.0
    asleep: float = 0.0  # what stays on the GPU while it sleeps (weights + its process)
    forward: float = 0.0  # its peak during a forward without grad (experience making)

    @property
    def total(self) -> float:
        """Its peak while it trains (or, for the reference model, while it runs forward)."""
        return (self.weights + self.grads + self.optimizer + self.zero3_gather + self.activations
                + self.logits + self.runtime)


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    actor: ModelMemory
    reference: Optional[ModelMemory]
    critic: Optional[ModelMemory]
    vllm: float  # vLLM's share of each GPU it runs on
    vllm_needs: float  # what vLLM needs inside that share: weights + runtime + one sequence's KV cache
    phases: Dict[str, float]  # the peak of each phase (colocated) or each model's GPUs (not colocated)

    @property
    def total(self) -> float:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    def summary(self) -> str:
        parts = [f"actor {self.actor.total:.1f}"]
        if self.reference:
            parts.append(f"reference {self.reference.total:.1f}")
        if self.critic:
            parts.append(f"critic {self.critic.total:.1f}")
        parts.append(f"vLLM {self.vllm:.1f}")
        return (f"{', '.join(parts)} GiB; peak {self.total:.1f} GiB per GPU in the {self.peak_phase} phase "
                f"(actor: weights {self.actor.weights:.1f}, grads {self.actor.grads:.1f}, optimizer "
                f"{self.actor.optimizer:.1f}, ZeRO-3 gather {self.actor.zero3_gather:.1f}, activations "
                f"{self.actor.activations:.1f}, logits {self.actor.logits:.1f}, runtime {self.actor.runtime:.1f})")


def _gib(n_bytes: float) -> float:
    return n_bytes / GIB


def _trained_model(params: int, shape: ModelShape, setup: RunSetup, vocab_logits: bool) -> ModelMemory:
    n, stage = setup.world_size, setup.zero_stage
    weights = 2 * params / (n if stage >= 3 else 1)
    grads = 2 * params / (n if stage >= 2 else 1)
    optimizer = 0 if setup.adam_offload else ADAM_BYTES * params / (n if stage >= 1 else 1)
    gather = 2 * 2 * max(shape.layer_params, shape.embedding_params) if stage >= 3 else 0
    tokens = setup.train_tokens
    activations = tokens * shape.activation_bytes_per_token(setup.gradient_checkpointing)
    logits = 8 * shape.vocab * tokens if vocab_logits else 0
    forward = _forward_bytes(shape, setup, vocab_logits)
    asleep_bytes = weights if setup.sleep else weights + grads + optimizer
    return ModelMemory(weights=_gib(weights), grads=_gib(grads), optimizer=_gib(optimizer), zero3_gather=_gib(gather),
                       activations=_gib(activations), logits=_gib(logits), runtime=TRAIN_RUNTIME_GIB,
                       asleep=_gib(asleep_bytes) + INFER_RUNTIME_GIB,
                       forward=_gib(weights + gather + forward) + TRAIN_RUNTIME_GIB)


def _forward_bytes(shape: ModelShape, setup: RunSetup, vocab_logits: bool) -> float:
    """A forward without grad over one rollout micro-batch: one layer's intermediates at a time
    plus (for a language-model head) the bf16 and fp32 logits."""
    tokens = setup.rollout_tokens
    layer = tokens * shape.activation_bytes_per_token(checkpointing=True) / max(shape.layers, 1)
    return layer + (6 * shape.vocab * tokens if vocab_logits else 0)


def _reference_model(shape: ModelShape, setup: RunSetup) -> ModelMemory:
    stage3 = setup.zero_stage >= 3
    weights = 2 * shape.params / (setup.world_size if stage3 else 1)
    gather = 2 * 2 * max(shape.layer_params, shape.embedding_params) if stage3 else 0
    forward = _forward_bytes(shape, setup, vocab_logits=True)
    return ModelMemory(weights=_gib(weights), zero3_gather=_gib(gather), activations=_gib(forward),
                       runtime=INFER_RUNTIME_GIB, asleep=_gib(weights) + INFER_RUNTIME_GIB,
                       forward=_gib(weights + gather + forward) + INFER_RUNTIME_GIB)


def estimate(shape: ModelShape, setup: RunSetup, gpu_gib: float) -> MemoryEstimate:
    """Peak GPU memory per GPU of an OpenRLHF PPO-family run (module docstring for the model)."""
    actor = _trained_model(shape.params, shape, setup, vocab_logits=True)
    reference = _reference_model(shape, setup) if setup.reference else None
    critic = _trained_model(shape.critic_params, shape, setup, vocab_logits=False) if setup.critic else None
    vllm = setup.vllm_gpu_memory_utilization * gpu_gib
    tp = setup.vllm_tensor_parallel
    vllm_needs = (_gib(2 * shape.params / tp + shape.kv_cache_bytes_per_token(tp) * setup.max_len)
                  + VLLM_RUNTIME_GIB)
    trained = [m for m in (actor, critic) if m is not None]
    models = trained + ([reference] if reference else [])
    if setup.colocate:
        asleep = lambda *awake: sum(m.asleep for m in models if all(m is not a for a in awake))
        phases = {"generate": vllm + asleep()}
        phases["experience"] = max(m.forward + asleep(m) for m in models) + INFER_RUNTIME_GIB
        phases["train actor"] = actor.total + asleep(actor) + INFER_RUNTIME_GIB
        if critic:
            phases["train critic"] = critic.total + asleep(critic) + INFER_RUNTIME_GIB
    else:
        phases = {"actor GPUs": max(actor.total, actor.forward), "vLLM GPUs": vllm}
        if reference:
            phases["reference GPUs"] = reference.forward
        if critic:
            phases["critic GPUs"] = max(critic.total, critic.forward)
    return MemoryEstimate(actor=actor, reference=reference, critic=critic, vllm=vllm, vllm_needs=vllm_needs,
                          phases=phases)


# ---------------------------------------------------------------------------------------------
# Does it fit, and if not, what to change
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FitReport:
    fits: bool
    estimate: MemoryEstimate
    gpu_gib: float
    message: str


def _usable(gpu_gib: float) -> float:
    return gpu_gib * (1 - HEADROOM)


def _fits(est: MemoryEstimate, gpu_gib: float) -> bool:
    return est.total <= _usable(gpu_gib)


# Single changes tried in this order; each is (label for the message, change to the setup).
def _remedies(setup: RunSetup) -> List[tuple]:
    out = []
    if setup.zero_stage < 3:
        out.append(("ZeRO-3 (--zero-stage 3; OpenRLHF --ds.zero_stage 3)", dict(zero_stage=3)))
    if not setup.gradient_checkpointing:
        out.append(("--gradient-checkpointing (OpenRLHF --actor.gradient_checkpointing_enable)",
                    dict(gradient_checkpointing=True)))
    if setup.train_tokens > setup.max_len:
        if setup.dynamic_batch:
            fewer = dict(train_max_tokens_per_gpu=setup.max_len, rollout_max_tokens_per_gpu=setup.max_len)
            label = f"fewer tokens per GPU (--train.max_tokens_per_gpu {setup.max_len})"
        else:
            fewer = dict(micro_train_batch_size=1, micro_rollout_batch_size=1)
            label = "fewer tokens per GPU (--micro-train-batch-size 1 --micro-rollout-batch-size 1)"
        out.append((label, fewer))
    if not setup.adam_offload:
        out.append(("Adam states on the CPU (OpenRLHF --ds.adam_offload)", dict(adam_offload=True)))
    return out


def _gpus_needed(shape: ModelShape, setup: RunSetup, gpu_gib: float, limit: int = 1024) -> Optional[int]:
    """The fewest GPUs (whole nodes of this node size, more than now) with which `setup` fits."""
    per_node = setup.gpus_per_node
    for nodes in range(setup.nodes + 1, limit // per_node + 1):
        grown = dataclasses.replace(setup, nodes=nodes, vllm_engines=nodes * per_node // setup.vllm_tensor_parallel)
        if _fits(estimate(shape, grown, gpu_gib), gpu_gib):
            return nodes * per_node
    return None


def _memory_advice(shape: ModelShape, setup: RunSetup, gpu_gib: float) -> List[str]:
    remedies = _remedies(setup)
    advice = []
    for label, change in remedies:
        est = estimate(shape, dataclasses.replace(setup, **change), gpu_gib)
        if _fits(est, gpu_gib):
            advice.append(f"{label} alone gives {est.total:.1f} GiB")
    combined, labels = {}, []
    if not advice:
        # Cumulatively, in order, up to the first combination that fits.
        for label, change in remedies:
            combined.update(change)
            labels.append(label)
            est = estimate(shape, dataclasses.replace(setup, **combined), gpu_gib)
            if _fits(est, gpu_gib):
                advice.append(f"{' + '.join(labels)} together give {est.total:.1f} GiB")
                break
        else:
            if labels:
                advice.append(f"even {' + '.join(labels)} together give {est.total:.1f} GiB")
    gpus = _gpus_needed(shape, setup, gpu_gib)
    if gpus:
        advice.append(f"more GPUs: {gpus} x {gpu_gib:.0f} GiB fit these settings")
    elif combined:
        gpus = _gpus_needed(shape, dataclasses.replace(setup, **combined), gpu_gib)
        with_all = " + ".join(labels)
        advice.append(f"more GPUs: {gpus} x {gpu_gib:.0f} GiB fit with {with_all}" if gpus else
                      f"more GPUs do not help (the per-token memory alone is too large): use larger GPUs")
    return advice


def _vllm_advice(shape: ModelShape, setup: RunSetup, gpu_gib: float) -> str:
    """How to give vLLM room for its weights: a larger share, or tensor parallelism."""
    est = estimate(shape, setup, gpu_gib)
    utilization = est.vllm_needs / gpu_gib
    options = [f"--vllm.gpu_memory_utilization {math.ceil(utilization * 100) / 100:g}"] if utilization <= 0.9 else []
    tp = setup.vllm_tensor_parallel * 2
    while tp <= setup.world_size:
        if estimate(shape, dataclasses.replace(setup, vllm_tensor_parallel=tp), gpu_gib).vllm_needs <= est.vllm:
            options.append(f"--vllm.tensor_parallel_size {tp} (--vllm-tp {tp})")
            break
        tp *= 2
    return " or ".join(options) if options else "larger GPUs (vLLM's weights do not fit at any tensor-parallel size)"


def check_fit(shape: ModelShape, setup: RunSetup, gpu_gib: float) -> FitReport:
    est = estimate(shape, setup, gpu_gib)
    head = (f"GPU memory for {setup.world_size} x {gpu_gib:.0f} GiB (usable {_usable(gpu_gib):.1f} GiB each, "
            f"{shape.params / 1e9:.2f}B parameters): {est.summary()}")
    problems, advice = [], []
    if not _fits(est, gpu_gib):
        problems.append(f"the {est.peak_phase} phase needs {est.total:.1f} GiB per GPU")
        advice += _memory_advice(shape, setup, gpu_gib)
    if est.vllm_needs > est.vllm:
        problems.append(f"vLLM's share ({setup.vllm_gpu_memory_utilization:g} x {gpu_gib:.0f} = {est.vllm:.1f} GiB) "
                        f"cannot hold its weights, runtime and one {setup.max_len}-token sequence's KV cache "
                        f"({est.vllm_needs:.1f} GiB)")
        advice.append("for vLLM: " + _vllm_advice(shape, setup, gpu_gib))
    if not problems:
        return FitReport(True, est, gpu_gib, head + " -> fits")
    message = head + "\nDoes not fit: " + "; ".join(problems) + ".\nWhat to change: " + "; ".join(advice) + "."
    return FitReport(False, est, gpu_gib, message)


def require_fit(shape: ModelShape, setup: RunSetup, gpu_gib: float) -> MemoryEstimate:
    report = check_fit(shape, setup, gpu_gib)
    if not report.fits:
        raise GpuMemoryError(report.message)
    return report.estimate


# ---------------------------------------------------------------------------------------------
# From ngrpo recipes and OpenRLHF's parsed arguments
# ---------------------------------------------------------------------------------------------
def models_for_recipe(recipe) -> dict:
    """Which models OpenRLHF builds besides the actor and vLLM (as pipelines.launch.training decides)."""
    uses_kl = recipe.kl_mode != "none" and recipe.kl_coef != 0
    return dict(reference=uses_kl, critic=recipe.estimator == "gae")


def setup_from_openrlhf_args(args) -> RunSetup:
    """A RunSetup from OpenRLHF's validated hierarchical args (pipelines.launch.training.parse_with_openrlhf)."""
    return RunSetup(
        nodes=args.actor.num_nodes, gpus_per_node=args.actor.num_gpus_per_node,
        colocate=bool(args.train.colocate_all), sleep=bool(args.ds.enable_sleep),
        vllm_engines=args.vllm.num_engines, vllm_tensor_parallel=args.vllm.tensor_parallel_size,
        vllm_gpu_memory_utilization=args.vllm.gpu_memory_utilization, max_len=args.data.max_len,
        micro_train_batch_size=args.train.micro_batch_size, micro_rollout_batch_size=args.rollout.micro_batch_size,
        dynamic_batch=bool(args.train.dynamic_batch_enable), train_max_tokens_per_gpu=args.train.max_tokens_per_gpu,
        rollout_max_tokens_per_gpu=args.rollout.max_tokens_per_gpu, zero_stage=args.ds.zero_stage,
        gradient_checkpointing=bool(args.actor.gradient_checkpointing_enable), adam_offload=bool(args.ds.adam_offload),
        reference=args.algo.kl.init_coef > 0, critic=bool(args.critic.model_name_or_path),
    )


def gpu_total_gib() -> float:
    """Memory of this machine's GPU 0, read through NVML or nvidia-smi: asking torch would create a
    CUDA context in the driver process, which would then hold GPU memory for the whole run."""
    try:
        import pynvml  # nvidia-ml-py, a vLLM dependency

        pynvml.nvmlInit()
        try:
            return pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).total / GIB
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=60, check=True)
        return float(out.stdout.split()[0]) / 1024  # MiB
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        raise GpuMemoryError("cannot read the GPU memory size here (no NVML, no nvidia-smi): give it as gpu_gib, "
                             "e.g. 79.6 for an 80 GB H100") from None


def check_openrlhf_args(args, gpu_gib: Optional[float] = None) -> FitReport:
    """The fit of a parsed OpenRLHF command line on this machine's GPUs (GPU 0's size unless
    `gpu_gib` is given); the model's shape comes from its config.json."""
    if gpu_gib is None:
        gpu_gib = gpu_total_gib()
    shape = ModelShape.from_model_dir(args.actor.model_name_or_path)
    return check_fit(shape, setup_from_openrlhf_args(args), gpu_gib)
