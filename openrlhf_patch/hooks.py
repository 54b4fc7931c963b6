"""How NGRPO gets into OpenRLHF 0.11.2: small wraps around upstream code, in the workers.

1. Advantages (inside the PPOTrainer Ray actor): `RemoteExperienceMaker.compute_advantages_and_returns`.
   For every estimator of ngrpo's core (algorithms.ESTIMATORS: grpo, ngrpo, dr_grpo, rloo,
   w_reinforce, psr, nsr) the group step is `algorithms.group_advantages`; everything around it
   (length penalties, KL-in-reward, per-token returns) is OpenRLHF's own code. PPO's `gae` runs
   upstream unchanged. Either way the batch diagnostics (share of all-wrong / all-correct / mixed
   groups, advantage mass per kind, accuracy) ride in the experiences' info into the step metrics.
2. Loss (inside PolicyModelActor): OpenRLHF's PolicyLoss already clips with separate
   eps_low/eps_high; `PolicyLossWithClipBounds` also measures the share of tokens clipped at each
   bound (docs/ALGORITHM.md §3), and `ActorPPOTrainer.training_step` reports it.
3. Sampling (inside PPOTrainer): `SamplesGenerator._generate_vllm` keeps or drops each group by the
   correctness of its responses (docs/ALGORITHM.md §4) instead of OpenRLHF's range on the mean
   reward, stops the run on non-finite rewards or a filter that drops every group; and
   `generate_samples` stops cleanly after `max_steps` training steps.
4. Logging (inside PPOTrainer): `RunLogger` (OpenRLHF's TensorboardLogger plus metrics.jsonl,
   eval_metrics.jsonl and a progress line per step).
5. Optimizer (inside PolicyModelActor and CriticModelActor): where DeepSpeed's FusedAdam cannot be
   compiled (on CPU, and on a GPU node without nvcc), DeepSpeed is told to use torch's AdamW.
6. Start-up (inside PolicyModelActor): `ActorPPOTrainer._init_vllm_sync_group` fails at once,
   with the engine's own error, when a vLLM engine died while it was being created; an engine
   that dies later (killed, out of memory, crashed) fails the run as "vLLM engine N died"
   (`wrap_engine_calls` on generation and weight sync, `engine_death` for Ray's own error).
7. Heartbeat (wherever a step's work runs): RUN_DIR/heartbeat.json names the stage a step is in
   and moves with each response, micro-batch and weight sync, for the driver's stall watchdog.

Only plain classes are patched. A @ray.remote class (PPOTrainer, PolicyModelActor) is shipped to
the workers with its own copies of every inherited method, taken when the class is decorated, so
a patch on its base classes never reaches the actor; the plain objects it builds and calls
(experience maker, ActorPPOTrainer, loggers, sample generator) are imported by reference.
Every upstream name used here is listed in openrlhf_patch/upstream.py.
"""
import contextlib
import functools
import itertools
import json
import os
import re
import sys
import threading
import time

import torch

from openrlhf_patch import algorithms
from openrlhf_patch.config import active
from openrlhf_patch.old_log_probs import check_weights_unchanged


class RewardError(RuntimeError):
    """The reward function returned something training cannot use (NaN, inf, nothing)."""


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
    if getattr(upstream, "_ngrpo", False):
        return upstream

    @functools.wraps(upstream)
    @torch.no_grad()
    def compute_advantages_and_returns(self, experiences):
        cfg = active()
        group_size = self.strategy.args.rollout.n_samples_per_prompt
        for e in experiences:  # before an estimator, ngrpo's or OpenRLHF's, reads them
            _checked_rewards(e, cfg)
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
        diagnostics = algorithms.batch_diagnostics(raw_rewards, group_size, per_sample_adv, max_reward=cfg.max_reward)
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
            if old_log_probs is None:  # on-policy: openrlhf_patch/old_log_probs.py
                old_log_probs = log_probs.detach()
            out = super().forward(log_probs, old_log_probs, advantages, action_mask, *args, **kwargs)
            if self.policy_loss_type == "ppo":
                try:
                    self.last_clip_fractions = algorithms.clip_fractions(
                        log_probs.detach(), old_log_probs.detach(), advantages.detach(), action_mask,
                        self.clip_eps_low, self.clip_eps_high)
                except Exception as err:  # noqa: BLE001 - a logging measure must never stop training
                    self.last_clip_fractions = {}
                    print(f"[ngrpo] warning: clip fractions not measured: {err}", file=sys.stderr, flush=True)
            return out

    return PolicyLossWithClipBounds


def wrap_training_step(upstream):
    if getattr(upstream, "_ngrpo", False):
        return upstream

    @functools.wraps(upstream)
    def training_step(self, experience, *args, **kwargs):
        heartbeat("training")
        check_weights_unchanged(self, experience)
        status = upstream(self, experience, *args, **kwargs)
        for key, value in getattr(self.actor_loss_fn, "last_clip_fractions", {}).items():
            status["metrics"][key] = value.detach().reshape(())
            status["weights"][key] = "token"
        return status

    training_step._ngrpo = True
    return training_step


# ---------------------------------------------------------------------------------------------
# 3. Sampling: the group filter, reward checks, max steps
# ---------------------------------------------------------------------------------------------
def _checked_rewards(experience, cfg) -> torch.Tensor:
    """EXPERIENCE's rewards (one per sample, float64); RewardError when one is missing or not finite.
    Runs on every group in the filter's loop and on the whole batch before the advantages."""
    if experience.rewards is None:
        from pipelines.reward import recorded_error

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


def _response_rewards(experiences, cfg) -> torch.Tensor:
    """The rewards of one prompt's responses (one experience each), checked."""
    return torch.cat([_checked_rewards(e, cfg) for e in experiences])


def make_generate_vllm():
    """OpenRLHF 0.11.2's SamplesGenerator._generate_vllm with ngrpo's group filter.

    Upstream drops a group when its mean score leaves a range, which separates all-correct from
    mixed groups only for rewards in {0, R_max}; with partial credit "drop all-correct" would
    also drop groups that are not all correct. Here a group is kept or dropped by the
    correctness of its responses (reward >= R_max), every reward is checked, and a filter that
    drops `max_consecutive_dropped_groups` groups in a row stops the run with the counts
    instead of burning through the data set."""
    import ray
    from openrlhf.trainer.ppo_utils.samples_generator import _collect_prompt_batch
    from tqdm import tqdm

    def _generate_vllm(self, dataloader_iter, num_prompts: int, dynamic_filtering, **generate_kwargs):
        cfg = active()
        prompts, labels, images, exhausted = _collect_prompt_batch(dataloader_iter, num_prompts)
        if not prompts:
            return [], 0, True
        prompts_consumed = len(prompts)
        pending = self._dispatch_prompts_to_vllm(prompts, labels, images=images, **generate_kwargs)
        accepted, dropped_in_a_row, dropped = [], 0, 0
        filtering = dynamic_filtering and cfg.group_filter != "none"
        pbar = tqdm(range(len(prompts)), desc="Generate samples", file=sys.stderr)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=10.0)
            for ref in ready:
                experiences = [self._process_response_into_experience(r, **generate_kwargs) for r in ray.get(ref)]
                rewards = _response_rewards(experiences, cfg)
                if filtering:
                    keep = bool(algorithms.group_keep_mask(rewards, len(rewards), cfg.group_filter,
                                                           max_reward=cfg.max_reward)[0])
                    if not keep:
                        dropped, dropped_in_a_row = dropped + 1, dropped_in_a_row + 1
                        if dropped_in_a_row >= cfg.max_consecutive_dropped_groups:
                            raise RewardError(
                                f"the group filter {cfg.group_filter!r} dropped {dropped_in_a_row} groups in a row "
                                f"({dropped} of {prompts_consumed} prompts this step; rewards of the last group: "
                                f"{rewards.tolist()}): the reward never gives the groups it keeps. Check the reward "
                                f"({cfg.reward_file}) and --max-reward, or use --group-filter none")
                        new_prompts, new_labels, new_images, exhausted = _collect_prompt_batch(dataloader_iter, 1)
                        prompts_consumed += len(new_prompts)
                        if new_prompts:
                            pending.extend(self._dispatch_prompts_to_vllm(new_prompts, new_labels, images=new_images,
                                                                          **generate_kwargs))
                        continue
                dropped_in_a_row = 0
                accepted.extend(experiences)
                pbar.set_postfix({"prompts_consumed": prompts_consumed})
                pbar.update()
        pbar.close()
        return accepted, prompts_consumed, exhausted

    _generate_vllm._ngrpo = True
    return _generate_vllm


def _write_progress(cfg, completed_steps: int) -> None:
    """RUN_DIR/progress.json: the training steps completed so far (independent of how often the
    logger runs), read by the driver's progress bar and for the manifest."""
    if cfg.run_dir:
        path = os.path.join(cfg.run_dir, "progress.json")
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump({"completed_steps": completed_steps, "time": time.time()}, f)
        os.replace(tmp, path)


HEARTBEAT = "heartbeat.json"  # read by the driver's stall watchdog (pipelines/watchdog.py)
HEARTBEAT_EVERY_S = 1.0
_last_beat = {"stage": None, "time": 0.0}


def heartbeat(stage: str) -> None:
    """RUN_DIR/heartbeat.json: the stage of the step this process works on (generation, experience,
    training, weight sync, step end) and that it moved, for the driver's stall watchdog. Written
    when the stage changes, else at most once a second; a failed write (a full disk) is left to
    the run's own writes to report."""
    cfg = active()
    now = time.time()
    if not cfg.run_dir or (stage == _last_beat["stage"] and now - _last_beat["time"] < HEARTBEAT_EVERY_S):
        return
    _last_beat.update(stage=stage, time=now)
    path = os.path.join(cfg.run_dir, HEARTBEAT)
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    try:
        with open(tmp, "w") as f:
            json.dump({"stage": stage, "pid": os.getpid(), "time": now}, f)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def wrap_with_heartbeat(upstream, stage: str, after: str = None):
    """UPSTREAM with a heartbeat of STAGE as it starts (and of AFTER once it returned)."""
    if getattr(upstream, "_ngrpo_heartbeat", False):
        return upstream

    @functools.wraps(upstream)
    def with_heartbeat(*args, **kwargs):
        heartbeat(stage)
        result = upstream(*args, **kwargs)
        if after:
            heartbeat(after)
        return result

    with_heartbeat._ngrpo_heartbeat = True
    return with_heartbeat


def wrap_generate_samples(upstream):
    if getattr(upstream, "_ngrpo", False):
        return upstream

    @functools.wraps(upstream)
    def generate_samples(self, *args, **kwargs):
        cfg = active()
        heartbeat("generation")
        # OpenRLHF trains on a batch before it asks for the next, so batches handed out so far
        # are the steps completed.
        handed_out = getattr(self, "_ngrpo_batches", 0)
        completed = cfg.start_step + handed_out
        _write_progress(cfg, completed)
        # Reporting the loader exhausted ends OpenRLHF's fit loop the normal way (final save
        # included) without generating a batch that would never be trained on.
        if cfg.max_steps is not None and completed >= cfg.max_steps:
            return [], None, 0, True
        if cfg.max_steps is not None and completed + 1 == cfg.max_steps:
            # The trainer reads save_steps at every step (in this process it is the same args
            # object): the last step of a --max-steps run always checkpoints, so it can continue.
            self.args.ckpt.save_steps = 1
        samples, pass_rate, consumed, exhausted = upstream(self, *args, **kwargs)
        heartbeat("experience")
        if samples:
            self._ngrpo_batches = handed_out + 1
        return samples, pass_rate, consumed, exhausted

    generate_samples._ngrpo = True
    return generate_samples


# ---------------------------------------------------------------------------------------------
# 4. Logging: per-step log and progress line
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


def _append_jsonl(run_dir, name, step, metrics) -> None:
    with open(os.path.join(run_dir, name), "a") as f:
        f.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")


def make_run_logger_class(upstream_cls):
    """OpenRLHF's TensorboardLogger, also writing RUN_DIR/metrics.jsonl and a progress line. The
    trainer hands its W&B logger (--wandb) the same step metrics, ngrpo's diagnostics included."""
    if getattr(upstream_cls, "_ngrpo", False):
        return upstream_cls

    class RunLogger(upstream_cls):
        _ngrpo = True

        def __init__(self, args):
            super().__init__(args)
            self.run_dir = active().run_dir
            self.args = args  # the trainer's own arguments object

        def log_train(self, global_step, logs_dict):
            max_steps = active().max_steps
            if max_steps is not None and global_step >= max_steps:
                # The trainer checkpoints right after it logs a step: the last step of a --max-steps
                # run always checkpoints, so that it can continue. wrap_generate_samples sets this
                # where the sample generator shares the trainer's arguments; OpenRLHF's async
                # trainer (--train.async_enable) has its generator in an actor of its own.
                self.args.ckpt.save_steps = 1
            super().log_train(global_step, logs_dict)
            metrics = dict(_scalar_items(logs_dict))
            if self.run_dir:
                _append_jsonl(self.run_dir, "metrics.jsonl", global_step, metrics)
            print(progress_line(global_step, metrics), flush=True)

        def log_eval(self, global_step, logs_dict):
            super().log_eval(global_step, logs_dict)
            if self.run_dir:
                _append_jsonl(self.run_dir, "eval_metrics.jsonl", global_step, dict(_scalar_items(logs_dict)))

    return RunLogger


# ---------------------------------------------------------------------------------------------
# 5. Optimizer: torch's AdamW where FusedAdam cannot be compiled
# ---------------------------------------------------------------------------------------------
def fused_adam_buildable(device: str) -> bool:
    """DeepSpeed compiles FusedAdam at first use: CUDA needs nvcc; on CPU ngrpo never asks for it
    (a C++ build at every fresh environment's first step, for an optimizer no faster here)."""
    import shutil

    if device == "cpu":
        return False
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or ""
    return bool(shutil.which("nvcc") or (cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))))


def wrap_train_ds_config(upstream):
    """OpenRLHF's get_train_ds_config, with DeepSpeed's `torch_adam` set for Adam when FusedAdam
    cannot be built here: the same AdamW update (betas, eps, weight decay) by torch.optim.AdamW."""
    if getattr(upstream, "_ngrpo", False):
        return upstream

    @functools.wraps(upstream)
    def get_train_ds_config(*args, **kwargs):
        config = upstream(*args, **kwargs)
        optimizer = config.get("optimizer")
        if optimizer and str(optimizer.get("type", "")).lower() in ("adam", "adamw") and \
                not fused_adam_buildable(active().device):
            optimizer.setdefault("params", {})["torch_adam"] = True
        return config

    get_train_ds_config._ngrpo = True
    return get_train_ds_config


# ---------------------------------------------------------------------------------------------
# 6. Start-up: a vLLM engine that failed to start stops the run at once
# ---------------------------------------------------------------------------------------------
ENGINE_POLL_S = 1.0


class EngineStartError(RuntimeError):
    pass


def wrap_init_vllm_sync_group(upstream):
    """The policy actor's rank 0 forms the weight-sync group with every vLLM engine and waits for
    all of them (up to the group's 10-minute timeout). An engine whose creation failed never
    joins, and the run used to sit there, then fail with a store timeout that hid the cause.
    Here the group forms in a thread while this one watches the engines; a dead engine's
    creation error is raised at once."""
    if getattr(upstream, "_ngrpo", False):
        return upstream

    @functools.wraps(upstream)
    def _init_vllm_sync_group(self, *args, **kwargs):
        import threading

        import ray

        engines = list(self.vllm_engines)
        register_engines(engines)  # for naming an engine that dies later (engine_death)
        # __ray_ready__ resolves once an engine is created, or raises its creation error.
        ready = {engine.__ray_ready__.remote(): i for i, engine in enumerate(engines)}
        device = torch.cuda.current_device() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        outcome = {}

        def form_group():
            try:
                if device is not None:  # the current CUDA device is per thread
                    torch.cuda.set_device(device)
                upstream(self, *args, **kwargs)
            except BaseException as e:  # noqa: BLE001 - handed to the calling thread
                outcome["error"] = e

        thread = threading.Thread(target=form_group, name="ngrpo-vllm-sync-group", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(ENGINE_POLL_S)
            done, _ = ray.wait(list(ready), num_returns=len(ready), timeout=0)
            for ref in done:
                try:
                    ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    raise EngineStartError(
                        f"vLLM engine {ready[ref]} of {len(engines)} failed to start (its traceback is in the "
                        f"launch log):\n{_last_exception(str(e))}") from None
                del ready[ref]
        if "error" in outcome:
            raise outcome["error"]

    _init_vllm_sync_group._ngrpo = True
    return _init_vllm_sync_group


def _last_exception(traceback_text: str, max_chars: int = 600) -> str:
    """The last exception of a traceback as text: from its `Type: message` line (at column 0) to
    the end, cut at MAX_CHARS (vLLM's message lists every architecture it knows)."""
    lines = traceback_text.rstrip().splitlines()
    starts = [i for i, line in enumerate(lines) if re.match(r"[\w.]+:", line)]
    text = "\n".join(lines[starts[-1]:] if starts else lines[-1:]).strip()
    return text if len(text) <= max_chars else text[:max_chars] + " ..."


# ---------------------------------------------------------------------------------------------
# 6b. A vLLM engine that dies during the run is named
# ---------------------------------------------------------------------------------------------
ENGINE_PROBE_S = 10.0  # how long a failed call waits to learn whether an engine is dead
_engine_index = {}     # actor id (hex) -> (index, number of engines): the engines this process has seen


class EngineDiedError(RuntimeError):
    """A vLLM engine actor died during the run; the message is one line, "vLLM engine N died: cause"."""


def _actor_hex(engine):
    actor_id = getattr(engine, "_actor_id", None)
    return actor_id.hex() if actor_id is not None else None


def register_engines(engines) -> None:
    for i, engine in enumerate(engines):
        if _actor_hex(engine):
            _engine_index[_actor_hex(engine)] = (i, len(engines))


def _died_line(index, err) -> str:
    """'vLLM engine N died', with the cause Ray gives (ERR: its RayActorError) on the same line."""
    # ActorDiedError: its base message, tab-indented fields (class_name, actor_id, pid, ...), the cause
    base = getattr(type(err), "BASE_ERROR_MSG", None)
    cause = " ".join(line.strip() for line in str(err).splitlines()
                     if line.strip() and not line.startswith("\t") and line.strip() != base)
    cause = re.sub(r"^The actor is dead because ", "", cause)
    name = "a vLLM engine" if index is None else f"vLLM engine {index}"
    return f"{name} died: {cause}" if cause else f"{name} died"


def engine_death(err):
    """'vLLM engine N died: ...' when ERR, or an exception it was raised from, is Ray's error for a
    dead vLLM engine actor (RolloutRayActor); else None."""
    import ray

    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, ray.exceptions.RayActorError):
            known = _engine_index.get(getattr(err, "actor_id", None))
            if known is not None or "class_name: RolloutRayActor" in str(err):
                return _died_line(known[0] if known else None, err)
        err = getattr(err, "cause", None) or err.__cause__ or err.__context__
    return None


def dead_engine(engines, timeout: float = ENGINE_PROBE_S):
    """'vLLM engine N died: ...' for the first of ENGINES that is dead, else None (Ray answers a dead
    actor's __ray_ready__ with its death; a live engine, an async actor, answers at once)."""
    import ray

    try:
        refs = {engine.__ray_ready__.remote(): i for i, engine in enumerate(engines)}
        done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
    except Exception:  # noqa: BLE001 - Ray itself is going down: nothing to add to the run's error
        return None
    for ref in sorted(done, key=lambda r: refs[r]):
        try:
            ray.get(ref)
        except ray.exceptions.RayActorError as e:
            return _died_line(refs[ref], e)
        except Exception:  # noqa: BLE001
            continue
    return None


def wrap_engine_calls(upstream):
    """UPSTREAM, a method of an object holding `vllm_engines` (the sample generator, the policy's
    weight sync), with a dead engine named: Ray's ActorDiedError from a call to it, or what its
    death caused elsewhere (the weight sync's gloo "Connection closed by peer"), becomes
    EngineDiedError("vLLM engine N died: cause")."""
    if getattr(upstream, "_ngrpo_engines", False):
        return upstream

    @functools.wraps(upstream)
    def with_engines_named(self, *args, **kwargs):
        try:
            return upstream(self, *args, **kwargs)
        except (EngineDiedError, EngineStartError, RewardError):
            raise
        except Exception as err:
            engines = list(getattr(self, "vllm_engines", None) or [])
            register_engines(engines)
            died = engine_death(err) or (dead_engine(engines) if engines else None)
            if died is None:
                raise
            raise EngineDiedError(died) from err

    with_engines_named._ngrpo_engines = True
    return with_engines_named

