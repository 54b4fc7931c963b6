"""The PPO ratio's old log-probs without a second policy forward, where training is on-policy.

OpenRLHF's make_experience runs the policy over every rollout (no grad) to get log pi_old, and
ppo_train runs it again (with grad) for log pi_theta. When a rollout trains in exactly one optimizer
step (one epoch, train batch = the rollout's samples), every micro-batch of that step sees the
weights that made the rollout, so log pi_old is log pi_theta itself, detached, and the ratio is 1:
TRL's GRPOTrainer skips the same forward then (num_iterations=1). On CPU that forward was a quarter
of the tiny model's step.

How, in OpenRLHF's own code paths:
  * trainer (`wrap_make_experience_batch`): when the run's settings allow it (`deferral_blocker`),
    make_experience runs with the policy's forward left out (zeros stand in for what it would have
    returned, as they do for a missing reference model) and the experiences carry
    `action_log_probs=None`. After compute_advantages_and_returns has fixed the step's samples
    (PSR and NSR drop some), the trainer checks the step is one whole optimizer step
    (`one_optimizer_step`); if not, it runs upstream's forward on those samples then, with the
    same weights as at the rollout, so nothing changes but the order.
  * policy (`PolicyLossWithClipBounds` in hooks.py): a None old log-prob is `log_probs.detach()`.
  * policy (`wrap_ppo_train`, `check_weights_unchanged`): a micro-batch without old log-probs after
    the optimizer has stepped within the same ppo_train is an error, never a silent off-policy step.

`--old-log-probs forward` (PatchConfig.old_log_probs) keeps upstream's forward at every step.
"""
import functools
import sys
from typing import Optional

import torch

from openrlhf_patch.config import active

MODES = ("reuse-on-policy", "forward")
REUSED_METRIC = "ngrpo/old_log_probs_reused"


def deferral_blocker(args, maker) -> Optional[str]:
    """Why this run's trainer must compute old log-probs with a separate forward, or None when it
    may leave them to the policy. Only settings known before the rollout count here."""
    if active().old_log_probs != "reuse-on-policy":
        return f"--old-log-probs {active().old_log_probs}"
    if args.train.max_epochs != 1:
        return f"{args.train.max_epochs} epochs over each rollout"
    if maker.critic_model_group is not None:
        return "a critic (PPO)"
    if maker.initial_model_group is not None and not args.algo.kl.use_loss:
        return "a KL penalty in the reward (it needs the policy's log-probs)"
    if args.algo.advantage.is_correction_level != "off":
        return "vLLM importance-sampling correction"
    if args.train.dynamic_batch_enable or args.train.async_enable:
        return "dynamic batching or asynchronous training"
    if args.ds.ring_attn_size != 1 or args.ds.tensor_parallel_size != 1:
        return "ring attention or tensor parallelism"
    return None


def one_optimizer_step(batch_sizes, train_batch_size: int, policy_ranks: int) -> bool:
    """Whether experiences of BATCH_SIZES samples make exactly one optimizer step of
    TRAIN_BATCH_SIZE samples, split evenly over POLICY_RANKS (OpenRLHF hands each rank a
    contiguous share of the list, and each rank steps after its share of micro-batches)."""
    return (sum(batch_sizes) == train_batch_size and len(batch_sizes) % policy_ranks == 0
            and len(set(batch_sizes)) == 1)


def _policy_ranks(args) -> int:
    return args.actor.num_nodes * args.actor.num_gpus_per_node


def wrap_make_experience_batch(upstream):
    if getattr(upstream, "_ngrpo", False):
        return upstream

    @functools.wraps(upstream)
    @torch.no_grad()
    def make_experience_batch(self, rollout_samples):
        args = self.strategy.args
        blocker = deferral_blocker(args, self)
        if blocker is None and any(inputs for s in rollout_samples for inputs in s.mm_train_inputs):  # None: text
            blocker = "multimodal inputs"
        if not getattr(self, "_ngrpo_choice_logged", False):
            log_choice(blocker)
            self._ngrpo_choice_logged = True
        if blocker is not None:
            experiences = upstream(self, rollout_samples)
            _mark(experiences, reused=False)
            return experiences
        samples_list = self.split_rollout_samples(rollout_samples)
        experiences = _make_experience_without_policy_forward(self, samples_list)
        experiences = self.compute_advantages_and_returns(experiences)
        # DeepSpeed counts micro-batches across ppo_train calls: a step that was not a whole
        # number of optimizer steps leaves the next one's window shifted, so from then on the
        # trainer cannot know where the optimizer steps and always computes old log-probs.
        sizes = [len(e.sequences) for e in experiences]
        aligned = getattr(self, "_ngrpo_windows_aligned", True)
        reuse = aligned and one_optimizer_step(sizes, args.train.batch_size, _policy_ranks(args))
        self._ngrpo_windows_aligned = aligned and sum(sizes) % args.train.batch_size == 0
        if not reuse:
            refs = self._dispatch_forward(
                self.actor_model_group, args.train.colocate_all or args.train.colocate_actor_ref,
                sequences=[e.sequences for e in experiences], action_mask=[e.action_mask for e in experiences],
                attention_mask=[e.attention_mask for e in experiences])
            for e, log_probs in zip(experiences, self._flatten_results(refs, 1)):
                e.action_log_probs = log_probs
        _mark(experiences, reused=reuse)
        return experiences

    make_experience_batch._ngrpo = True
    return make_experience_batch


def _make_experience_without_policy_forward(maker, samples_list):
    """Upstream's make_experience (reward, critic and reference forwards, KL) with the policy's
    forward replaced by zeros of its shape; the experiences then carry no old log-probs."""
    import ray

    policy_group = maker.actor_model_group
    dispatch = maker._dispatch_forward

    def dispatch_forward(group, sync_condition, **kwargs):
        if group is policy_group:
            return [ray.put([torch.zeros(mask.shape) for mask in kwargs["action_mask"]])]
        return dispatch(group, sync_condition, **kwargs)

    maker._dispatch_forward = dispatch_forward
    try:
        experiences = maker.make_experience(samples_list)
    finally:
        del maker._dispatch_forward  # back to the class's method
    for e in experiences:
        e.action_log_probs = None
    return experiences


def _mark(experiences, reused: bool) -> None:
    for e in experiences:
        e.info[REUSED_METRIC] = torch.full((len(e.sequences),), float(reused))


def wrap_ppo_train(upstream):
    """ActorPPOTrainer.ppo_train, remembering the optimizer steps taken before it began."""
    if getattr(upstream, "_ngrpo", False):
        return upstream

    @functools.wraps(upstream)
    def ppo_train(self, *args, **kwargs):
        self._ngrpo_steps_at_start = self.actor.model.global_steps
        return upstream(self, *args, **kwargs)

    ppo_train._ngrpo = True
    return ppo_train


def check_weights_unchanged(trainer, experience) -> None:
    """A micro-batch without old log-probs must see the weights that generated it."""
    if experience.action_log_probs is not None:
        return
    start = getattr(trainer, "_ngrpo_steps_at_start", None)
    now = trainer.actor.model.global_steps
    if start is None or now != start:
        raise RuntimeError(
            f"ngrpo: a micro-batch has no old log-probs but the optimizer has stepped since its rollout "
            f"(optimizer steps {start} at the start of ppo_train, {now} now), so log pi_old != log pi_theta. "
            "This is a bug in ngrpo's on-policy check; run with --old-log-probs forward and report it.")


def log_choice(blocker: Optional[str]) -> None:
    how = "reused from the training forward when a rollout is one optimizer step" if blocker is None else (
        f"from a separate policy forward ({blocker})")
    print(f"[ngrpo] old log-probs: {how}", file=sys.stderr, flush=True)
