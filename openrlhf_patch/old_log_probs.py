"""The PPO ratio's old log-probs without a second policy forward, where training is on-policy.

OpenRLHF's make_experience runs the policy over every rollout (no grad) to get log pi_old, and
ppo_train runs it again (with grad) for log pi_theta. When a rollout trains in exactly one optimizer
step (one epoch, train batch = the rollout's samples), every micro-batch of that step sees the
weights that made the rollout, so log pi_old is log pi_theta itself, detached, and the ratio is 1:
TRL's GRPOTrainer skips the same forward then (num_iterations=1). On CPU that forward was a quarter
of the tiny model's step.

The decision is taken from the run's configuration, before any rollout, as TRL's is from
num_iterations (`deferral_blocker`, `one_step_blocker`): reuse iff --old-log-probs reuse-on-policy,
no critic, no KL penalty in the reward, no vLLM importance-sampling correction, no asynchronous
training (its rollouts are one step off-policy), no dynamic batching, ring attention or tensor
parallelism, one epoch, a train batch of exactly the rollout's samples,
an estimator that trains on every sample (PSR and NSR drop some), and micro-batches that split
evenly over the policy's ranks. Any other configuration (the paper preset's 4 optimizer steps per
rollout, for one) runs OpenRLHF's make_experience_batch unchanged at every step.

How, in OpenRLHF's own code paths:
  * trainer (`wrap_make_experience_batch`): where the configuration allows reuse, OpenRLHF's own
    make_experience_batch runs with the policy's forward left out (`_policy_forward_left_out`):
    NaN tensors of its shape stand in for what it would have returned, and the experiences leave
    make_experience with `action_log_probs=None`. In these configurations OpenRLHF reads the
    policy's log-probs only for a KL in the reward (refused) and otherwise makes the logged KL of
    zeros_like; a NaN that reached a metric or an advantage anyway would show, never a plausible 0.
    A rollout of another size than the configuration's (the last, short one of an episode: the
    prompt loader serves every prompt, batch size 1) is not one optimizer step and leaves
    DeepSpeed's accumulation window shifted for every later step: from that rollout on, the run
    computes old log-probs with OpenRLHF's forward (logged once).
  * policy (`PolicyLossWithClipBounds` in policy_loss.py): a None old log-prob is `log_probs.detach()`.
  * policy (`wrap_ppo_train`, `check_weights_unchanged`): a micro-batch without old log-probs after
    the optimizer has stepped within the same ppo_train is an error, never a silent off-policy step.

`--old-log-probs forward` (PatchConfig.old_log_probs) keeps upstream's forward at every step.
OpenRLHF's make_experience, which the NaN analysis above rests on, is hashed in
openrlhf_patch/upstream.py COPIES.
"""
import contextlib
import functools
import sys
from typing import Optional

import torch

from openrlhf_patch.algorithms import ESTIMATORS
from openrlhf_patch.config import active

MODES = ("reuse-on-policy", "forward")
REUSED_METRIC = "ngrpo/old_log_probs_reused"


def deferral_blocker(args, maker) -> Optional[str]:
    """Why this run's trainer must compute old log-probs with a separate forward, or None when it
    may leave them to the policy. A function of the configuration alone (ARGS, OpenRLHF's parsed
    arguments; MAKER's model groups; the active PatchConfig), known before the first rollout."""
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
    if args.train.async_enable:
        # OpenRLHF's generator actor makes rollout k+1 while the trainer steps on rollout k: a
        # rollout reaches training after the weights that generated it have moved.
        return "asynchronous training: its rollouts are generated one step behind the weights they train"
    if args.train.dynamic_batch_enable:
        return "dynamic batching (the optimizer steps where the token budget says, not once per rollout)"
    if args.ds.ring_attn_size != 1 or args.ds.tensor_parallel_size != 1:
        return "ring attention or tensor parallelism"
    return one_step_blocker(args)


def rollout_samples(args) -> int:
    """Samples in a full rollout of this configuration."""
    return args.rollout.batch_size * args.rollout.n_samples_per_prompt


def one_step_blocker(args) -> Optional[str]:
    """Why a full rollout of this configuration is not exactly one optimizer step with the weights
    that generated it, or None. OpenRLHF cuts a rollout into micro-batches of
    rollout.micro_batch_size and hands each policy rank a contiguous share of them; each rank
    steps its optimizer after train.batch_size / ranks samples (DeepSpeed counts micro-batches
    across ppo_train calls)."""
    samples, train_batch = rollout_samples(args), args.train.batch_size
    if train_batch != samples:
        if samples % train_batch == 0:
            return f"{samples // train_batch} optimizer steps per rollout"
        return f"an optimizer step of {train_batch} samples for rollouts of {samples}"
    estimator = active().estimator
    if estimator is not None:
        trains_on = ESTIMATORS[estimator].trains_on
        if trains_on != "all":
            return f"{estimator} trains on the {trains_on} responses only (a step's size depends on the rewards)"
    ranks, micro = _policy_ranks(args), args.rollout.micro_batch_size
    if samples % micro or (samples // micro) % ranks:
        return (f"{samples} samples in micro-batches of {micro} do not split evenly over {ranks} policy "
                f"rank{'s' if ranks > 1 else ''}")
    return None


def _policy_ranks(args) -> int:
    return args.actor.num_nodes * args.actor.num_gpus_per_node


def wrap_make_experience_batch(upstream):
    @functools.wraps(upstream)
    @torch.no_grad()
    def make_experience_batch(self, rollout_samples_):
        args = self.strategy.args
        if not hasattr(self, "_ngrpo_blocker"):  # the configuration's decision, once
            self._ngrpo_blocker = deferral_blocker(args, self)
            log_choice(self._ngrpo_blocker)
        blocker = self._ngrpo_blocker
        expected = rollout_samples(args)
        if blocker is None and len(rollout_samples_) != expected:
            # DeepSpeed's accumulation window no longer ends with a rollout: from now on the
            # trainer cannot know where the optimizer steps.
            blocker = self._ngrpo_blocker = (
                f"a rollout of {len(rollout_samples_)} samples, not {expected}, shifted the optimizer's steps")
            log_fallback(blocker)
        if blocker is None and any(inputs for s in rollout_samples_ for inputs in s.mm_train_inputs):  # None: text
            blocker = "multimodal inputs"  # this rollout only: the windows stay aligned
        if blocker is not None:
            experiences = upstream(self, rollout_samples_)
            _mark(experiences, reused=False)
            return experiences
        with _policy_forward_left_out(self):
            experiences = upstream(self, rollout_samples_)
        trained = sum(len(e.sequences) for e in experiences)
        if trained != expected:
            raise RuntimeError(
                f"ngrpo: {trained} of a rollout's {expected} samples reached training although this "
                "configuration trains on every sample, and their old log-probs were left to the policy. This is "
                "a bug in ngrpo's on-policy check (openrlhf_patch/old_log_probs.py); run with --old-log-probs "
                "forward and report it.")
        _mark(experiences, reused=True)
        return experiences

    return make_experience_batch


def nan_log_probs(action_masks):
    """What the policy's forward returns for these micro-batches, as NaN: read by mistake, it
    poisons whatever it reaches instead of passing for a log-prob of 0."""
    return [torch.full(tuple(mask.shape), float("nan")) for mask in action_masks]


@contextlib.contextmanager
def _policy_forward_left_out(maker):
    """Within it, MAKER's make_experience leaves out the policy's forward (`nan_log_probs` stand in
    for its result; reward, critic and reference forwards run as usual) and returns experiences
    with action_log_probs=None."""
    import ray

    policy_group = maker.actor_model_group
    dispatch, make_experience = maker._dispatch_forward, maker.make_experience

    def dispatch_forward(group, sync_condition, **kwargs):
        if group is policy_group:
            return [ray.put(nan_log_probs(kwargs["action_mask"]))]
        return dispatch(group, sync_condition, **kwargs)

    def make_experience_without_old_log_probs(samples_list):
        experiences = make_experience(samples_list)
        for e in experiences:
            e.action_log_probs = None
        return experiences

    maker._dispatch_forward = dispatch_forward
    maker.make_experience = make_experience_without_old_log_probs
    try:
        yield
    finally:
        del maker._dispatch_forward, maker.make_experience  # back to the class's methods


def _mark(experiences, reused: bool) -> None:
    for e in experiences:
        e.info[REUSED_METRIC] = torch.full((len(e.sequences),), float(reused))


def wrap_ppo_train(upstream):
    """ActorPPOTrainer.ppo_train, remembering the optimizer steps taken before it began."""
    @functools.wraps(upstream)
    def ppo_train(self, *args, **kwargs):
        self._ngrpo_steps_at_start = self.actor.model.global_steps
        return upstream(self, *args, **kwargs)

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
    how = "reused from the training forward: a rollout is one optimizer step" if blocker is None else (
        f"from a separate policy forward ({blocker})")
    print(f"[ngrpo] old log-probs: {how}", file=sys.stderr, flush=True)


def log_fallback(reason: str) -> None:
    print(f"[ngrpo] old log-probs: from a separate policy forward from this step on ({reason})",
          file=sys.stderr, flush=True)
