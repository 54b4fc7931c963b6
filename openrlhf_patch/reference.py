"""Reference implementations for tests and benchmarks; nothing trains with this module.

* `reference_advantages`: per-group advantages written the way the NGRPO authors' verl 0.2 fork
  does it. Slow on purpose: a dict of groups keyed by prompt index, a Python loop over samples, and
torch.mean / torch.std on each group, as in verl's compute_grpo_outcome_advantage and the
authors' compute_ngrpo_outcome_advantage. Tests and benchmarks/advantages.py check the
vectorised `openrlhf_patch.algorithms.group_advantages` against it.
* `policy_loss`: the asymmetric-clip PPO loss, readable top to bottom; tests hold OpenRLHF's
  PolicyLoss (which training uses) equal to it.

Known difference, kept on purpose because it is how the authors' code behaves: for a group
whose rewards are all equal to a value with no exact float32 mean (e.g. 0.7), torch.mean is
off by one ulp, so (r - mean) / (std + 1e-6) is ~0.056 here instead of 0. The vectorised code
returns exactly 0 there (binary and dyadic rewards are not affected).
"""
from __future__ import annotations

from collections import defaultdict

import torch

from openrlhf_patch import algorithms

AGGREGATIONS = ("token-mean", "seq-mean")


def reference_advantages(
    rewards,
    index,
    estimator: str,
    *,
    virtual_samples: int = 1,
    max_reward: float = 1.0,
    adv_eps: float = 1e-6,
    w_reinforce_lambda: float = 0.1,
) -> torch.Tensor:
    """Advantage of each response; `index[i]` is the prompt (group) response i belongs to.

    Same semantics as algorithms.group_advantages, one sample at a time:
      grpo/ngrpo: (r - mean) / (std + adv_eps) per group, ngrpo with `virtual_samples` extra
      rewards of `max_reward` in the group's mean and std; a lone response has mean 0, std 1.
      dr_grpo: r - mean (mean 0 for a lone response). rloo: r - mean of the others.
      w_reinforce / psr / nsr: +lambda / +1 / 0 if r >= max_reward, else -1 / 0 / -1.
    """
    scores = torch.as_tensor(rewards, dtype=torch.float32).clone()
    bsz = scores.shape[0]

    if estimator in ("w_reinforce", "psr", "nsr"):
        pos, neg = {"w_reinforce": (w_reinforce_lambda, -1.0), "psr": (1.0, 0.0), "nsr": (0.0, -1.0)}[estimator]
        for i in range(bsz):
            scores[i] = pos if scores[i] >= max_reward else neg
        return scores

    id2score = defaultdict(list)
    id2mean = {}
    id2std = {}
    for i in range(bsz):
        id2score[index[i]].append(scores[i])

    for idx, group in id2score.items():
        values = torch.stack(group)
        if estimator == "ngrpo" and len(group) > 1:
            values = torch.cat([values, torch.tensor([max_reward] * virtual_samples, dtype=torch.float32)])
        if len(group) == 1:
            id2mean[idx] = torch.tensor(0.0)
            id2std[idx] = torch.tensor(1.0)
        else:
            id2mean[idx] = torch.mean(values)
            id2std[idx] = torch.std(values)  # Bessel-corrected (N - 1), as torch's default

    out = torch.empty_like(scores)
    for i in range(bsz):
        idx = index[i]
        n = len(id2score[idx])
        if estimator in ("grpo", "ngrpo"):
            out[i] = (scores[i] - id2mean[idx]) / (id2std[idx] + adv_eps)
        elif estimator == "dr_grpo":
            out[i] = scores[i] - id2mean[idx]
        elif estimator == "rloo":
            if n < 2:
                raise ValueError(f"rloo needs at least 2 responses per prompt; prompt {idx} has {n}")
            out[i] = scores[i] - (torch.stack(id2score[idx]).sum() - scores[i]) / (n - 1)
        else:
            raise ValueError(f"unknown estimator {estimator!r}")
    return out


def reference_group_advantages(rewards, group_size: int, estimator: str, **kwargs) -> torch.Tensor:
    """reference_advantages for a batch ordered group by group (prompt index = i // group_size)."""
    n = len(rewards)
    index = [i // group_size for i in range(n)]
    return reference_advantages(rewards, index, estimator, **kwargs)


# --------------------------------------------------------------------------------------------
# The asymmetric-clip policy loss (OpenRLHF's PolicyLoss computes it in training)
# --------------------------------------------------------------------------------------------

def policy_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    action_mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    aggregation: str = "token-mean",
) -> tuple[torch.Tensor, dict]:
    """PPO clipped surrogate with separate lower/upper clip ranges (docs/ALGORITHM.md §3).

    Per token: ratio = exp(logp - logp_old), loss = max(-A*ratio, -A*clamp(ratio, 1-eps_low,
    1+eps_high)). For A > 0 only the upper bound binds and for A < 0 only the lower one, so
    DAPO's clip-higher (eps_high > eps_low) lets rare good tokens grow faster, and NGRPO's
    0.16/0.24 additionally keeps the (now much more frequent) negative updates conservative.

    log_probs, old_log_probs, action_mask: (B, T); advantages: (B,) (one per response, broadcast
    over its tokens) or (B, T). aggregation: "token-mean" (sum over action tokens / their number,
    DAPO's token-level loss, used by every docs/ALGORITHM.md §5 recipe) or "seq-mean" (mean over sequences of
    each sequence's token mean; sequences without action tokens are left out).

    Returns (loss, stats) with detached scalar stats: clip_frac_high (share of action tokens with
    A > 0 and ratio > 1+eps_high, i.e. the clipped branch is active and the token gets no
    gradient), clip_frac_low (A < 0 and ratio < 1-eps_low), clip_frac (their sum, equal to
    OpenRLHF's clip_ratio) and approx_kl (mean of logp_old - logp over action tokens, OpenRLHF's
    and verl's ppo_kl). Like OpenRLHF, the log-ratio is clamped to +-20 before exp().
    """
    algorithms._check_choice("aggregation", aggregation, AGGREGATIONS)
    for name, value in (("eps_low", eps_low), ("eps_high", eps_high)):
        value = algorithms._check_finite_number(name, value)
        if not 0.0 < value < 1.0:
            raise ValueError(f"{name} must be in (0, 1), got {value}")
    if log_probs.dim() != 2:
        raise ValueError(f"log_probs must have shape (B, T), got {tuple(log_probs.shape)}")
    if old_log_probs.shape != log_probs.shape:
        raise ValueError(
            f"old_log_probs has shape {tuple(old_log_probs.shape)} but log_probs has {tuple(log_probs.shape)}"
        )
    if action_mask.shape != log_probs.shape:
        raise ValueError(
            f"action_mask has shape {tuple(action_mask.shape)} but log_probs has {tuple(log_probs.shape)}"
        )
    if advantages.shape == log_probs.shape[:1]:
        advantages = advantages.unsqueeze(-1)
    elif advantages.shape != log_probs.shape:
        raise ValueError(
            f"advantages must have shape (B,) = {tuple(log_probs.shape[:1])} or (B, T) = "
            f"{tuple(log_probs.shape)}, got {tuple(advantages.shape)}"
        )

    dtype = algorithms._compute_dtype(log_probs.dtype)
    mask = action_mask.bool()
    log_probs = log_probs.to(dtype)
    old_log_probs = old_log_probs.to(dtype)
    advantages = advantages.to(dtype)

    # Masked positions are zeroed *before* exp(), so padding holding -inf/NaN log-probs can
    # neither produce NaN in the loss nor leak a NaN gradient back through torch.where.
    log_ratio = torch.where(mask, log_probs - old_log_probs, torch.zeros_like(log_probs))
    ratio = log_ratio.clamp(-algorithms.LOG_RATIO_LIMIT, algorithms.LOG_RATIO_LIMIT).exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    token_loss = torch.where(mask, torch.maximum(unclipped, clipped), torch.zeros_like(unclipped))

    mask_f = mask.to(dtype)
    n_tokens = mask_f.sum()
    if aggregation == "token-mean":
        loss = token_loss.sum() / n_tokens.clamp(min=1.0)
    else:
        per_seq_tokens = mask_f.sum(dim=1)
        has_tokens = per_seq_tokens > 0
        seq_loss = token_loss.sum(dim=1) / per_seq_tokens.clamp(min=1.0)
        loss = (seq_loss * has_tokens).sum() / has_tokens.sum().clamp(min=1)

    stats = algorithms.clip_fractions(log_probs, old_log_probs, advantages, action_mask, eps_low, eps_high)
    with torch.no_grad():
        stats["clip_frac"] = stats["clip_frac_low"] + stats["clip_frac_high"]
        stats["approx_kl"] = (-log_ratio * mask_f).sum() / n_tokens.clamp(min=1.0)
    return loss, stats
