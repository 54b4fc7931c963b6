"""(1) ngrpo's patched loss over OpenRLHF's PolicyLoss, and the advantage core, on CUDA tensors
give their CPU results (values, clip fractions, gradients)."""
import pytest
import torch

from openrlhf_patch import algorithms

CUDA = torch.device("cuda")


def _batch(seed=0, groups=16, group_size=8, T=96):
    gen = torch.Generator().manual_seed(seed)
    B = groups * group_size
    log_probs = -3 * torch.rand(B, T, generator=gen)
    old_log_probs = log_probs + 0.3 * torch.randn(B, T, generator=gen)
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    rewards = (torch.rand(B, generator=gen) < 0.3).float()
    return log_probs, old_log_probs, mask, rewards, group_size


def _loss_run(loss_cls, device, estimator="ngrpo"):
    log_probs, old, mask, rewards, G = (t.to(device) if torch.is_tensor(t) else t for t in _batch())
    adv = algorithms.group_advantages(rewards, G, estimator, virtual_samples=1, max_reward=1.0)
    advantages = adv.unsqueeze(1).expand_as(log_probs) * mask
    log_probs = log_probs.clone().requires_grad_(True)
    loss_fn = loss_cls(clip_eps_low=0.16, clip_eps_high=0.24, token_level_loss=True)
    (loss, clip_ratio, ppo_kl, _, _), metrics = loss_fn.loss_and_metrics(log_probs, old, advantages, action_mask=mask)
    loss.backward()
    stats = {k: v.item() for k, v in metrics.items()}
    return loss.item(), clip_ratio.item(), ppo_kl.item(), stats, log_probs.grad.cpu(), metrics


@pytest.mark.parametrize("estimator", ["ngrpo", "grpo", "dr_grpo", "rloo", "w_reinforce"])
def test_patched_policy_loss_on_cuda_equals_cpu(openrlhf_models, estimator):
    from openrlhf_patch.policy_loss import make_policy_loss_class

    patched = make_policy_loss_class(openrlhf_models.PolicyLoss)
    cpu = _loss_run(patched, torch.device("cpu"), estimator)
    gpu = _loss_run(patched, CUDA, estimator)
    assert all(v.device.type == CUDA.type for v in gpu[5].values())
    assert gpu[0] == pytest.approx(cpu[0], rel=1e-5, abs=1e-6)
    assert gpu[1] == pytest.approx(cpu[1], abs=1e-6) and gpu[2] == pytest.approx(cpu[2], rel=1e-5, abs=1e-6)
    assert gpu[3] == pytest.approx(cpu[3], abs=1e-6)
    assert gpu[3]["clip_frac_low"] + gpu[3]["clip_frac_high"] == pytest.approx(gpu[1], abs=1e-6)
    assert torch.allclose(gpu[4], cpu[4], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("estimator", algorithms.ESTIMATORS)
def test_group_advantages_on_cuda_equal_cpu(estimator):
    *_, rewards, G = _batch(seed=1)
    rewards[:G] = 0.0  # one all-wrong group
    rewards[G:2 * G] = 1.0  # one all-correct group
    cpu = algorithms.group_advantages(rewards, G, estimator)
    gpu = algorithms.group_advantages(rewards.to(CUDA), G, estimator)
    assert gpu.device.type == CUDA.type and gpu.dtype == cpu.dtype
    assert torch.allclose(gpu.cpu(), cpu, rtol=1e-6, atol=1e-6)
    if estimator == "ngrpo":  # SPEC: an all-wrong group of 8 with K=1 gets -1/3 each
        assert torch.allclose(gpu[:G].cpu(), torch.full((G,), -1 / 3), atol=1e-4)


def test_batch_diagnostics_on_cuda_equal_cpu():
    *_, rewards, G = _batch(seed=2)
    rewards[:G] = 0.0
    adv = algorithms.group_advantages(rewards, G, "ngrpo")
    cpu = algorithms.batch_diagnostics(rewards, G, adv)
    gpu = algorithms.batch_diagnostics(rewards.to(CUDA), G, adv.to(CUDA))
    assert gpu.keys() == cpu.keys()
    for key in cpu:
        assert gpu[key] == pytest.approx(cpu[key], rel=1e-6, abs=1e-6), key
    assert gpu["adv_sum_all_wrong"] <= -8 / 3 + 1e-4
