"""How NGRPO gets into OpenRLHF 0.11.2: small wraps around upstream code, in the workers.

1. Advantages (run inside the PPOTrainer Ray actor): `RemoteExperienceMaker.compute_advantages_and_returns`.
   For ngrpo / w_reinforce / psr / nsr the group step is done by `algorithms.group_advantages`;
   everything around it (length penalties, KL-in-reward, per-token returns) is OpenRLHF's own
   code. For upstream estimators (group_norm = GRPO, dr_grpo, rloo, gae) upstream runs unchanged.
   Either way the batch diagnostics (share of all-wrong / all-correct / mixed groups, advantage
   mass per kind, accuracy) are attached to the experiences, and so reach the step's metrics.
2. Loss (inside PolicyModelActor): OpenRLHF's PolicyLoss already clips with separate
   eps_low/eps_high; `PolicyLossWithClipBounds` also measures the share of tokens clipped at each
   bound (SPEC §3), and `ActorPPOTrainer.training_step` reports it.
3. Trainer (inside PPOTrainer): `RunLogger` (OpenRLHF's TensorboardLogger plus metrics.jsonl and a
   progress line per step), and a clean stop after `max_steps` (the sample generator reports the
   loader exhausted, so OpenRLHF saves and exits normally).

Only plain classes are patched. A @ray.remote class (PPOTrainer, PolicyModelActor) is shipped to
the workers with its own copies of every inherited method, taken when the class is decorated, so
a patch on its base classes never reaches the actor; the plain objects it builds and calls
(experience maker, ActorPPOTrainer, loggers, sample generator) are imported by reference.
"""
import functools
import itertools
import json
import os
import time

import torch

from openrlhf_patch import algorithms
from openrlhf_patch.config import PatchConfig

PATCHED_ESTIMATORS = ("ngrpo", "w_reinforce", "psr", "nsr")


def _config() -> PatchConfig:
    return PatchConfig.from_env() or PatchConfig()


# ---------------------------------------------------------------------------------------------
# 1. Advantages
# ---------------------------------------------------------------------------------------------
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


def _ngrpo_advantages(self, experiences, cfg):
    from openrlhf.models.utils import compute_reward
    from openrlhf.trainer.ppo_utils.length_penalty import apply_length_penalties

    args = self.strategy.args
    for e in experiences:
        e.rewards = e.rewards.to(torch.promote_types(e.rewards.dtype, torch.float32))
    apply_length_penalties(experiences, args)
    rewards, indices, exp_len = _in_prompt_order(experiences, [e.rewards for e in experiences])
    advantages = algorithms.group_advantages(
        rewards,
        args.rollout.n_samples_per_prompt,
        cfg.estimator,
        virtual_samples=cfg.virtual_samples,
        max_reward=cfg.max_reward,
        eps=cfg.adv_eps,
        w_reinforce_lambda=cfg.w_reinforce_lambda,
    )
    for e, adv in zip(experiences, advantages[indices].split(exp_len)):
        # The scalar advantage takes the place of the outcome reward; KL-in-reward (if any) and
        # the per-token cumulative return are OpenRLHF's own (gamma = 1 for outcome rewards).
        token_reward = compute_reward(adv, self.kl_ctl.value, e.kl, action_mask=e.action_mask,
                                      reward_clip_range=args.reward.clip_range)
        e.returns = self.get_cumulative_returns(token_reward, e.action_mask, 1.0)
        e.advantages = e.returns.clone()
        e.info["return"] = token_reward.sum(dim=-1)
        e.kl = None
    return experiences


def wrap_compute_advantages(upstream):
    if getattr(upstream, "_ngrpo", False):
        return upstream

    @functools.wraps(upstream)
    @torch.no_grad()
    def compute_advantages_and_returns(self, experiences):
        cfg = _config()
        group_size = self.strategy.args.rollout.n_samples_per_prompt
        raw_rewards, _, _ = _in_prompt_order(experiences, [e.rewards.float() for e in experiences])
        started = time.perf_counter()
        if cfg.estimator in PATCHED_ESTIMATORS:
            experiences = _ngrpo_advantages(self, experiences, cfg)
        else:
            experiences = upstream(self, experiences)
        elapsed = time.perf_counter() - started
        per_sample_adv, _, _ = _in_prompt_order(
            experiences, [_first_action_value(e.advantages, e.action_mask).float() for e in experiences]
        )
        diagnostics = algorithms.batch_diagnostics(raw_rewards, group_size, per_sample_adv, max_reward=cfg.max_reward)
        diagnostics["advantage_time_s"] = elapsed
        for e in experiences:
            # Per-sample copies of batch-level numbers: OpenRLHF averages "info" entries over
            # samples, which gives the number back in the step's metrics.
            n = len(e.index)
            for key, value in diagnostics.items():
                e.info[f"ngrpo/{key}"] = torch.full((n,), float(value))
        return experiences

    compute_advantages_and_returns._ngrpo = True
    return compute_advantages_and_returns


# ---------------------------------------------------------------------------------------------
# 2. Loss: clip fractions at each bound
# ---------------------------------------------------------------------------------------------
def make_policy_loss_class(upstream_cls):
    if getattr(upstream_cls, "_ngrpo", False):
        return upstream_cls

    class PolicyLossWithClipBounds(upstream_cls):
        """OpenRLHF's PolicyLoss, plus the share of tokens clipped at the low and high bound."""

        _ngrpo = True

        def forward(self, log_probs, old_log_probs, advantages, action_mask=None, *args, **kwargs):
            out = super().forward(log_probs, old_log_probs, advantages, action_mask, *args, **kwargs)
            if self.policy_loss_type == "ppo" and action_mask is not None:
                with torch.no_grad():
                    _, stats = algorithms.policy_loss(
                        log_probs.detach(), old_log_probs.detach(), advantages.detach(), action_mask,
                        eps_low=self.clip_eps_low, eps_high=self.clip_eps_high,
                    )
                self.last_clip_fractions = {k: stats[k] for k in ("clip_frac_low", "clip_frac_high")}
            return out

    return PolicyLossWithClipBounds


def wrap_training_step(upstream):
    if getattr(upstream, "_ngrpo", False):
        return upstream

    @functools.wraps(upstream)
    def training_step(self, *args, **kwargs):
        status = upstream(self, *args, **kwargs)
        for key, value in getattr(self.actor_loss_fn, "last_clip_fractions", {}).items():
            status["metrics"][key] = value.detach().reshape(())
            status["weights"][key] = "token"
        return status

    training_step._ngrpo = True
    return training_step


# ---------------------------------------------------------------------------------------------
# 3. Trainer: per-step log, progress line, max steps
# ---------------------------------------------------------------------------------------------
def _scalar_items(status):
    for key, value in status.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            yield key, float(value)


def progress_line(step, metrics) -> str:
    def get(*keys):
        for k in keys:
            if k in metrics:
                return metrics[k]
        return float("nan")

    return (
        f"[ngrpo] step {step}: reward {get('rollout/reward_mean', 'reward'):.4f} "
        f"accuracy {get('ngrpo/accuracy'):.4f} all-wrong groups {get('ngrpo/frac_all_wrong'):.3f} "
        f"policy_loss {get('policy_loss'):.4f} ({get('timing/step_total'):.1f}s)"
    )


def make_run_logger_class(upstream_cls):
    """OpenRLHF's TensorboardLogger, also writing RUN_DIR/metrics.jsonl and a progress line."""
    if getattr(upstream_cls, "_ngrpo", False):
        return upstream_cls

    class RunLogger(upstream_cls):
        _ngrpo = True

        def __init__(self, args):
            super().__init__(args)
            self.run_dir = _config().run_dir

        def log_train(self, global_step, logs_dict):
            _progress["global_step"] = global_step
            super().log_train(global_step, logs_dict)
            metrics = dict(_scalar_items(logs_dict))
            if self.run_dir:
                with open(os.path.join(self.run_dir, "metrics.jsonl"), "a") as f:
                    f.write(json.dumps({"step": global_step, "time": time.time(), **metrics}) + "\n")
            print(progress_line(global_step, metrics), flush=True)

        def log_eval(self, global_step, logs_dict):
            super().log_eval(global_step, logs_dict)
            if self.run_dir:
                metrics = dict(_scalar_items(logs_dict))
                with open(os.path.join(self.run_dir, "eval_metrics.jsonl"), "a") as f:
                    f.write(json.dumps({"step": global_step, "time": time.time(), **metrics}) + "\n")

    return RunLogger


# The trainer's latest finished step in this process (PPOTrainer runs one fit at a time).
_progress = {}


def wrap_generate_samples(upstream):
    if getattr(upstream, "_ngrpo", False):
        return upstream

    @functools.wraps(upstream)
    def generate_samples(self, *args, **kwargs):
        cfg = _config()
        step = _progress.get("global_step", cfg.start_step)
        # Reporting the loader exhausted ends OpenRLHF's fit loop the normal way (final save
        # included) without generating a batch that would never be trained on.
        if cfg.max_steps is not None and step >= cfg.max_steps:
            return [], None, 0, True
        return upstream(self, *args, **kwargs)

    generate_samples._ngrpo = True
    return generate_samples
