"""Per-group reference advantages, written the way the NGRPO authors' verl 0.2 fork does it.

Slow on purpose: a dict of groups keyed by prompt index, a Python loop over samples, and
torch.mean / torch.std on each group, as in verl's compute_grpo_outcome_advantage and the
authors' compute_ngrpo_outcome_advantage. Tests and benchmarks/advantages.py check the
vectorised `openrlhf_patch.algorithms.group_advantages` against it; nothing trains with it.

Known difference, kept on purpose because it is how the authors' code behaves: for a group
whose rewards are all equal to a value with no exact float32 mean (e.g. 0.7), torch.mean is
off by one ulp, so (r - mean) / (std + 1e-6) is ~0.056 here instead of 0. The vectorised code
returns exactly 0 there (binary and dyadic rewards are not affected).
"""
from __future__ import annotations

from collections import defaultdict

import torch


def reference_advantages(
    rewards,
    index,
    estimator: str,
    *,
    virtual_samples: int = 1,
    max_reward: float = 1.0,
    eps: float = 1e-6,
    w_reinforce_lambda: float = 0.1,
) -> torch.Tensor:
    """Advantage of each response; `index[i]` is the prompt (group) response i belongs to.

    Same semantics as algorithms.group_advantages, one sample at a time:
      grpo/ngrpo: (r - mean) / (std + eps) per group, ngrpo with `virtual_samples` extra
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
            out[i] = (scores[i] - id2mean[idx]) / (id2std[idx] + eps)
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
