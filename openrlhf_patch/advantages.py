"""Patch 1, advantages (inside the PPOTrainer Ray actor):
`RemoteExperienceMaker.compute_advantages_and_returns`.

For every estimator of ngrpo's core (algorithms.ESTIMATORS: grpo, ngrpo, w_reinforce, psr, nsr,
...) the group step is `algorithms.group_advantages`; everything around it (length penalties,
KL-in-reward, per-token returns) is OpenRLHF's own code. OpenRLHF's own estimators (the
baselines) run upstream unchanged. Either way the batch diagnostics (share of all-wrong /
all-correct / mixed groups, advantage mass per kind, accuracy) ride in the experiences' info into
the step metrics.
"""
import functools
import itertools
import time

import torch

from openrlhf_patch import algorithms
from openrlhf_patch.config import active
from openrlhf_patch.reward_checks import checked_rewards


def _in_prompt_order(experiences, values):
    """Concatenate per-experience 1-D tensors into prompt order (OpenRLHF shuffles them into
    micro-batches; `experience.index` remembers each sample's original position)."""
    exp_len = [len(e.index) for e in experiences]
    indices = torch.tensor(list(itertools.chain.from_iterable(e.index for e in experiences)))
    flat = torch.cat(values, dim=0)
    ordered = torch.empty_like(flat)
    ordered[indices] = flat
    return ordered, indices, exp_len


def _first_action_value(tensor, action_mask):
    """The per-token advantage at each response's first action token (= the sample's scalar
    advantage for outcome-reward estimators)."""
    first = action_mask.float().argmax(dim=-1)
    return tensor.gather(1, first.unsqueeze(1)).squeeze(1)


def _core_advantages(self, experiences, cfg):
    """OpenRLHF's compute_advantages_and_returns with ngrpo's group step in place of its own."""
    from openrlhf.models.utils import compute_reward
    from openrlhf.trainer.ppo_utils.length_penalty import apply_length_penalties

    args = self.strategy.args
    group_size = args.rollout.n_samples_per_prompt
    for e in experiences:
        e.rewards = e.rewards.to(torch.promote_types(e.rewards.dtype, torch.float32))
    apply_length_penalties(experiences, args)
    rewards, indices, exp_len = _in_prompt_order(experiences, [e.rewards for e in experiences])
    advantages = algorithms.group_advantages(rewards, group_size, cfg.estimator, **cfg.estimator_options)
    # OpenRLHF logs the spread of rewards within groups for its own group estimators; so do we.
    group_std = rewards.view(-1, group_size).std(dim=1, keepdim=True).expand(-1, group_size).reshape(-1)
    for e, adv, std in zip(experiences, advantages[indices].split(exp_len), group_std[indices].split(exp_len)):
        # The scalar advantage takes the place of the outcome reward; KL-in-reward (if any) and
        # the per-token cumulative return are OpenRLHF's own (gamma = 1 for outcome rewards).
        token_reward = compute_reward(adv, self.kl_ctl.value, e.kl, action_mask=e.action_mask,
                                      reward_clip_range=args.reward.clip_range)
        e.returns = self.get_cumulative_returns(token_reward, e.action_mask, 1.0)
        e.advantages = e.returns.clone()
        e.info["return"] = token_reward.sum(dim=-1)
        e.info["group_reward_std"] = std
        e.kl = None
    return experiences


def _keep_trained_samples(experiences, keep, micro_batch_size):
    """Only the samples KEEP marks (prompt order), re-batched into micro-batches: PSR and NSR
    train on one class of responses, as the authors run them. A step with none of that class
    keeps one sample with its advantage zeroed, so OpenRLHF still has a batch to step on."""
    from openrlhf.trainer.ppo_utils.experience import make_experience_batch, split_experience_batch

    items = []
    for e in experiences:
        flags = keep[torch.as_tensor(e.index)].tolist()
        for item, flag in zip(split_experience_batch(e), flags):
            if flag:
                items.append(item)
    if not items:
        item = split_experience_batch(experiences[0])[0]
        item.advantages = torch.zeros_like(item.advantages)
        item.returns = torch.zeros_like(item.returns)
        items = [item]
    batches = [make_experience_batch(items[i:i + micro_batch_size]) for i in range(0, len(items), micro_batch_size)]
    for b in batches:
        b.index = None
        # make_experience_batch leaves per-sample info tensors as a list; OpenRLHF wants tensors.
        b.info = {k: torch.stack(v) if isinstance(v, list) and v and isinstance(v[0], torch.Tensor) else v
                  for k, v in b.info.items()}
    return batches


def wrap_compute_advantages(upstream):
    @functools.wraps(upstream)
    @torch.no_grad()
    def compute_advantages_and_returns(self, experiences):
        cfg = active()
        group_size = self.strategy.args.rollout.n_samples_per_prompt
        for e in experiences:  # before an estimator, ngrpo's or OpenRLHF's, reads them
            checked_rewards(e, cfg)
        raw_rewards, _, _ = _in_prompt_order(experiences, [e.rewards.float() for e in experiences])
        started = time.perf_counter()
        if cfg.estimator is not None:
            experiences = _core_advantages(self, experiences, cfg)
        else:
            experiences = upstream(self, experiences)
        elapsed = time.perf_counter() - started
        per_sample_adv, _, _ = _in_prompt_order(
            experiences, [_first_action_value(e.advantages, e.action_mask).float() for e in experiences]
        )
        diagnostics = algorithms.batch_diagnostics(raw_rewards, group_size, per_sample_adv, max_reward=cfg.max_reward,
                                                   estimator=cfg.estimator, estimator_options=cfg.estimator_options)
        diagnostics["advantage_time_s"] = elapsed
        keep = None
        if cfg.estimator is not None and algorithms.ESTIMATORS[cfg.estimator].trains_on != "all":
            keep = algorithms.trained_mask(raw_rewards, cfg.estimator, cfg.max_reward)
            diagnostics["trained_frac"] = keep.double().mean().item()
        for e in experiences:
            # Per-sample copies of batch-level numbers: OpenRLHF averages "info" entries over
            # samples, which gives the number back in the step's metrics.
            n = len(e.index)
            for key, value in diagnostics.items():
                e.info[f"ngrpo/{key}"] = torch.full((n,), float(value))
        if keep is not None:
            experiences = _keep_trained_samples(experiences, keep, self.strategy.args.rollout.micro_batch_size)
        return experiences

    return compute_advantages_and_returns
