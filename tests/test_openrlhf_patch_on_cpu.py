"""The OpenRLHF integration, on CPU, without Ray: real OpenRLHF classes and its real parser.

(a) the patched RemoteExperienceMaker on hand-made experiences gives docs/ALGORITHM.md §2 advantages
and equals upstream group_norm for K=0; (e) every recipe's command line passes OpenRLHF's parser.
"""
import random
from types import SimpleNamespace

import pytest
import torch

from openrlhf_patch import config as patch_config
from openrlhf_patch import install, touchpoints
from openrlhf_patch.config import PatchConfig
from pipelines.launch import training
from pipelines.launch.recipes import ALGOS, build_recipe

# docs/ALGORITHM.md §2, G = 8, binary rewards, k correct: (A+, A-) for NGRPO.
TABLE_NGRPO = {0: (None, -0.3333), 1: (1.7638, -0.5040), 2: (1.3333, -0.6667), 3: (1.0541, -0.8433),
              4: (0.8433, -1.0541), 5: (0.6667, -1.3333), 6: (0.5040, -1.7638), 7: (0.3333, -2.6667), 8: (0.0, None)}


@pytest.fixture(scope="module")
def patched():
    return install.apply(PatchConfig(device="cuda"), role="test")  # hooks only, no CPU runtime patches


def _parse(recipe, layout):
    argv = training.build_openrlhf_argv(recipe, model="Qwen/Qwen2.5-Math-7B", layout=layout)
    return training.parse_with_openrlhf(training.materialise_argv(argv, "/tmp/ngrpo-parse"))


@pytest.fixture(scope="module")
def openrlhf_args(patched):
    recipe = build_recipe("ngrpo", "paper", {"samples_per_prompt": 8})
    return _parse(recipe, training.Layout.for_device("cpu"))


def _experiences(rewards_by_prompt, micro_batch=5, seed=0):
    """Samples in prompt order, with ragged response lengths, shuffled into micro-batches the way
    OpenRLHF's experience maker receives them (each sample remembers its index)."""
    from openrlhf.trainer.ppo_utils.experience import Experience

    gen = torch.Generator().manual_seed(seed)
    flat = [r for group in rewards_by_prompt for r in group]
    order = list(range(len(flat)))
    random.Random(seed).shuffle(order)
    experiences = []
    for start in range(0, len(order), micro_batch):
        idx = order[start:start + micro_batch]
        lengths = torch.randint(1, 7, (len(idx),), generator=gen)
        mask = torch.arange(6).unsqueeze(0) < lengths.unsqueeze(1)
        experiences.append(Experience(
            action_mask=mask, kl=torch.zeros(len(idx), 6), rewards=torch.tensor([flat[i] for i in idx]),
            index=idx, info={}))
    return experiences


def _per_sample(experiences):
    """Scalar advantage per sample in prompt order; checks it is constant over the response."""
    out = {}
    for e in experiences:
        for row, i in enumerate(e.index):
            values = e.advantages[row][e.action_mask[row]]
            assert torch.allclose(values, values[0].expand_as(values), atol=1e-6)
            assert torch.all(e.advantages[row][~e.action_mask[row]] == 0)
            out[i] = values[0].item()
    return [out[i] for i in sorted(out)]


def _use(monkeypatch, config):
    """The settings the hooks run with (in a Ray worker, install.apply activates them from the environment)."""
    monkeypatch.setitem(patch_config._active, "config", config)


def _maker(args):
    from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker
    from openrlhf.trainer.ppo_utils.kl_controller import FixedKLController

    return RemoteExperienceMaker(None, None, None, None, FixedKLController(0.0), SimpleNamespace(args=args), None)


def test_patched_experience_maker_gives_spec_table(openrlhf_args, monkeypatch):
    _use(monkeypatch, PatchConfig(estimator="ngrpo"))
    groups = [[1.0] * k + [0.0] * (8 - k) for k in range(9)]
    experiences = _maker(openrlhf_args).compute_advantages_and_returns(_experiences(groups))
    advantages = _per_sample(experiences)
    for k, (a_pos, a_neg) in TABLE_NGRPO.items():
        group = advantages[8 * k: 8 * k + 8]
        if a_pos is not None:
            assert group[:k] == pytest.approx([a_pos] * k, abs=1e-4)
        if a_neg is not None:
            assert group[k:] == pytest.approx([a_neg] * (8 - k), abs=1e-4)
    # diagnostics travel with the experiences: 1 all-wrong, 1 all-correct, 7 mixed groups of 9
    info = {key: torch.cat([e.info[key] for e in experiences]) for key in experiences[0].info if key.startswith("ngrpo/")}
    assert info["ngrpo/frac_all_wrong"].unique().tolist() == pytest.approx([1 / 9])
    assert info["ngrpo/frac_all_correct"].unique().tolist() == pytest.approx([1 / 9])
    assert info["ngrpo/adv_sum_all_wrong"].unique().tolist() == pytest.approx([-8 / 3], abs=1e-4)
    assert info["ngrpo/accuracy"].unique().tolist() == pytest.approx([36 / 72])


def test_ngrpo_with_k0_equals_upstream_group_norm(openrlhf_args, monkeypatch):
    gen = torch.Generator().manual_seed(1)
    groups = (torch.rand(6, 8, generator=gen) * (torch.rand(6, 8, generator=gen) > 0.4)).tolist()
    _use(monkeypatch, PatchConfig(estimator="ngrpo", estimator_options={"virtual_samples": 0}))
    ours = _per_sample(_maker(openrlhf_args).compute_advantages_and_returns(_experiences(groups)))
    from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker

    upstream = RemoteExperienceMaker.compute_advantages_and_returns.__wrapped__
    assert openrlhf_args.algo.advantage.estimator == "group_norm"
    theirs = _per_sample(upstream(_maker(openrlhf_args), _experiences(groups)))
    # ngrpo's epsilon is the reference code's 1e-6, OpenRLHF's is 1e-9
    assert ours == pytest.approx(theirs, abs=1e-5)
    assert max(abs(a) for a in ours) > 0.5  # the comparison is not between zeros


def test_upstream_estimators_are_left_alone(openrlhf_args, monkeypatch):
    """Without an estimator of ngrpo's core (PPO's gae) OpenRLHF's own step runs; the patch only adds diagnostics."""
    _use(monkeypatch, PatchConfig(estimator=None))
    groups = [[0.0] * 8, [1.0] + [0.0] * 7]
    advantages = _per_sample(_maker(openrlhf_args).compute_advantages_and_returns(_experiences(groups)))
    assert advantages[:8] == [0.0] * 8  # GRPO: an all-wrong group carries no signal
    assert advantages[8] == pytest.approx(2.4749, abs=1e-4)


def test_apply_is_idempotent_and_refuses_untested_versions(patched):
    from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker
    from openrlhf.trainer.ray import ppo_actor

    assert install.apply(PatchConfig(estimator="ngrpo")) is patched  # second call: no-op
    wrapped = RemoteExperienceMaker.compute_advantages_and_returns
    key = (f"{RemoteExperienceMaker.__module__}.RemoteExperienceMaker.compute_advantages_and_returns",
           "openrlhf_patch/install.py:_patch_experience_maker")
    assert key in touchpoints.markers(wrapped) and key not in touchpoints.markers(wrapped.__wrapped__)  # once
    assert ppo_actor.PolicyLoss.__name__ == "PolicyLossWithClipBounds"
    assert ppo_actor.PolicyLoss.__mro__[1].__name__ == "PolicyLoss"
    with pytest.raises(install.UnsupportedOpenRLHFVersion, match=r"openrlhf 0\.12\.0 is not supported.*0\.11\.2"):
        install.check_openrlhf_version("0.12.0")


EXPECTED = {  # algo: (estimator given to OpenRLHF, clip low/high, kl init coef, kl as loss, group filter)
    "ngrpo": ("group_norm", (0.16, 0.24), 0.0, False, "drop_all_correct"),
    "grpo": ("group_norm", (0.2, 0.2), 0.001, True, "none"),
    "dapo": ("group_norm", (0.2, 0.28), 0.0, False, "drop_all_correct_and_all_wrong"),
    "w_reinforce": ("group_norm", (0.2, 0.2), 0.0, False, "none"),
    "psr": ("group_norm", (0.2, 0.2), 0.0, False, "none"),
    "nsr": ("group_norm", (0.2, 0.2), 0.0, False, "none"),
    "ppo": ("gae", (0.2, 0.2), 0.001, False, "none"),
    "dr_grpo": ("dr_grpo", (0.2, 0.2), 0.0, False, "none"),
    "rloo": ("rloo", (0.2, 0.2), 0.0, False, "none"),
    "grpo_uc": ("group_norm", (0.2, 0.2), 0.001, True, "none"),
    "ucpo": ("group_norm", (0.2, 0.2), 0.001, True, "drop_non_ternary"),
    "reinforce_pp": ("reinforce", (0.2, 0.2), 0.001, False, "none"),
    "reinforce_pp_baseline": ("reinforce_baseline", (0.2, 0.2), 0.001, True, "none"),
    "sgpo": ("group_norm", (0.2, 0.2), 0.001, True, "none"),
}
# The baselines whose estimator is OpenRLHF's own: ngrpo's patch computes no advantage for them.
UPSTREAM_ESTIMATOR_ALGOS = ("grpo", "dapo", "ppo", "dr_grpo", "rloo", "grpo_uc", "reinforce_pp", "reinforce_pp_baseline")


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("algo", ALGOS)
def test_every_recipe_passes_openrlhf_parser(patched, algo, device):
    layout = (training.Layout.for_device("cpu") if device == "cpu"
              else training.Layout(device="cuda", gpus_per_node=8))
    args = _parse(build_recipe(algo, "paper"), layout)
    estimator, clip, kl, kl_loss, group_filter = EXPECTED[algo]
    assert args.algo.advantage.estimator == estimator
    assert tuple(args.actor.eps_clip_low_high) == pytest.approx(clip)
    assert args.algo.kl.init_coef == kl and args.algo.kl.use_loss == kl_loss
    assert args.algo.dynamic_filtering_enable == (group_filter != "none")
    patch_config = training.build_patch_config(build_recipe(algo, "paper"), device=device, max_steps=None,
                                               reward_file="r.py")
    assert patch_config.group_filter == group_filter
    assert (patch_config.estimator is None) == (algo in UPSTREAM_ESTIMATOR_ALGOS)
    # docs/ALGORITHM.md §5 shared settings: 1024 prompts x 8 samples, mini-batch of 256 prompts,
    # lr 1e-6 constant, AdamW (0.9, 0.999) with weight decay 0.01 as the authors
    assert (args.rollout.batch_size, args.rollout.n_samples_per_prompt, args.train.batch_size) == (1024, 8, 2048)
    assert args.actor.adam.lr == 1e-6 and args.actor.lr_scheduler == "constant"
    assert tuple(args.actor.adam.betas) == (0.9, 0.999)
    assert args.actor.adam.weight_decay == 0.01 and args.actor.entropy_coef == 0.001
    assert (args.data.max_len, args.rollout.max_new_tokens) == (4096, 3072)
    assert (args.reward.overlong_buffer_len == 1024) == (algo == "dapo")
    assert bool(args.critic.model_name_or_path) == (algo == "ppo")
    if algo == "ppo":  # the authors' critic optimiser, not OpenRLHF's cosine schedule with warm-up
        assert (args.critic.adam.lr, args.critic.lr_scheduler, args.critic.lr_warmup_ratio) == (1e-5, "constant", 0)
        assert args.critic.adam.weight_decay == 0.01 and tuple(args.critic.adam.betas) == (0.9, 0.999)
    if device == "cpu":
        assert args.vllm.sync_backend == "gloo" and args.ds.attn_implementation == "eager"
        assert training.logical_gpus_needed(args) == 2 + (kl > 0) + (algo == "ppo")
    else:
        assert args.train.colocate_all and args.vllm.num_engines == 8
    # What `ngrpo train` starts Ray's node with before OpenRLHF's parser is imported
    # (openrlhf_patch/cpu/early_ray.py), with and without a user's passthrough flags, which win as in the parser.
    argv = training.build_openrlhf_argv(build_recipe(algo, "paper"), model="Qwen/Qwen2.5-Math-7B", layout=layout)
    assert training.logical_gpus_from_argv(argv) == training.logical_gpus_needed(args)
    extra = ["--actor.num_gpus_per_node", "3", "--vllm.num_engines", "2", "--critic.num_nodes", "2"]
    passthrough = training.parse_with_openrlhf(training.materialise_argv(argv + extra, "/tmp/ngrpo-parse"))
    assert training.logical_gpus_from_argv(argv + extra) == training.logical_gpus_needed(passthrough)


def test_parser_rejects_bad_passthrough(patched):
    recipe = build_recipe("ngrpo", "paper")
    argv = training.build_openrlhf_argv(recipe, model="m", layout=training.Layout.for_device("cpu"),
                                        extra=["--no.such.flag", "1"])
    with pytest.raises(SystemExit):
        training.parse_with_openrlhf(argv)


# ------------------------------------------------------------------ guards (issue 12): each fails if the behaviour goes


def _full_experiences(rewards, lengths, width=6, kl=0.0):
    """One micro-batch per sample, in prompt order, with every tensor field OpenRLHF's batch helpers use."""
    from openrlhf.trainer.ppo_utils.experience import Experience

    out = []
    for i, (r, n) in enumerate(zip(rewards, lengths)):
        mask = torch.arange(width).unsqueeze(0) < n
        out.append(Experience(sequences=torch.zeros(1, width + 2, dtype=torch.long),
                              attention_mask=torch.ones(1, width + 2, dtype=torch.long), action_mask=mask,
                              kl=torch.full((1, width), kl) * mask, rewards=torch.tensor([r]),
                              response_length=torch.tensor([n]), index=[i], info={}))
    return out


def test_clip_fractions_are_counted_at_their_own_bound(patched):
    from openrlhf.trainer.ray import ppo_actor

    loss_fn = ppo_actor.PolicyLoss(clip_eps_low=0.16, clip_eps_high=0.24)
    old = torch.zeros(3, 2)
    # sequence 0: A < 0, ratio 0.5 < 1 - 0.16 (lower bound); 1: A > 0, ratio 1.5 > 1 + 0.24 (upper bound);
    # 2: A > 0, ratio 0.5 (below the lower bound, but for A > 0 only the upper bound binds)
    ratio = torch.tensor([[0.5, 0.5], [1.5, 1.0], [0.5, 0.5]])
    advantages = torch.tensor([[-1.0, -1.0], [1.0, 1.0], [1.0, 1.0]])
    out, metrics = loss_fn.loss_and_metrics(ratio.log(), old, advantages, torch.ones(3, 2, dtype=torch.bool))
    fractions = {k: v.item() for k, v in metrics.items()}
    assert len(out) == 5 and torch.equal(out[0], loss_fn(ratio.log(), old, advantages, torch.ones(3, 2, dtype=torch.bool))[0])
    assert fractions == pytest.approx({"clip_frac_low": 2 / 6, "clip_frac_high": 1 / 6})


def test_the_loss_hooks_metrics_reach_the_step_through_the_experiences_info(patched):
    """The wrapped training step hands upstream's code a loss that writes ngrpo's metrics into the
    micro-batch's info, which upstream merges into the step's metrics (a stand-in for the rest of
    upstream's training step: it calls self.actor_loss_fn and merges experience.info, as 0.11.2 does)."""
    from types import SimpleNamespace

    from openrlhf.trainer.ray import ppo_actor

    def upstream_step(self, experience):
        out = self.actor_loss_fn(ratio.log(), torch.zeros(3, 2), advantages, action_mask=mask)
        return {"metrics": {"policy_loss": out[0].detach(), **experience.info}}

    ratio = torch.tensor([[0.5, 0.5], [1.5, 1.0], [0.5, 0.5]])
    advantages = torch.tensor([[-1.0, -1.0], [1.0, 1.0], [1.0, 1.0]])
    mask = torch.ones(3, 2, dtype=torch.bool)
    loss_fn = ppo_actor.PolicyLoss(clip_eps_low=0.16, clip_eps_high=0.24)
    trainer = SimpleNamespace(actor_loss_fn=loss_fn)
    experience = SimpleNamespace(info={}, action_log_probs=torch.zeros(3, 2))
    from openrlhf_patch.policy_loss import wrap_training_step

    status = wrap_training_step(upstream_step)(trainer, experience)
    assert {k: round(v.item(), 6) for k, v in status["metrics"].items() if k.startswith("clip_frac")} == \
        {"clip_frac_low": round(2 / 6, 6), "clip_frac_high": round(1 / 6, 6)}
    assert status["metrics"]["policy_loss"] == loss_fn(ratio.log(), torch.zeros(3, 2), advantages, mask)[0]
    assert trainer.actor_loss_fn is loss_fn  # put back after the step


def test_kl_in_reward_and_length_penalties_apply_to_ngrpo_estimators(openrlhf_args, monkeypatch):
    """Around ngrpo's group step everything is OpenRLHF's: the overlong penalty changes the rewards
    first, the KL penalty enters the per-token reward."""
    import copy

    from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker
    from openrlhf.trainer.ppo_utils.kl_controller import FixedKLController

    args = copy.deepcopy(openrlhf_args)
    args.rollout.n_samples_per_prompt, args.rollout.max_new_tokens = 2, 6
    args.reward.overlong_buffer_len, args.reward.overlong_penalty_factor = 4, 1.0
    _use(monkeypatch, PatchConfig(estimator="ngrpo"))
    maker = RemoteExperienceMaker(None, None, None, None, FixedKLController(0.5), SimpleNamespace(args=args), None)
    # both correct, but the second used all 6 tokens: penalty -min(6 - 2, 4) / 4 = -1 -> rewards [1, 0]
    experiences = maker.compute_advantages_and_returns(_full_experiences([1.0, 1.0], [2, 6], kl=0.2))
    # NGRPO on [1, 0] with one virtual 1: mean 2/3, std sqrt(1/3) -> A = +0.5774, -1.1547
    advantage = [1 / 3 / (1 / 3) ** 0.5, -2 / 3 / (1 / 3) ** 0.5]
    for e, a, n in zip(experiences, advantage, (2, 6)):
        # return at the first token: A plus the KL penalty -0.5 * 0.2 of every action token
        assert e.returns[0, 0].item() == pytest.approx(a - 0.5 * 0.2 * n, abs=1e-4)
        assert e.info["group_reward_std"].tolist() == pytest.approx([2 ** -0.5], abs=1e-6)  # std of [1, 0]


def test_w_reinforce_lambda_reaches_the_workers(openrlhf_args, monkeypatch):
    recipe = build_recipe("w_reinforce", "paper", {"w_reinforce_lambda": 0.5})
    _use(monkeypatch, training.build_patch_config(recipe, device="cuda", max_steps=None, reward_file="r.py"))
    advantages = _per_sample(_maker(openrlhf_args).compute_advantages_and_returns(
        _experiences([[1.0] * 3 + [0.0] * 5] + [[0.0] * 8])))
    assert advantages == [0.5] * 3 + [-1.0] * 13


@pytest.mark.parametrize("estimator, kept", [("psr", [0, 3]), ("nsr", [1, 2, 4, 5, 6, 7])])
def test_psr_and_nsr_train_only_on_their_class(openrlhf_args, monkeypatch, estimator, kept):
    import copy

    args = copy.deepcopy(openrlhf_args)
    args.rollout.n_samples_per_prompt, args.rollout.micro_batch_size = 4, 4
    _use(monkeypatch, PatchConfig(estimator=estimator))
    rewards = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    experiences = _maker(args).compute_advantages_and_returns(_full_experiences(rewards, [3] * 8))
    got = torch.cat([e.rewards for e in experiences]).tolist()
    assert got == [rewards[i] for i in kept]  # the other class is gone from the batch, not zero-weighted
    assert all(len(e.sequences) <= 4 for e in experiences)  # re-batched into micro-batches
    advantages = torch.cat([e.advantages[:, 0] for e in experiences]).tolist()
    assert advantages == [1.0 if estimator == "psr" else -1.0] * len(kept)
    assert experiences[0].info["ngrpo/trained_frac"][0].item() == pytest.approx(len(kept) / 8)


def test_hooks_without_run_settings_fail_loudly(openrlhf_args, monkeypatch):
    monkeypatch.setitem(patch_config._active, "config", None)
    with pytest.raises(RuntimeError, match="runs in process .* without its run settings: NGRPO_PATCH_CONFIG"):
        _maker(openrlhf_args).compute_advantages_and_returns(_experiences([[1.0, 0.0]]))


def test_apply_checks_the_openrlhf_version(monkeypatch):
    import importlib.metadata

    real = importlib.metadata.version
    monkeypatch.setitem(install._state, "applied", None)
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.12.0" if name == "openrlhf" else real(name))
    with pytest.raises(install.UnsupportedOpenRLHFVersion, match=r"openrlhf 0\.12\.0 is not supported"):
        install.apply(PatchConfig(estimator="ngrpo"))


def test_every_estimator_has_a_recipe_and_every_option_a_flag():
    """Adding an estimator = a registered function + its recipe + its tests: the rest derives."""
    import dataclasses

    from openrlhf_patch.algorithms import ESTIMATOR_OPTIONS, ESTIMATORS
    from pipelines.launch.recipes import ALGO_SETTINGS, ESTIMATOR_CHOICES, Recipe

    fields = {f.name for f in dataclasses.fields(Recipe)}
    assert set(ESTIMATOR_OPTIONS) <= fields
    from pipelines.launch.recipes import UPSTREAM_ESTIMATORS

    for name, est in ESTIMATORS.items():
        assert name in ESTIMATOR_CHOICES and est.paper and est.summary
        # grpo: the NGRPO authors' GRPO (eps 1e-6), --estimator grpo; the grpo recipe runs OpenRLHF's group_norm
        assert name == "grpo" or any(s.get("estimator") == name for s in ALGO_SETTINGS.values()), name
    for name in UPSTREAM_ESTIMATORS:  # each of OpenRLHF's estimators ngrpo offers has a recipe
        assert name in ESTIMATOR_CHOICES and any(s.get("estimator") == name for s in ALGO_SETTINGS.values()), name
    assert build_recipe("ngrpo").estimator == "ngrpo"
