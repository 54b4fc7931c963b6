"""Patch 2, loss (inside PolicyModelActor): OpenRLHF's PolicyLoss already clips with separate
eps_low/eps_high. ngrpo's loss hook, `PolicyLossWithClipBounds.loss_and_metrics`, returns
`(loss, metrics)` as verl's policy losses do: the loss is OpenRLHF's own forward, unchanged (the
baselines train on upstream's loss), and the metrics are the share of tokens clipped at each
bound (docs/ALGORITHM.md §3). `ActorPPOTrainer.training_step` (wrapped here) puts the metrics into
the micro-batch's `experience.info`, which upstream's own training step merges into the step's
metrics, as it does with its `ppo_clip_ratio`.

The fractions need the probability ratio per token, which upstream's forward computes but does
not return: measuring them recomputes it (an elementwise exp, no model forward).
"""
import functools
import sys

from openrlhf_patch import algorithms
from openrlhf_patch.heartbeat import heartbeat
from openrlhf_patch.old_log_probs import check_weights_unchanged


def make_policy_loss_class(upstream_cls):
    class PolicyLossWithClipBounds(upstream_cls):
        """OpenRLHF's PolicyLoss, plus the share of tokens clipped at the low and high bound."""

        def loss_and_metrics(self, log_probs, old_log_probs, advantages, action_mask=None, *args, **kwargs):
            """(upstream's return: loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio; {metric: 0-d tensor})."""
            if old_log_probs is None:  # on-policy: openrlhf_patch/old_log_probs.py
                old_log_probs = log_probs.detach()
            out = super().forward(log_probs, old_log_probs, advantages, action_mask, *args, **kwargs)
            metrics = {}
            if self.policy_loss_type == "ppo":
                try:
                    metrics = algorithms.clip_fractions(log_probs.detach(), old_log_probs.detach(),
                                                        advantages.detach(), action_mask,
                                                        self.clip_eps_low, self.clip_eps_high)
                except Exception as err:  # noqa: BLE001 - a logging measure must never stop training
                    print(f"[ngrpo] warning: clip fractions not measured: {err}", file=sys.stderr, flush=True)
            return out, {k: v.detach().reshape(()) for k, v in metrics.items()}

        def forward(self, *args, **kwargs):
            # a caller outside the training step gets upstream's return alone
            return self.loss_and_metrics(*args, **kwargs)[0]

    return PolicyLossWithClipBounds


def wrap_training_step(upstream):
    @functools.wraps(upstream)
    def training_step(self, experience, *args, **kwargs):
        heartbeat("training")
        check_weights_unchanged(self, experience)
        loss_fn = self.actor_loss_fn
        if not hasattr(loss_fn, "loss_and_metrics"):
            return upstream(self, experience, *args, **kwargs)

        def loss_into_info(*loss_args, **loss_kwargs):
            out, metrics = loss_fn.loss_and_metrics(*loss_args, **loss_kwargs)
            experience.info.update(metrics)  # upstream merges info into the step's metrics (0-d: per token)
            return out

        self.actor_loss_fn = loss_into_info
        try:
            return upstream(self, experience, *args, **kwargs)
        finally:
            self.actor_loss_fn = loss_fn

    return training_step
