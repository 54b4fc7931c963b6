"""Patch 3, sampling (inside PPOTrainer): `SamplesGenerator._generate_vllm` keeps or drops each
group by the correctness of its responses (docs/ALGORITHM.md §4) instead of OpenRLHF's range on
the mean reward, and stops the run on non-finite rewards or a filter that drops every group;
`generate_samples` stops cleanly after `max_steps` training steps, or once `max_samples`
responses / `max_generated_tokens` response tokens were generated (dropped groups included),
writes RUN_DIR/progress.json with the counts, and appends every group of the step, kept or
dropped, to RUN_DIR/groups.jsonl (group_log.py).
"""
import functools
import json
import os
import sys
import time

from openrlhf_patch import algorithms, group_log
from openrlhf_patch.config import active
from openrlhf_patch.reward_checks import RewardError, response_rewards
from openrlhf_patch.heartbeat import heartbeat


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
        started = time.monotonic()  # SGPO: the judge's share of the rollout's time
        prompts_consumed = len(prompts)
        pending = self._dispatch_prompts_to_vllm(prompts, labels, images=images, **generate_kwargs)
        accepted, dropped_in_a_row, dropped = [], 0, 0
        filtering = dynamic_filtering and cfg.group_filter != "none"
        pbar = tqdm(range(len(prompts)), desc="Generate samples", file=sys.stderr)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=10.0)
            for ref in ready:
                experiences = [self._process_response_into_experience(r, **generate_kwargs) for r in ray.get(ref)]
                rewards = response_rewards(experiences, cfg)
                if cfg.sgpo:  # SGPO: an all-wrong group's rewards graded by the step judge
                    rewards = _sgpo_grade(self, experiences, rewards, cfg)
                if filtering:
                    keep = bool(algorithms.group_keep_mask(
                        rewards, len(rewards), cfg.group_filter, max_reward=cfg.max_reward,
                        uncertain_reward=cfg.estimator_options.get("uncertain_reward"))[0])
                    _note_group(self, experiences, rewards, keep)
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
        if cfg.sgpo:
            _sgpo_close_step(self, accepted, time.monotonic() - started)
        return accepted, prompts_consumed, exhausted

    return _generate_vllm


def _sgpo_judge(self, cfg):
    """The run's step judge (openrlhf_patch/judge.py) and the references it reads, made once."""
    judge = getattr(self, "_ngrpo_judge", None)
    if judge is None:
        from openrlhf_patch import judge as step_judge

        judge = step_judge.StepJudge(step_judge.JudgeSettings.from_dict(cfg.sgpo))
        self._ngrpo_references = step_judge.load_references(cfg.run_dir)
        self._ngrpo_judge = judge
    return judge


def _sgpo_grade(self, experiences, rewards, cfg):
    """SGPO (docs/ALGORITHM.md §10): when no response of the group is correct, each gets the
    judge's graded reward (0 where its judgement failed); other groups keep their rewards."""
    import torch

    if bool((rewards >= cfg.max_reward).any()):
        return rewards
    judge = _sgpo_judge(self, cfg)
    prompt = experiences[0].prompts[0]
    if prompt not in self._ngrpo_references:
        raise RewardError(f"SGPO: no reference solution for prompt {prompt[:200]!r} in the run's "
                          "data/sgpo_references.jsonl")
    problem, solution = self._ngrpo_references[prompt]
    texts = []
    for e in experiences:
        tokens = e.sequences[0, 1:][e.action_mask[0].bool()]
        texts.append(self.tokenizer.decode(tokens.tolist(), skip_special_tokens=True))
    graded = judge.grade(problem, solution, texts)
    out = rewards.clone()
    for i, (e, value) in enumerate(zip(experiences, graded)):
        if value is not None:
            out[i] = value
            e.rewards = torch.tensor([value], dtype=torch.float32)
            e.info["reward"] = torch.tensor([value], dtype=torch.float32)
    return out


def _sgpo_close_step(self, accepted, rollout_seconds: float) -> None:
    """The step's judge cost on every sample's info (the step's ngrpo/judge_* metrics); stops the
    run (RewardError) when the judge failed on more than --judge-max-fail-share of its responses."""
    import torch

    judge = getattr(self, "_ngrpo_judge", None)
    stats = judge.new_step() if judge is not None else None
    if stats is not None:
        try:
            judge.check_step(stats)
        except RuntimeError as err:
            raise RewardError(str(err)) from err
    values = {"judge_calls": stats.calls if stats else 0, "judge_responses": stats.judged if stats else 0,
              "judge_cached": stats.cached if stats else 0, "judge_failures": stats.failures if stats else 0,
              "judge_seconds": stats.seconds if stats else 0.0,
              "judge_share": (stats.seconds / rollout_seconds) if stats and rollout_seconds > 0 else 0.0}
    for e in accepted:
        n = len(e.sequences)
        for key, value in values.items():
            e.info[f"ngrpo/{key}"] = torch.full((n,), float(value))


def _tokens(experiences) -> int:
    return int(sum(int(e.response_length.sum()) for e in experiences))


def _note_group(self, experiences, rewards, kept: bool) -> None:
    """The refill loop's record of one group, kept or dropped, for wrap_generate_samples."""
    groups = getattr(self, "_ngrpo_groups", None)
    if groups is not None:
        groups.append((experiences[0].prompts[0], [float(r) for r in rewards], kept, _tokens(experiences)))


def _groups_of(samples, group_size: int, cfg) -> list:
    """The groups of a batch from OpenRLHF's own loop (no group filter): it hands each prompt's
    responses over together, so consecutive runs of GROUP_SIZE samples are one prompt's group."""
    groups = []
    for i in range(0, len(samples), group_size):
        chunk = samples[i:i + group_size]
        rewards = response_rewards(chunk, cfg)
        groups.append((chunk[0].prompts[0], [float(r) for r in rewards], True, _tokens(chunk)))
    return groups


def _counts(self, cfg) -> dict:
    """Responses and response tokens generated so far (a resume starts from the checkpoint's)."""
    if not hasattr(self, "_ngrpo_generated"):
        self._ngrpo_generated = {"samples": cfg.start_generated_samples, "tokens": cfg.start_generated_tokens}
    return self._ngrpo_generated


def budget_spent(cfg, counts: dict) -> bool:
    """--max-samples / --max-generated-tokens reached: the step that reaches the budget is the last."""
    return ((cfg.max_samples is not None and counts["samples"] >= cfg.max_samples)
            or (cfg.max_generated_tokens is not None and counts["tokens"] >= cfg.max_generated_tokens))


def _write_progress(cfg, completed_steps: int, counts: dict) -> None:
    """RUN_DIR/progress.json: the training steps completed so far (independent of how often the
    logger runs) and the responses and tokens generated, read by the driver's progress bar and
    for the manifest."""
    if cfg.run_dir:
        path = os.path.join(cfg.run_dir, "progress.json")
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump({"completed_steps": completed_steps, "generated_samples": counts["samples"],
                       "generated_tokens": counts["tokens"], "time": time.time()}, f)
        os.replace(tmp, path)


def _account(self, cfg, samples, step: int) -> None:
    """Count this step's generated groups (dropped ones included), append them to groups.jsonl,
    and put the cumulative counts on every sample's info (the step's ngrpo/generated_* metrics)."""
    import torch

    groups = self._ngrpo_groups or _groups_of(samples, self.args.rollout.n_samples_per_prompt, cfg)
    self._ngrpo_groups = None
    counts = _counts(self, cfg)
    counts["samples"] += sum(len(rewards) for _, rewards, _, _ in groups)
    counts["tokens"] += sum(tokens for _, _, _, tokens in groups)
    if cfg.run_dir and groups:
        if not hasattr(self, "_ngrpo_row_ids"):
            self._ngrpo_row_ids = group_log.row_ids(cfg.run_dir)
        group_log.append_records(cfg.run_dir, (
            group_log.group_record(step, prompt, rewards, cfg.max_reward, kept, tokens, self._ngrpo_row_ids)
            for prompt, rewards, kept, tokens in groups))
    for e in samples:
        n = len(e.sequences)
        e.info["ngrpo/generated_samples"] = torch.full((n,), float(counts["samples"]))
        e.info["ngrpo/generated_tokens"] = torch.full((n,), float(counts["tokens"]))


def wrap_generate_samples(upstream):
    @functools.wraps(upstream)
    def generate_samples(self, *args, **kwargs):
        cfg = active()
        heartbeat("generation")
        # OpenRLHF trains on a batch before it asks for the next, so batches handed out so far
        # are the steps completed.
        handed_out = getattr(self, "_ngrpo_batches", 0)
        completed = cfg.start_step + handed_out
        _write_progress(cfg, completed, _counts(self, cfg))
        # Reporting the loader exhausted ends OpenRLHF's fit loop the normal way (final save
        # included) without generating a batch that would never be trained on.
        if cfg.max_steps is not None and completed >= cfg.max_steps:
            return [], None, 0, True
        if budget_spent(cfg, _counts(self, cfg)):
            return [], None, 0, True
        if cfg.max_steps is not None and completed + 1 == cfg.max_steps:
            # The trainer reads save_steps at every step (in this process it is the same args
            # object): the last step of a --max-steps run always checkpoints, so it can continue.
            self.args.ckpt.save_steps = 1
        self._ngrpo_groups = []  # the refill loop notes each group here (_note_group)
        samples, pass_rate, consumed, exhausted = upstream(self, *args, **kwargs)
        heartbeat("experience")
        _account(self, cfg, samples, completed + 1)
        if samples:
            self._ngrpo_batches = handed_out + 1
            if budget_spent(cfg, _counts(self, cfg)):
                self.args.ckpt.save_steps = 1  # the budget's last step checkpoints too
        return samples, pass_rate, consumed, exhausted

    return generate_samples
