"""NGRPO's algorithm core: group advantages, group filters, the dual-clip policy loss, diagnostics.

Pure torch (no openrlhf / ray / vllm / deepspeed), so it can be tested on CPU and reused by any
trainer. Everything is vectorised over the batch: a batch is a 1-D tensor of B = n_groups *
group_size scalar rewards ordered group by group (all samples of prompt 0, then prompt 1, ...),
which is the layout OpenRLHF's `n_samples_per_prompt` rollouts already have. Reshaping to
(n_groups, group_size) turns every per-group statistic into one reduction over dim 1.

Sources (SPEC.md is the project's reading of them):
  * NGRPO: Nan et al., "NGRPO: Negative-enhanced Group Relative Policy Optimization",
    arXiv 2509.18851, and the authors' verl 0.2 fork (compute_ngrpo_outcome_advantage).
  * GRPO: Shao et al., DeepSeekMath, arXiv 2402.03300.
  * Dr. GRPO: Liu et al., "Understanding R1-Zero-Like Training", arXiv 2503.20783.
  * RLOO: Ahmadian et al., arXiv 2402.14740.
  * PSR / NSR / W-REINFORCE: Zhu et al., "The Surprising Effectiveness of Negative
    Reinforcement in LLM Reasoning", arXiv 2506.01347.
  * DAPO (clip-higher, dynamic sampling): Yu et al., arXiv 2503.14476.
"""
from __future__ import annotations

import math
import operator

import torch

ESTIMATORS = ("grpo", "ngrpo", "dr_grpo", "rloo", "w_reinforce", "psr", "nsr")
GROUP_FILTERS = ("none", "drop_all_correct", "drop_all_correct_and_all_wrong", "drop_all_wrong")
AGGREGATIONS = ("token-mean", "seq-mean")

# OpenRLHF's PolicyLoss clamps the log-ratio to this range before exp(): a token whose new and
# old log-probs differ by more than 20 nats is garbage either way, and exp(>88) is inf in float32.
_LOG_RATIO_LIMIT = 20.0


# --------------------------------------------------------------------------------------------
# Input checks. Each raises ValueError naming the argument and the bad value, because these
# run inside Ray workers where a bare assertion in a 40-frame traceback is hard to act on.
# --------------------------------------------------------------------------------------------

def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Statistics over 8 samples in bf16 (8 bits of mantissa) would be visibly wrong, so anything
    # narrower than float32 (half, bf16, ints, bools) is promoted; float64 stays float64.
    return torch.promote_types(dtype, torch.float32)


def _check_group_size(group_size) -> int:
    if isinstance(group_size, bool):
        raise ValueError(f"group_size must be an integer >= 1, got {group_size!r}")
    try:
        group_size = operator.index(group_size)
    except TypeError:
        raise ValueError(f"group_size must be an integer >= 1, got {group_size!r}") from None
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    return group_size


def _check_finite_number(name: str, value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a finite number, got {value!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return value


def _check_rewards(rewards, group_size: int) -> torch.Tensor:
    """Return `rewards` as a 1-D float tensor (>= float32) after checking shape and values."""
    if not isinstance(rewards, torch.Tensor):
        rewards = torch.as_tensor(rewards)
    if rewards.dim() != 1:
        raise ValueError(
            f"rewards must be a 1-D tensor of one scalar reward per response, got shape {tuple(rewards.shape)}"
        )
    rewards = rewards.to(_compute_dtype(rewards.dtype))
    if rewards.numel() % group_size != 0:
        raise ValueError(
            f"rewards has {rewards.numel()} elements, which is not a multiple of group_size={group_size} "
            "(the batch must hold whole groups, ordered group by group)"
        )
    finite = torch.isfinite(rewards)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten()
        first = int(bad[0])
        raise ValueError(
            f"rewards contains {bad.numel()} non-finite value(s) (NaN or inf); "
            f"first at index {first} (value {rewards[first].item()})"
        )
    return rewards


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(choices)}")


# --------------------------------------------------------------------------------------------
# Advantages
# --------------------------------------------------------------------------------------------

def _group_normalise(groups: torch.Tensor, virtual_samples: int, virtual_value: float, eps: float):
    """(x - mean) / (std + eps) per row, with `virtual_samples` extra copies of `virtual_value`.

    Statistics are taken on deviations from a per-row shift (the virtual value when there are
    virtual samples, else the row's first element). The variance is shift-invariant, but the
    shift makes a row of identical values give deviations that are exactly 0, so all-correct
    groups get an advantage of exactly 0 instead of rounding noise divided by eps (which can be
    O(0.1) for rewards such as 0.7 whose float mean is not exactly 0.7). The virtual samples
    then have deviation 0 and only enter through the count N and the mean.
    """
    n_real = groups.shape[1]
    n_total = n_real + virtual_samples
    if virtual_samples > 0:
        shift = torch.full_like(groups[:, :1], virtual_value)
    else:
        shift = groups[:, :1]
    dev = groups - shift
    mean_dev = dev.sum(dim=1, keepdim=True) / n_total
    centred = dev - mean_dev
    # Bessel-corrected (N - 1) as torch.std in the reference code; each virtual sample sits at
    # deviation 0, i.e. at -mean_dev from the mean.
    sq = centred.square().sum(dim=1, keepdim=True) + virtual_samples * mean_dev.square()
    std = (sq / (n_total - 1)).sqrt()
    return centred / (std + eps)


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    estimator: str,
    *,
    virtual_samples: int = 1,
    max_reward: float = 1.0,
    eps: float = 1e-6,
    w_reinforce_lambda: float = 0.1,
) -> torch.Tensor:
    """One scalar advantage per response, from the rewards of its group (shape (B,) -> (B,)).

    estimator:
      * "grpo" (DeepSeekMath): (r - mean_g) / (std_g + eps), std Bessel-corrected. A group whose
        responses all get the same reward gets 0, so on hard data most samples are wasted.
      * "ngrpo" (NGRPO, SPEC §2): as grpo, but each group's mean/std also count
        `virtual_samples` (K) virtual responses of reward `max_reward` (R_max). An all-wrong
        group now has mean > r and std > 0, so it gets a negative advantage (-1/3 each for
        G=8, K=1) and is learned from; the virtual samples are never returned or trained on.
        K=0 is exactly grpo. R_max is the largest reward the task can give, not the batch max.
      * "dr_grpo" (Dr. GRPO): r - mean_g, no std division, which removes GRPO's bias towards
        groups with a small reward spread.
      * "rloo" (RLOO): r - mean of the other G-1 rewards of the group (needs group_size >= 2).
      * "w_reinforce" (Zhu et al. 2025): +w_reinforce_lambda for a correct response
        (reward >= max_reward), -1 for a wrong one, no baseline or normalisation; "psr" keeps
        only the positive part (+1 / 0) and "nsr" only the negative part (0 / -1).

    A group of a single response (group_size == 1) has mean 0 and std 1, so
    A = (r - 0) / (1 + eps) ~= r, with no virtual sample, exactly as the authors' verl code does
    for grpo and ngrpo; dr_grpo likewise uses mean 0 there (A = r).

    Returns a tensor of dtype >= float32 on the rewards' device. Raises ValueError on non-finite
    rewards, a batch that is not whole groups, an ngrpo reward above max_reward, or bad options.
    """
    _check_choice("estimator", estimator, ESTIMATORS)
    group_size = _check_group_size(group_size)
    eps = _check_finite_number("eps", eps)
    if eps <= 0:
        raise ValueError(f"eps must be > 0 (it keeps (r - mean) / (std + eps) finite), got {eps}")
    max_reward = _check_finite_number("max_reward", max_reward)
    w_reinforce_lambda = _check_finite_number("w_reinforce_lambda", w_reinforce_lambda)
    if isinstance(virtual_samples, bool):
        raise ValueError(f"virtual_samples must be an integer >= 0, got {virtual_samples!r}")
    try:
        virtual_samples = operator.index(virtual_samples)
    except TypeError:
        raise ValueError(f"virtual_samples must be an integer >= 0, got {virtual_samples!r}") from None
    if virtual_samples < 0:
        raise ValueError(f"virtual_samples must be >= 0, got {virtual_samples}")
    if estimator == "rloo" and group_size < 2:
        raise ValueError(f"estimator 'rloo' needs group_size >= 2 (a leave-one-out baseline), got {group_size}")

    rewards = _check_rewards(rewards, group_size)

    if estimator == "ngrpo":
        # A reward above R_max would make the virtual sample a *worse* response than a real one
        # and flip NGRPO's calibration, which almost always means max_reward is misconfigured.
        above = rewards > max_reward
        if bool(above.any()):
            idx = above.nonzero().flatten()
            first = int(idx[0])
            raise ValueError(
                f"rewards[{first}] = {rewards[first].item()} is above max_reward={max_reward} "
                f"({idx.numel()} reward(s) above it); ngrpo's virtual samples must carry the largest "
                "reward the task can give"
            )

    # Sample-wise estimators: correctness alone decides the advantage (Zhu et al. 2025).
    if estimator in ("w_reinforce", "psr", "nsr"):
        correct = rewards >= max_reward
        pos, neg = {"w_reinforce": (w_reinforce_lambda, -1.0), "psr": (1.0, 0.0), "nsr": (0.0, -1.0)}[estimator]
        return torch.where(correct, torch.full_like(rewards, pos), torch.full_like(rewards, neg))

    groups = rewards.view(-1, group_size)

    if group_size == 1:
        # verl's convention for a lone response: mean 0, std 1 (and no virtual sample).
        if estimator == "dr_grpo":
            return rewards.clone()
        std = torch.ones_like(rewards)
        return (rewards - 0.0) / (std + eps)

    if estimator == "grpo":
        adv = _group_normalise(groups, 0, 0.0, eps)
    elif estimator == "ngrpo":
        adv = _group_normalise(groups, virtual_samples, max_reward, eps)
    elif estimator == "dr_grpo":
        dev = groups - groups[:, :1]  # shifted so identical rewards give exactly 0
        adv = dev - dev.mean(dim=1, keepdim=True)
    else:  # rloo
        dev = groups - groups[:, :1]
        others_mean = (dev.sum(dim=1, keepdim=True) - dev) / (group_size - 1)
        adv = dev - others_mean
    return adv.reshape(-1)


# --------------------------------------------------------------------------------------------
# Group filters (dynamic sampling)
# --------------------------------------------------------------------------------------------

def _group_kinds(rewards: torch.Tensor, group_size: int, max_reward: float):
    """(all_correct, all_wrong) per group; correct means reward >= max_reward."""
    correct = (rewards >= max_reward).view(-1, group_size)
    return correct.all(dim=1), ~correct.any(dim=1)


def group_keep_mask(rewards: torch.Tensor, group_size: int, mode: str, *, max_reward: float = 1.0) -> torch.Tensor:
    """Which groups to keep (shape (n_groups,), bool) under a dynamic-sampling filter.

    * "drop_all_correct" (NGRPO, SPEC §4): an all-correct group has advantage 0 under both grpo
      and ngrpo, so it is dropped; all-wrong groups are kept because NGRPO gives them signal.
    * "drop_all_correct_and_all_wrong" (DAPO): under grpo both kinds carry no gradient.
    * "drop_all_wrong": the mirror image, for ablations. "none": keep everything.
    A response is correct when its reward is >= max_reward, so with partial-credit rewards
    "all wrong" means "no response reached max_reward".
    """
    _check_choice("mode", mode, GROUP_FILTERS)
    group_size = _check_group_size(group_size)
    max_reward = _check_finite_number("max_reward", max_reward)
    rewards = _check_rewards(rewards, group_size)
    all_correct, all_wrong = _group_kinds(rewards, group_size, max_reward)
    if mode == "none":
        return torch.ones_like(all_correct)
    if mode == "drop_all_correct":
        return ~all_correct
    if mode == "drop_all_wrong":
        return ~all_wrong
    return ~(all_correct | all_wrong)


# --------------------------------------------------------------------------------------------
# Policy loss with asymmetric clipping
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
    """PPO clipped surrogate with separate lower/upper clip ranges (SPEC §3).

    Per token: ratio = exp(logp - logp_old), loss = max(-A*ratio, -A*clamp(ratio, 1-eps_low,
    1+eps_high)). For A > 0 only the upper bound binds and for A < 0 only the lower one, so
    DAPO's clip-higher (eps_high > eps_low) lets rare good tokens grow faster, and NGRPO's
    0.16/0.24 additionally keeps the (now much more frequent) negative updates conservative.

    log_probs, old_log_probs, action_mask: (B, T); advantages: (B,) (one per response, broadcast
    over its tokens) or (B, T). aggregation: "token-mean" (sum over action tokens / their number,
    DAPO's token-level loss, used by every SPEC §5 recipe) or "seq-mean" (mean over sequences of
    each sequence's token mean; sequences without action tokens are left out).

    Returns (loss, stats) with detached scalar stats: clip_frac_high (share of action tokens with
    A > 0 and ratio > 1+eps_high, i.e. the clipped branch is active and the token gets no
    gradient), clip_frac_low (A < 0 and ratio < 1-eps_low), clip_frac (their sum, equal to
    OpenRLHF's clip_ratio) and approx_kl (mean of logp_old - logp over action tokens, OpenRLHF's
    and verl's ppo_kl). Like OpenRLHF, the log-ratio is clamped to +-20 before exp().
    """
    _check_choice("aggregation", aggregation, AGGREGATIONS)
    for name, value in (("eps_low", eps_low), ("eps_high", eps_high)):
        value = _check_finite_number(name, value)
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

    dtype = _compute_dtype(log_probs.dtype)
    mask = action_mask.bool()
    log_probs = log_probs.to(dtype)
    old_log_probs = old_log_probs.to(dtype)
    advantages = advantages.to(dtype)

    # Masked positions are zeroed *before* exp(), so padding holding -inf/NaN log-probs can
    # neither produce NaN in the loss nor leak a NaN gradient back through torch.where.
    log_ratio = torch.where(mask, log_probs - old_log_probs, torch.zeros_like(log_probs))
    ratio = log_ratio.clamp(-_LOG_RATIO_LIMIT, _LOG_RATIO_LIMIT).exp()
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

    with torch.no_grad():
        denom = n_tokens.clamp(min=1.0)
        high = ((advantages > 0) & (ratio > 1.0 + eps_high) & mask).to(dtype).sum() / denom
        low = ((advantages < 0) & (ratio < 1.0 - eps_low) & mask).to(dtype).sum() / denom
        approx_kl = (-log_ratio * mask_f).sum() / denom
    stats = {"clip_frac_low": low, "clip_frac_high": high, "clip_frac": low + high, "approx_kl": approx_kl}
    return loss, stats


# --------------------------------------------------------------------------------------------
# Diagnostics
# --------------------------------------------------------------------------------------------

def batch_diagnostics(
    rewards: torch.Tensor,
    group_size: int,
    advantages: torch.Tensor | None = None,
    *,
    max_reward: float = 1.0,
) -> dict[str, float]:
    """What kind of groups a batch holds and where the advantage mass goes (for logging).

    NGRPO's claim is that all-wrong groups, which are most groups on hard data, stop being
    wasted: under grpo their advantage sum is 0, under ngrpo it is negative (-8/3 for G=8,
    K=1), and every mixed group gets a net negative push. Logging the share of each group kind
    and the advantage summed over each kind shows this directly in a run.

    Returns floats: frac_all_wrong, frac_all_correct, frac_mixed (shares of groups), accuracy
    (share of responses with reward >= max_reward), and, when `advantages` (shape (B,)) is
    given, adv_sum_all_wrong, adv_sum_all_correct, adv_sum_mixed (sum over those groups'
    responses). An empty batch gives zeros.
    """
    group_size = _check_group_size(group_size)
    max_reward = _check_finite_number("max_reward", max_reward)
    rewards = _check_rewards(rewards, group_size)
    all_correct, all_wrong = _group_kinds(rewards, group_size, max_reward)
    mixed = ~(all_correct | all_wrong)
    # Counts are divided in float64 so that shares such as 2/5 come back as the nearest double.
    n_groups = max(all_correct.numel(), 1)
    values = [
        all_wrong.sum().double() / n_groups,
        all_correct.sum().double() / n_groups,
        mixed.sum().double() / n_groups,
        (rewards >= max_reward).sum().double() / max(rewards.numel(), 1),
    ]
    keys = ["frac_all_wrong", "frac_all_correct", "frac_mixed", "accuracy"]
    if advantages is not None:
        if advantages.shape != rewards.shape:
            raise ValueError(
                f"advantages must have the shape of rewards {tuple(rewards.shape)}, got {tuple(advantages.shape)}"
            )
        per_group = advantages.to(_compute_dtype(advantages.dtype)).view(-1, group_size).sum(dim=1)
        for kind, sel in (("all_wrong", all_wrong), ("all_correct", all_correct), ("mixed", mixed)):
            values.append(torch.where(sel, per_group, torch.zeros_like(per_group)).sum())
            keys.append(f"adv_sum_{kind}")
    # One device->host transfer for all values instead of one .item() per key.
    host = torch.stack([v.to(torch.float64) for v in values]).tolist()
    return dict(zip(keys, host))
