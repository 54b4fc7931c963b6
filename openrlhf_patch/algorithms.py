"""NGRPO's algorithm core: the advantage estimators, group filters, clip fractions, diagnostics.

Pure torch (no openrlhf / ray / vllm / deepspeed), so it can be tested on CPU and reused by any
trainer. Everything is vectorised over the batch: a batch is a 1-D tensor of B = n_groups *
group_size scalar rewards ordered group by group (all samples of prompt 0, then prompt 1, ...),
which is the layout OpenRLHF's `n_samples_per_prompt` rollouts already have. Reshaping to
(n_groups, group_size) turns every per-group statistic into one reduction over dim 1.

Sources (docs/ALGORITHM.md is the project's reading of them; each estimator names its paper):
  * NGRPO: Nan et al., "NGRPO: Negative-enhanced Group Relative Policy Optimization",
    arXiv 2509.18851, and the authors' verl 0.2 fork (compute_ngrpo_outcome_advantage).
  * GRPO: Shao et al., DeepSeekMath, arXiv 2402.03300.
  * Dr. GRPO: Liu et al., "Understanding R1-Zero-Like Training", arXiv 2503.20783.
  * RLOO: Ahmadian et al., arXiv 2402.14740.
  * PSR / NSR / W-REINFORCE: Zhu et al., "The Surprising Effectiveness of Negative
    Reinforcement in LLM Reasoning", arXiv 2506.01347.
  * DAPO (clip-higher, dynamic sampling): Yu et al., arXiv 2503.14476.
  * UCPO: Zeng et al., "UCPO: Uncertainty-Aware Policy Optimization", arXiv 2601.22648 (no code
    of the authors could be read; docs/ALGORITHM.md §8 says what is confirmed and what is not).

Adding an estimator: one function registered with @register_estimator (its keyword-only
parameters are its options, taken from ESTIMATOR_OPTIONS), a recipe in pipelines/launch/recipes.py, and
its tests. Everything else (recipe choices, CLI help, the set of estimators the OpenRLHF patch
computes) is derived from ESTIMATORS.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import operator
from typing import Callable, Dict, Optional, Tuple

import torch

GROUP_FILTERS = ("none", "drop_all_correct", "drop_all_correct_and_all_wrong", "drop_all_wrong", "drop_non_ternary")

# OpenRLHF's PolicyLoss clamps the log-ratio to this range before exp(): a token whose new and
# old log-probs differ by more than 20 nats is garbage either way, and exp(>88) is inf in float32.
LOG_RATIO_LIMIT = 20.0


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
# Advantage estimators: one registered function each (in the manner of verl's register_adv_est)
# --------------------------------------------------------------------------------------------
# Every option an estimator may take: (default, what it means). An estimator's options are the
# keyword-only parameters of its function; the recipe has a field of the same name for each, and
# the run carries the chosen values to the workers as one mapping (PatchConfig.estimator_options).
ESTIMATOR_OPTIONS = {
    "virtual_samples": (1, "NGRPO: K virtual responses of reward R_max appended to each group before its "
                           "mean and std (NGRPO paper, K = 1)."),
    "max_reward": (1.0, "R_max, the largest reward the task can give (not the batch maximum); a response "
                        "is correct when its reward reaches it."),
    "adv_eps": (1e-6, "Epsilon of (r - mean) / (std + eps), as in the NGRPO authors' code."),
    "w_reinforce_lambda": (0.1, "W-REINFORCE: advantage of a correct response (+lambda; a wrong one gets -1)."),
    "uncertain_reward": (None, "Abstention (UCPO, docs/ALGORITHM.md §8): the reward of an uncertain response, one whose "
                               "final \\boxed{} holds an abstention phrase such as \\boxed{\\text{I don't know}}. "
                               "Setting it also tells the model in the prompt that it may abstain. Must lie strictly "
                               "between 0 (wrong) and R_max. ucpo only recognises uncertain responses by it; grpo_uc "
                               "trains GRPO on it (UCPO paper: 0.2 for Qwen3-8B, 0.5 for Llama-3.1-8B). "
                               "Unset: no abstention."),
    "ucpo_suppression_weight": (1.0, "UCPO: w, the weight of the uncertainty-suppression term of gamma(q) (the "
                                     "default 1 is not confirmed from the paper)."),
    "abstention_phrases": ("I don't know|I do not know|I dont know|I'm not sure|I am not sure|not sure|unsure|"
                           "uncertain|unknown|idk",
                           "Abstention: the final answers that mean 'I don't know', separated by |. A boxed answer "
                           "is an abstention when, with \\text{} unwrapped, case, spacing, apostrophes and final "
                           "punctuation ignored, it equals one of them (pipelines/datasets/abstention.py). Not "
                           "confirmed from the UCPO paper."),
}


@dataclasses.dataclass(frozen=True)
class Estimator:
    name: str
    compute: Callable[..., torch.Tensor]  # (groups of shape (n_groups, G), **options) -> same shape
    paper: str
    summary: str                          # the function's first docstring line
    options: Tuple[str, ...]              # the ESTIMATOR_OPTIONS it reads
    # Which responses the policy is trained on: all, or only the correct / only the wrong ones
    # (PSR and NSR as the authors run them: the batch is subset to one class).
    trains_on: str = "all"
    # Optional (groups, **options) -> {name: 0-d tensor} of the estimator's own step metrics,
    # added by batch_diagnostics(..., estimator=name); it reads the same options as `compute`.
    diagnostics: Optional[Callable[..., Dict[str, torch.Tensor]]] = None


ESTIMATORS: Dict[str, Estimator] = {}


def register_estimator(name: str, *, paper: str, trains_on: str = "all", diagnostics: Optional[Callable] = None):
    """Register `fn(groups, *, option=...) -> advantages` as advantage estimator NAME (DIAGNOSTICS:
    an optional `(groups, *, option=...) -> {metric: 0-d tensor}` with the same options)."""

    def decorate(fn):
        params = inspect.signature(fn).parameters.values()
        options = tuple(p.name for p in params if p.kind is p.KEYWORD_ONLY)
        unknown = [o for o in options if o not in ESTIMATOR_OPTIONS]
        if unknown or name in ESTIMATORS or trains_on not in ("all", "correct", "wrong"):
            raise ValueError(f"estimator {name!r}: unknown options {unknown}, duplicate name or bad trains_on")
        summary = (inspect.getdoc(fn) or "").split("\n")[0]
        ESTIMATORS[name] = Estimator(name, fn, paper, summary, options, trains_on, diagnostics)
        return fn

    return decorate


def _group_normalise(groups: torch.Tensor, virtual_samples: int, virtual_value: float, eps: float):
    """(x - mean) / (std + eps) per row, with `virtual_samples` extra copies of `virtual_value`.

    Statistics are taken on deviations from a per-row shift (the virtual value when there are
    virtual samples, else the row's first element). The variance is shift-invariant, but the
    shift makes a row of identical values give deviations that are exactly 0, so all-correct
    groups get an advantage of exactly 0 instead of rounding noise divided by eps (which can be
    O(0.1) for rewards such as 0.7 whose float mean is not exactly 0.7). The virtual samples
    then have deviation 0 and only enter through the count N and the mean.
    A lone response (G = 1) has mean 0 and std 1 and no virtual sample, as in the authors' code.
    """
    n_real = groups.shape[1]
    if n_real == 1:
        return groups / (1.0 + eps)
    n_total = n_real + virtual_samples
    shift = torch.full_like(groups[:, :1], virtual_value) if virtual_samples > 0 else groups[:, :1]
    dev = groups - shift
    mean_dev = dev.sum(dim=1, keepdim=True) / n_total
    centred = dev - mean_dev
    # Bessel-corrected (N - 1) as torch.std in the reference code; each virtual sample sits at
    # deviation 0, i.e. at -mean_dev from the mean.
    sq = centred.square().sum(dim=1, keepdim=True) + virtual_samples * mean_dev.square()
    std = (sq / (n_total - 1)).sqrt()
    return centred / (std + eps)


@register_estimator("grpo", paper="Shao et al. 2024, DeepSeekMath, arXiv 2402.03300")
def grpo(groups, *, adv_eps):
    """(r - mean) / (std + eps) over the group, std Bessel-corrected; a uniform group gets 0.

    On hard data most groups are all-wrong, so most samples carry no gradient (docs/ALGORITHM.md §1).
    """
    return _group_normalise(groups, 0, 0.0, adv_eps)


@register_estimator("ngrpo", paper="Nan et al. 2025, NGRPO, arXiv 2509.18851")
def ngrpo(groups, *, virtual_samples, max_reward, adv_eps):
    """GRPO with K virtual responses of reward R_max in each group's mean and std (docs/ALGORITHM.md §2).

    An all-wrong group now has mean > r and std > 0, so it gets a negative advantage (-1/3 each
    for G = 8, K = 1) and is learned from; the virtual samples are never returned or trained on.
    K = 0 is exactly grpo.
    """
    return _group_normalise(groups, virtual_samples, max_reward, adv_eps)


@register_estimator("dr_grpo", paper="Liu et al. 2025, Understanding R1-Zero-Like Training, arXiv 2503.20783")
def dr_grpo(groups):
    """r - mean over the group, without GRPO's division by the std (a lone response gets r)."""
    if groups.shape[1] == 1:
        return groups.clone()
    dev = groups - groups[:, :1]  # shifted so identical rewards give exactly 0
    return dev - dev.mean(dim=1, keepdim=True)


@register_estimator("rloo", paper="Ahmadian et al. 2024, Back to Basics (RLOO), arXiv 2402.14740")
def rloo(groups):
    """r - mean of the other G - 1 rewards of the group (leave-one-out baseline; needs G >= 2)."""
    if groups.shape[1] < 2:
        raise ValueError(f"estimator 'rloo' needs group_size >= 2 (a leave-one-out baseline), got {groups.shape[1]}")
    dev = groups - groups[:, :1]
    others_mean = (dev.sum(dim=1, keepdim=True) - dev) / (groups.shape[1] - 1)
    return dev - others_mean


def _by_correctness(groups, max_reward, if_correct, if_wrong):
    correct = groups >= max_reward
    return torch.where(correct, torch.full_like(groups, if_correct), torch.full_like(groups, if_wrong))


@register_estimator("w_reinforce", paper="Zhu et al. 2025, The Surprising Effectiveness of Negative "
                                         "Reinforcement in LLM Reasoning, arXiv 2506.01347")
def w_reinforce(groups, *, max_reward, w_reinforce_lambda):
    """+lambda for a correct response (reward >= R_max), -1 for a wrong one; no baseline, no normalisation."""
    return _by_correctness(groups, max_reward, w_reinforce_lambda, -1.0)


@register_estimator("psr", paper="Zhu et al. 2025, arXiv 2506.01347", trains_on="correct")
def psr(groups, *, max_reward):
    """Positive sample reinforcement: +1 for a correct response; only correct responses are trained on."""
    return _by_correctness(groups, max_reward, 1.0, 0.0)


@register_estimator("nsr", paper="Zhu et al. 2025, arXiv 2506.01347", trains_on="wrong")
def nsr(groups, *, max_reward):
    """Negative sample reinforcement: -1 for a wrong response; only wrong responses are trained on."""
    return _by_correctness(groups, max_reward, 0.0, -1.0)


# --------------------------------------------------------------------------------------------
# UCPO: three classes of response (docs/ALGORITHM.md §8)
# --------------------------------------------------------------------------------------------
UCPO_MIN_GROUP_SIZE = 3  # a correct, a wrong and an uncertain response


def response_classes(rewards: torch.Tensor, max_reward: float, uncertain_reward):
    """(correct, uncertain, wrong) boolean masks of REWARDS: correct when the reward reaches
    max_reward, uncertain when it equals uncertain_reward (compared in float32, the dtype the
    reward function returns, so a float64 copy of a float32 reward still matches), wrong
    otherwise. With uncertain_reward None nothing is uncertain."""
    correct = rewards >= max_reward
    if uncertain_reward is None:
        uncertain = torch.zeros_like(correct)
    else:
        target = torch.tensor(float(uncertain_reward), dtype=torch.float32, device=rewards.device)
        uncertain = (rewards.to(torch.float32) == target) & ~correct
    return correct, uncertain, ~(correct | uncertain)


def _check_uncertain_reward(uncertain_reward, max_reward: float, who: str) -> float:
    if uncertain_reward is None:
        raise ValueError(f"{who} needs uncertain_reward (the reward that marks an uncertain response), got None")
    value = _check_finite_number("uncertain_reward", uncertain_reward)
    if not 0.0 < value < max_reward:
        raise ValueError(f"uncertain_reward must lie strictly between 0 (a wrong response) and max_reward="
                         f"{max_reward}, got {value}: otherwise uncertain responses cannot be told apart")
    return value


def _ucpo_parts(groups, max_reward, uncertain_reward, ucpo_suppression_weight, adv_eps):
    """Per group: the class masks, the ternary mask (>= 1 correct and >= 1 wrong), gamma(q) and
    the normalised advantages of the correct and wrong responses (0 elsewhere)."""
    if groups.shape[1] < UCPO_MIN_GROUP_SIZE:
        raise ValueError(f"estimator 'ucpo' needs group_size >= {UCPO_MIN_GROUP_SIZE} (a correct, a wrong and an "
                         f"uncertain response), got {groups.shape[1]}")
    uncertain_reward = _check_uncertain_reward(uncertain_reward, max_reward, "estimator 'ucpo'")
    correct, uncertain, wrong = response_classes(groups, max_reward, uncertain_reward)
    det = correct | wrong
    ternary = correct.any(dim=1, keepdim=True) & wrong.any(dim=1, keepdim=True)
    dtype = groups.dtype
    n_det = det.sum(dim=1, keepdim=True).to(dtype)
    # GRPO's statistics (_group_normalise) over the correct and wrong responses only, in the same
    # order of operations: deviations from the first such response, mean, Bessel std, + eps. With
    # no uncertain response this is GRPO's arithmetic step for step, hence bitwise equal to it.
    first = det.to(torch.int8).argmax(dim=1, keepdim=True)
    zero = torch.zeros((), dtype=dtype, device=groups.device)
    dev = torch.where(det, groups - groups.gather(1, first), zero)
    mean_dev = dev.sum(dim=1, keepdim=True) / n_det.clamp(min=1)
    centred = torch.where(det, dev - mean_dev, zero)
    sq = centred.square().sum(dim=1, keepdim=True)
    std = (sq / (n_det - 1).clamp(min=1)).sqrt()
    a_det = torch.where(ternary, centred / (std + adv_eps), zero)
    # gamma(q) from the group's shares of right, wrong and uncertain responses.
    size = groups.shape[1]
    p_r = correct.sum(dim=1, keepdim=True).to(dtype) / size
    p_w = wrong.sum(dim=1, keepdim=True).to(dtype) / size
    p_u = uncertain.sum(dim=1, keepdim=True).to(dtype) / size
    gamma = p_w / (p_u + p_w + adv_eps) * (1 - p_u) - ucpo_suppression_weight * p_r / (p_r + p_w + adv_eps) * p_u
    return correct, uncertain, wrong, ternary, gamma, a_det


def _ucpo_diagnostics(groups, *, max_reward, uncertain_reward, ucpo_suppression_weight, adv_eps):
    """gamma_mean: mean gamma(q) over the ternary groups that hold an uncertain response (0 if none);
    frac_non_ternary: share of groups without both a correct and a wrong response (advantage 0)."""
    _, uncertain, _, ternary, gamma, _ = _ucpo_parts(groups, max_reward, uncertain_reward,
                                                     ucpo_suppression_weight, adv_eps)
    used = (ternary & uncertain.any(dim=1, keepdim=True)).flatten()
    gamma = gamma.flatten().to(torch.float64)
    n_used = used.sum()
    return {"ucpo_gamma_mean": torch.where(used, gamma, torch.zeros_like(gamma)).sum() / n_used.clamp(min=1),
            "ucpo_gamma_groups": n_used.to(torch.float64),
            "frac_non_ternary": (~ternary).sum().to(torch.float64) / max(ternary.numel(), 1)}


@register_estimator("ucpo", paper="Zeng et al. 2026, UCPO: Uncertainty-Aware Policy Optimization, arXiv 2601.22648",
                    diagnostics=_ucpo_diagnostics)
def ucpo(groups, *, max_reward, uncertain_reward, ucpo_suppression_weight, adv_eps):
    """Ternary advantage decoupling: correct and wrong responses normalised among themselves, an uncertain one gets gamma(q) times the correct responses' advantage.

    gamma(q) = P_w/(P_u+P_w+eps)*(1-P_u) - w*P_r/(P_r+P_w+eps)*P_u from the group's shares of right,
    wrong and uncertain responses (docs/ALGORITHM.md §8). A group without at least one correct and
    one wrong response gets 0 everywhere. With no uncertain response it is exactly grpo on 0/1
    rewards.
    """
    correct, uncertain, _, ternary, gamma, a_det = _ucpo_parts(groups, max_reward, uncertain_reward,
                                                               ucpo_suppression_weight, adv_eps)
    # The correct responses' advantage (one value with 0/1 rewards; their mean otherwise).
    zero = torch.zeros((), dtype=groups.dtype, device=groups.device)
    n_correct = correct.sum(dim=1, keepdim=True).to(groups.dtype).clamp(min=1)
    a_correct = torch.where(correct, a_det, zero).sum(dim=1, keepdim=True) / n_correct
    return torch.where(uncertain & ternary, gamma * a_correct, a_det)


def check_estimator_options(options: dict) -> dict:
    """ESTIMATOR_OPTIONS' defaults updated by OPTIONS, each checked (ValueError naming the bad one)."""
    unknown = sorted(set(options) - set(ESTIMATOR_OPTIONS))
    if unknown:
        raise ValueError(f"unknown estimator option(s) {', '.join(unknown)}; valid: {', '.join(ESTIMATOR_OPTIONS)}")
    merged = {name: default for name, (default, _) in ESTIMATOR_OPTIONS.items()}
    merged.update(options)
    for name in ("max_reward", "adv_eps", "w_reinforce_lambda", "ucpo_suppression_weight"):
        merged[name] = _check_finite_number(name, merged[name])
    if merged["uncertain_reward"] is not None:
        merged["uncertain_reward"] = _check_uncertain_reward(merged["uncertain_reward"], merged["max_reward"],
                                                             "abstention")
    if merged["ucpo_suppression_weight"] < 0:
        raise ValueError(f"ucpo_suppression_weight must be >= 0, got {merged['ucpo_suppression_weight']}")
    phrases = merged["abstention_phrases"]
    if not isinstance(phrases, str) or not any(p.strip() for p in phrases.split("|")):
        raise ValueError(f"abstention_phrases must be a text of phrases separated by |, got {phrases!r}")
    if merged["adv_eps"] <= 0:
        raise ValueError(f"adv_eps must be > 0 (it keeps (r - mean) / (std + eps) finite), got {merged['adv_eps']}")
    k = merged["virtual_samples"]
    if isinstance(k, bool) or not isinstance(k, int) and not (isinstance(k, float) and k.is_integer()):
        raise ValueError(f"virtual_samples must be an integer >= 0, got {k!r}")
    merged["virtual_samples"] = int(k)
    if merged["virtual_samples"] < 0:
        raise ValueError(f"virtual_samples must be >= 0, got {merged['virtual_samples']}")
    return merged


def group_advantages(rewards: torch.Tensor, group_size: int, estimator: str, **options) -> torch.Tensor:
    """One scalar advantage per response, from the rewards of its group (shape (B,) -> (B,)).

    `estimator` is a name in ESTIMATORS; `options` are ESTIMATOR_OPTIONS (defaults for the rest),
    of which the estimator reads its own. Returns a tensor of dtype >= float32 on the rewards'
    device. Raises ValueError on non-finite rewards, a batch that is not whole groups, an ngrpo
    reward above max_reward, or bad options.
    """
    _check_choice("estimator", estimator, ESTIMATORS)
    group_size = _check_group_size(group_size)
    options = check_estimator_options(options)
    rewards = _check_rewards(rewards, group_size)
    if estimator == "ngrpo":
        # A reward above R_max would make the virtual sample a *worse* response than a real one
        # and flip NGRPO's calibration, which almost always means max_reward is misconfigured.
        above = rewards > options["max_reward"]
        if bool(above.any()):
            idx = above.nonzero().flatten()
            first = int(idx[0])
            raise ValueError(
                f"rewards[{first}] = {rewards[first].item()} is above max_reward={options['max_reward']} "
                f"({idx.numel()} reward(s) above it); ngrpo's virtual samples must carry the largest "
                "reward the task can give"
            )
    est = ESTIMATORS[estimator]
    kwargs = {name: options[name] for name in est.options}
    return est.compute(rewards.view(-1, group_size), **kwargs).reshape(-1)


def trained_mask(rewards: torch.Tensor, estimator: str, max_reward: float = 1.0) -> torch.Tensor:
    """Which responses the estimator trains on (bool, shape of REWARDS): all of them, or only the
    correct / wrong ones for estimators registered with trains_on="correct" / "wrong"."""
    trains_on = ESTIMATORS[estimator].trains_on
    if trains_on == "all":
        return torch.ones_like(rewards, dtype=torch.bool)
    correct = rewards >= max_reward
    return correct if trains_on == "correct" else ~correct


# --------------------------------------------------------------------------------------------
# Group filters (dynamic sampling)
# --------------------------------------------------------------------------------------------

def _group_kinds(rewards: torch.Tensor, group_size: int, max_reward: float):
    """(all_correct, all_wrong) per group; correct means reward >= max_reward."""
    correct = (rewards >= max_reward).view(-1, group_size)
    return correct.all(dim=1), ~correct.any(dim=1)


def group_keep_mask(rewards: torch.Tensor, group_size: int, mode: str, *, max_reward: float = 1.0,
                    uncertain_reward=None) -> torch.Tensor:
    """Which groups to keep (shape (n_groups,), bool) under a dynamic-sampling filter.

    * "drop_all_correct" (NGRPO, docs/ALGORITHM.md §4): an all-correct group has advantage 0 under both grpo
      and ngrpo, so it is dropped; all-wrong groups are kept because NGRPO gives them signal.
    * "drop_all_correct_and_all_wrong" (DAPO): under grpo both kinds carry no gradient.
    * "drop_all_wrong": the mirror image, for ablations. "none": keep everything.
    * "drop_non_ternary" (UCPO's non-ternary filtering, docs/ALGORITHM.md §8): keep a group only when
      it has at least one correct and one wrong response; a response whose reward equals
      `uncertain_reward` is neither (None: no response is uncertain).
    A response is correct when its reward is >= max_reward, so with partial-credit rewards
    "all wrong" means "no response reached max_reward".
    """
    _check_choice("mode", mode, GROUP_FILTERS)
    group_size = _check_group_size(group_size)
    max_reward = _check_finite_number("max_reward", max_reward)
    rewards = _check_rewards(rewards, group_size)
    if mode == "drop_non_ternary":
        if uncertain_reward is not None:
            uncertain_reward = _check_finite_number("uncertain_reward", uncertain_reward)
        correct, _, wrong = response_classes(rewards, max_reward, uncertain_reward)
        return correct.view(-1, group_size).any(dim=1) & wrong.view(-1, group_size).any(dim=1)
    all_correct, all_wrong = _group_kinds(rewards, group_size, max_reward)
    if mode == "none":
        return torch.ones_like(all_correct)
    if mode == "drop_all_correct":
        return ~all_correct
    if mode == "drop_all_wrong":
        return ~all_wrong
    return ~(all_correct | all_wrong)


# --------------------------------------------------------------------------------------------
# Asymmetric clipping: what share of tokens each bound clips
# --------------------------------------------------------------------------------------------

def clip_fractions(log_probs, old_log_probs, advantages, action_mask, eps_low: float, eps_high: float) -> dict:
    """Share of action tokens clipped at each bound of the asymmetric clip (docs/ALGORITHM.md §3).

    Per token ratio = exp(logp - logp_old); the loss max(-A*ratio, -A*clamp(ratio, 1-eps_low,
    1+eps_high)) takes its clipped, gradient-free branch when A > 0 and ratio > 1+eps_high
    (clip_frac_high) or A < 0 and ratio < 1-eps_low (clip_frac_low). `advantages` is (B,) or
    (B, T). A measure for logging only: it checks nothing and returns detached float tensors, so
    it can run beside the real loss without ever stopping training.
    """
    with torch.no_grad():
        dtype = _compute_dtype(log_probs.dtype)
        mask = torch.ones_like(log_probs, dtype=torch.bool) if action_mask is None else action_mask.bool()
        adv = advantages.to(dtype)
        if adv.dim() == 1:
            adv = adv.unsqueeze(-1)
        log_ratio = torch.where(mask, log_probs.to(dtype) - old_log_probs.to(dtype), torch.zeros((), dtype=dtype))
        ratio = log_ratio.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT).exp()
        denom = mask.sum().clamp(min=1).to(dtype)
        high = ((adv > 0) & (ratio > 1.0 + eps_high) & mask).sum().to(dtype) / denom
        low = ((adv < 0) & (ratio < 1.0 - eps_low) & mask).sum().to(dtype) / denom
    return {"clip_frac_low": low, "clip_frac_high": high}


# --------------------------------------------------------------------------------------------
# Diagnostics
# --------------------------------------------------------------------------------------------

def batch_diagnostics(
    rewards: torch.Tensor,
    group_size: int,
    advantages: torch.Tensor | None = None,
    *,
    max_reward: float = 1.0,
    estimator: str | None = None,
    estimator_options: dict | None = None,
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

    With `estimator_options` (the run's ESTIMATOR_OPTIONS) whose uncertain_reward is set (abstention,
    docs/ALGORITHM.md §8), also: frac_uncertain, frac_correct_answers, frac_wrong_answers (shares of
    responses by class) and, with advantages, adv_sum_correct, adv_sum_wrong, adv_sum_uncertain
    (advantage mass per class). With `estimator` naming an estimator that registered a diagnostics
    function (ucpo: ucpo_gamma_mean, ucpo_gamma_groups, frac_non_ternary), its metrics as well.
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
    options = check_estimator_options(estimator_options or {}) if (estimator_options or estimator) else None
    if options is not None and options["uncertain_reward"] is not None:
        classes = response_classes(rewards, max_reward, options["uncertain_reward"])
        n = max(rewards.numel(), 1)
        for kind, sel in zip(("correct_answers", "uncertain", "wrong_answers"), classes):
            values.append(sel.sum().double() / n)
            keys.append(f"frac_{kind}")
        if advantages is not None:
            adv = advantages.to(_compute_dtype(advantages.dtype))
            for kind, sel in zip(("correct", "uncertain", "wrong"), classes):
                values.append(torch.where(sel, adv, torch.zeros_like(adv)).sum())
                keys.append(f"adv_sum_{kind}")
    if estimator is not None:
        _check_choice("estimator", estimator, ESTIMATORS)
        extra = ESTIMATORS[estimator].diagnostics
        if extra is not None:
            params = inspect.signature(extra).parameters.values()
            kwargs = {p.name: options[p.name] for p in params if p.kind is p.KEYWORD_ONLY}
            for key, value in extra(rewards.view(-1, group_size), **kwargs).items():
                values.append(value)
                keys.append(key)
    # One device->host transfer for all values instead of one .item() per key.
    host = torch.stack([v.to(torch.float64) for v in values]).tolist()
    return dict(zip(keys, host))
