"""`--uniform-groups keep|mask-aux|skip`: what a training step does with responses that carry no
learning signal, i.e. whose advantage is exactly 0 on every token (GRPO's all-wrong and
all-correct groups; docs/ALGORITHM.md §9).

OpenRLHF's loss (ActorPPOTrainer.training_step) is the policy loss plus two auxiliary terms, the
KL loss (`--algo.kl.use_loss`) and the entropy bonus, both a token mean over *every* response of
the optimizer step. A response with advantage 0 adds nothing to the policy loss's gradient, but
its tokens still carry the entropy bonus and the KL pull; on a batch of all-wrong GRPO groups those
two terms are the whole loss, and Adam rescales them to full-size steps.

  keep      OpenRLHF's training, unchanged (nothing here is installed).
  mask-aux  the entropy and KL terms leave out the tokens of zero-advantage responses, and so do
            their token counts (the normaliser of each optimizer step's token mean). The policy
            loss and its normaliser are OpenRLHF's. The optimizer still steps: AdamW's decoupled
            weight decay still shrinks the weights on an all-zero mini-batch.
  skip      a mini-batch (the micro-batches of one optimizer step) whose advantages are all 0, on
            every data-parallel rank, takes no step: its micro-batches run the forward (for the
            step's metrics) without gradients, and neither backward, nor the optimizer step, nor
            the EMA update runs, so DeepSpeed's accumulation counters skip the whole window
            together and stay aligned. Mini-batches with signal train as under keep.

How, on OpenRLHF 0.11.2 (touchpoints "openrlhf_patch/uniform_groups.py"):
  * `iter_grad_accum_global_norm` (as ppo_actor imported it) groups micro-batches into optimizer
    steps of `accumulated_gradient` and gives each its normalisers; the wrap calls it per window
    and decides, per window: which rows have zero advantage, the auxiliary terms' normalisers over
    the remaining tokens (upstream's `_optimizer_step_loss_norm` on the masked masks, all-reduced
    over the data-parallel group as upstream does), and whether to skip (one all-reduce).
  * `training_step` reads the decision attached to the micro-batch;
  * `aggregate_loss` as ppo_actor imported it is used there for exactly the KL and entropy terms
    (the policy loss calls openrlhf.models.loss's own), so while a mask-aux step runs it gets the
    masked mask and normalisers.
Dynamic batching (`--packing`) takes another path (normalisers precomputed in the replay buffer):
the recipe refuses it, and a step that reaches training_step without a decision is an error.

Metrics, per training step: `ngrpo/uniform_masked_tokens_frac` (mask-aux: the share of action
tokens left out of the entropy and KL terms) and `ngrpo/skipped_minibatches_frac` (skip: the share
of the step's mini-batches that took no optimizer step).
"""
import contextlib
import contextvars
import dataclasses
import functools
from typing import Optional

import torch

from openrlhf_patch import touchpoints
from openrlhf_patch.config import active

MODES = ("keep", "mask-aux", "skip")
MASKED_METRIC = "ngrpo/uniform_masked_tokens_frac"
SKIPPED_METRIC = "ngrpo/skipped_minibatches_frac"
ATTR = "ngrpo_uniform_groups"  # the decision, on the micro-batch's Experience (to_device passes it through)



@dataclasses.dataclass
class Decision:
    """What one micro-batch's training step does; not a tensor, so Experience.to_device leaves it."""

    mode: str
    skip: bool                    # the whole optimizer step is skipped
    zero_rows: torch.Tensor       # (B,) bool: responses without a non-zero advantage
    aux_info: Optional[dict]      # mask-aux: the window's normalisers over the tokens that remain


@dataclasses.dataclass
class _Aux:
    mask: torch.Tensor
    batch_num_tokens: torch.Tensor
    global_batch_size: torch.Tensor
    dp_size: int


_aux = contextvars.ContextVar("ngrpo_uniform_groups_aux", default=None)


def mode() -> str:
    value = active().uniform_groups
    if value not in MODES:
        raise ValueError(f"--uniform-groups {value!r}: choose one of {', '.join(MODES)}")
    return value


def zero_rows(advantages: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """(B,) bool: the responses whose advantage is exactly 0 on every action token."""
    nonzero = (advantages != 0) & action_mask.bool()
    return ~nonzero.reshape(nonzero.shape[0], -1).any(dim=-1)


def _dp(strategy):
    import torch.distributed as dist
    from openrlhf.utils import loss_utils

    group = loss_utils._get_dp_group(strategy)
    size = dist.get_world_size(group=group) if dist.is_available() and dist.is_initialized() else 1
    return group, size


def _any_signal_anywhere(has_signal: bool, group) -> bool:
    """Whether any data-parallel rank's window has a non-zero advantage (all ranks must agree to
    skip: the optimizer step is collective)."""
    import torch.distributed as dist

    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    flag = torch.tensor(1.0 if has_signal else 0.0, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return bool(flag.item() > 0)


def _decide(upstream, window, strategy, accumulated_gradient, mask_fn, how):
    from openrlhf.utils import loss_utils

    pairs = list(upstream(iter(window), strategy, accumulated_gradient, mask_fn))  # upstream's normalisers
    rows = [zero_rows(item.advantages, mask_fn(item)) for item in window]
    group, dp_size = _dp(strategy)
    aux_info = None
    if how == "mask-aux":
        masks = [mask_fn(item).bool() & ~r.to(mask_fn(item).device).unsqueeze(-1) for item, r in zip(window, rows)]
        aux_info = loss_utils._optimizer_step_loss_norm(masks, group, dp_size, max(int(accumulated_gradient), 1))
    skip = how == "skip" and not _any_signal_anywhere(not all(bool(r.all()) for r in rows), group)
    for (item, info), r in zip(pairs, rows):
        setattr(item, ATTR, Decision(how, skip, r, aux_info))
        yield item, info


def wrap_iter_grad_accum_global_norm(upstream):
    @functools.wraps(upstream)
    def iter_grad_accum_global_norm(data_iter, strategy, accumulated_gradient, mask_fn):
        how = mode()
        if how == "keep":
            yield from upstream(data_iter, strategy, accumulated_gradient, mask_fn)
            return
        gas, window = max(int(accumulated_gradient), 1), []
        for item in data_iter:  # the windows upstream makes: gas micro-batches, then a trailing rest
            window.append(item)
            if len(window) == gas:
                yield from _decide(upstream, window, strategy, accumulated_gradient, mask_fn, how)
                window = []
        if window:
            yield from _decide(upstream, window, strategy, accumulated_gradient, mask_fn, how)

    return iter_grad_accum_global_norm


def wrap_aggregate_loss(upstream):
    @functools.wraps(upstream)
    def aggregate_loss(loss, loss_mask, token_level_loss=True, dp_size=1, batch_num_tokens=None,
                       global_batch_size=None):
        aux = _aux.get()
        if aux is None:
            return upstream(loss, loss_mask, token_level_loss, dp_size, batch_num_tokens, global_batch_size)
        if aux.mask.shape != loss_mask.shape:
            raise RuntimeError(f"--uniform-groups mask-aux: a term over {tuple(loss_mask.shape)} tokens, the step's "
                               f"mask is {tuple(aux.mask.shape)} (OpenRLHF's training_step changed?)")
        return upstream(loss, aux.mask, token_level_loss, aux.dp_size, aux.batch_num_tokens, aux.global_batch_size)

    return aggregate_loss


def _no_backward(*args, **kwargs):
    return None


def _no_optimizer_step(*args, **kwargs):
    return None


def _no_moving_average(*args, **kwargs):
    return None


@contextlib.contextmanager
def _no_update(strategy):
    """The micro-batch's forward runs (its metrics), nothing that changes the model or the optimizer."""
    with (torch.no_grad(),
          touchpoints.patched("openrlhf.utils.deepspeed.deepspeed.DeepspeedStrategy.backward", _no_backward,
                              owner=strategy),
          touchpoints.patched("openrlhf.utils.deepspeed.deepspeed.DeepspeedStrategy.optimizer_step",
                              _no_optimizer_step, owner=strategy),
          touchpoints.patched("openrlhf.utils.deepspeed.deepspeed.DeepspeedStrategy.moving_average",
                              _no_moving_average, owner=strategy)):
        yield


def _nonzero(count: torch.Tensor) -> torch.Tensor:
    """A window without a token left: its masked sums are 0, so any non-zero normaliser gives 0."""
    return torch.where(count > 0, count, torch.ones_like(count))


def wrap_training_step(upstream):
    @functools.wraps(upstream)
    def training_step(self, experience, *args, **kwargs):
        how = mode()
        if how == "keep":
            return upstream(self, experience, *args, **kwargs)
        decision = getattr(experience, ATTR, None)
        if decision is None:
            raise RuntimeError(
                f"--uniform-groups {how}: this micro-batch came without ngrpo's per-optimizer-step decision. "
                "OpenRLHF's dynamic batching (--packing) builds optimizer steps elsewhere and is not supported "
                "with mask-aux or skip; use --uniform-groups keep or leave --packing off")
        action_mask = experience.action_mask
        rows = decision.zero_rows.to(action_mask.device)
        if decision.skip:
            with _no_update(self.strategy):
                status = upstream(self, experience, *args, **kwargs)
            status["metrics"].pop("actor_grad_norm", None)  # no step: the last step's norm stays the one reported
            status["weights"].pop("actor_grad_norm", None)
        elif how == "mask-aux":
            info = decision.aux_info
            token = _aux.set(_Aux(action_mask.bool() & ~rows.unsqueeze(-1), _nonzero(info["batch_num_tokens"]),
                                  _nonzero(info["global_batch_size"]), info["dp_size"]))
            try:
                status = upstream(self, experience, *args, **kwargs)
            finally:
                _aux.reset(token)
        else:
            status = upstream(self, experience, *args, **kwargs)
        if how == "mask-aux":
            tokens = action_mask.sum().clamp(min=1)
            masked = (action_mask.bool() & rows.unsqueeze(-1)).sum()
            status["metrics"][MASKED_METRIC] = (masked.float() / tokens.float()).reshape(())
            status["weights"][MASKED_METRIC] = "token"
        else:
            status["metrics"][SKIPPED_METRIC] = torch.tensor(1.0 if decision.skip else 0.0)
            status["weights"][SKIPPED_METRIC] = "sample"
        return status

    return training_step


def patch_ppo_actor(ppo_actor) -> None:
    """Install the three layers on ppo_actor (install._patch_ppo_actor, where --uniform-groups is not keep)."""
    touchpoints.patch("openrlhf.trainer.ray.ppo_actor.iter_grad_accum_global_norm",
                      wrap_iter_grad_accum_global_norm(ppo_actor.iter_grad_accum_global_norm), owner=ppo_actor)
    touchpoints.patch("openrlhf.trainer.ray.ppo_actor.aggregate_loss", wrap_aggregate_loss(ppo_actor.aggregate_loss), owner=ppo_actor)
    trainer = ppo_actor.ActorPPOTrainer
    touchpoints.patch("openrlhf.trainer.ray.ppo_actor.ActorPPOTrainer.training_step", wrap_training_step(trainer.training_step), owner=trainer)
