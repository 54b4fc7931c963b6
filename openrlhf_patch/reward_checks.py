"""Rewards the trainer can use: every reward is checked before the group filter and the
advantages read it (a missing or non-finite one stops the run with the reward file's own error).

OpenRLHF logs a reward function's exception at INFO level and trains on without a reward; ngrpo's
reward file (pipelines/reward.py) records the user's traceback in RUN_DIR/logs/reward_error.txt,
and the error raised here quotes it.
"""
import os

import torch

REWARD_ERROR_FILE = os.path.join("logs", "reward_error.txt")  # written by pipelines/reward.py


def recorded_error(run_dir) -> str:
    """The first failure of the user's reward function in RUN_DIR's launch, or ''."""
    path = os.path.join(run_dir or "", REWARD_ERROR_FILE)
    if not run_dir or not os.path.exists(path):
        return ""
    with open(path) as f:
        return f.read()


class RewardError(RuntimeError):
    """The reward function returned something training cannot use (NaN, inf, nothing)."""


def checked_rewards(experience, cfg) -> torch.Tensor:
    """EXPERIENCE's rewards (one per sample, float64); RewardError when one is missing or not finite.
    Runs on every group in the filter's loop and on the whole batch before the advantages."""
    if experience.rewards is None:
        # OpenRLHF logs a reward function's exception at INFO level and goes on without a
        # reward; ngrpo's reward file recorded the user's traceback for this message.
        raise RewardError(recorded_error(cfg.run_dir) or
                          f"the reward function ({cfg.reward_file}) returned no reward for a response of "
                          f"prompt {experience.prompts[0][:200]!r}; its error is in the run's log")
    rewards = experience.rewards.detach().reshape(len(experience.rewards), -1)[:, 0].to(torch.float64)
    bad = (~torch.isfinite(rewards)).nonzero()
    if len(bad):
        i = int(bad[0])
        raise RewardError(f"the reward function ({cfg.reward_file}) returned {rewards[i].item()} for a response of "
                          f"prompt {experience.prompts[i][:200]!r} (label {experience.labels[i]!r}); "
                          "rewards must be finite numbers")
    return rewards


def response_rewards(experiences, cfg) -> torch.Tensor:
    """The rewards of one prompt's responses (one experience each), checked."""
    return torch.cat([checked_rewards(e, cfg) for e in experiences])
