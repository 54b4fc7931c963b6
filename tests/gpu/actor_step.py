"""One DeepSpeed optimizer step of OpenRLHF's Actor with ngrpo's patched PolicyLoss, as
ActorPPOTrainer.training_step does it (a tiny random Qwen2 from pipelines/launch/tiny_model.py).

    python tests/gpu/actor_step.py --device cuda --zero-stage 3 --optimizer fused

prints one line `NGRPO-STEP {json}`: loss, clip fractions, whether the weights changed. Run in
its own process per case (tests/gpu/test_deepspeed_actor_step_cuda.py), because a process keeps
one distributed group and ZeRO-3's global Hugging Face hook.
"""
import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))


def ds_config(stage: int, optimizer: str) -> dict:
    """OpenRLHF's own ZeRO config and AdamW section (DeepspeedStrategy._ds_init_train_model)."""
    from openrlhf.utils.deepspeed.deepspeed_utils import get_train_ds_config

    params = {"lr": 1e-3, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.0}
    if optimizer == "torch":
        params["torch_adam"] = True  # torch.optim.AdamW instead of DeepSpeed's JIT-compiled FusedAdam
    config = get_train_ds_config(offload=False, adam_offload=False, stage=stage, param_dtype="bf16", max_norm=1.0,
                                 zpg=1, optim_config={"type": "AdamW", "params": params})
    config.update(train_micro_batch_size_per_gpu=4, train_batch_size=4)
    return config


def _params(engine, stage):
    import deepspeed
    import torch

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=stage == 3):
        return [p.detach().float().cpu().clone() for p in params]


def step(device: str, stage: int, optimizer: str) -> dict:
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29561")
    if device == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"
    from openrlhf_patch.cpu.cpu_mode import ensure_flash_attn_importable

    ensure_flash_attn_importable()
    import deepspeed
    import torch
    from openrlhf.models import Actor
    from openrlhf.models.loss import PolicyLoss

    from openrlhf_patch import algorithms
    from openrlhf_patch.policy_loss import make_policy_loss_class
    from pipelines.launch.tiny_model import build_tiny_model

    deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo")
    if device == "cuda":
        torch.cuda.set_device(0)
    config = ds_config(stage, optimizer)
    model_dir = build_tiny_model(Path(tempfile.mkdtemp()) / "tiny", seed=0)
    actor = Actor(str(model_dir), attn_implementation="sdpa", param_dtype="bf16", ds_config=config)
    trainable = [p for p in actor.model.parameters() if p.requires_grad]
    engine, opt, _, _ = deepspeed.initialize(model=actor.model, model_parameters=trainable, config=config)
    actor.model = engine  # as DeepspeedStrategy.prepare does for an Actor
    before = _params(engine, stage)

    dev = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    B, T, A = 4, 48, 16  # 4 samples (one group), 48 tokens, the last 16 are the response
    sequences = torch.randint(3, 500, (B, T), generator=gen).to(dev)
    attention_mask = torch.ones(B, T, dtype=torch.long, device=dev)
    attention_mask[1, :5] = 0  # left padding, as OpenRLHF's rollouts have
    action_mask = torch.ones(B, A, dtype=torch.bool, device=dev)
    action_mask[2, -4:] = False  # a response that stopped early
    log_probs = actor(sequences, action_mask, attention_mask=attention_mask)
    old_log_probs = (log_probs.detach() + 0.2 * torch.randn(B, A, generator=gen).to(dev)) * action_mask
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0], device=dev)
    advantages = algorithms.group_advantages(rewards, B, "ngrpo").unsqueeze(1) * action_mask
    loss_fn = make_policy_loss_class(PolicyLoss)(clip_eps_low=0.16, clip_eps_high=0.24, token_level_loss=True)
    (loss, clip_ratio, ppo_kl, _, _), metrics = loss_fn.loss_and_metrics(log_probs, old_log_probs, advantages,
                                                                          action_mask=action_mask)
    engine.backward(loss)
    engine.step()
    after = _params(engine, stage)
    fractions = {k: v.item() for k, v in metrics.items()}
    return {
        "device": device, "zero_stage": stage, "optimizer": type(getattr(opt, "optimizer", opt)).__name__,
        "loss": loss.item(), "loss_finite": bool(torch.isfinite(loss).item()), "clip_ratio": clip_ratio.item(),
        "clip_fractions": fractions, "log_probs_device": log_probs.device.type,
        # bf16 RMSNorm weights of 1.0 move by lr=1e-3 in fp32 only (bf16's spacing at 1.0 is 2^-7): count matrices
        "matrices_changed": sum(not torch.equal(a, b) for a, b in zip(before, after) if a.dim() >= 2),
        "matrices": sum(a.dim() >= 2 for a in before),
        "weights_finite": all(bool(torch.isfinite(p).all()) for p in after),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--zero-stage", type=int, default=3)
    parser.add_argument("--optimizer", default="fused", choices=["fused", "torch"])
    args = parser.parse_args(argv)
    print("NGRPO-STEP " + json.dumps(step(args.device, args.zero_stage, args.optimizer)), flush=True)


if __name__ == "__main__":
    main()
