"""The OpenRLHF integration, on CPU, without Ray: real OpenRLHF classes and its real parser.

(a) the patched RemoteExperienceMaker on hand-made experiences gives SPEC §2 advantages and
equals upstream group_norm for K=0; (e) every recipe's command line passes OpenRLHF's parser.
"""
import random
from types import SimpleNamespace

import pytest
import torch

from openrlhf_patch import install
from openrlhf_patch.config import PatchConfig
from pipelines import training
from pipelines.recipes import ALGOS, build_recipe

# SPEC §2, G = 8, binary rewards, k correct: (A+, A-) for NGRPO.
SPEC_NGRPO = {0: (None, -0.3333), 1: (1.7638, -0.5040), 2: (1.3333, -0.6667), 3: (1.0541, -0.8433),
              4: (0.8433, -1.0541), 5: (0.6667, -1.3333), 6: (0.5040, -1.7638), 7: (0.3333, -2.6667), 8: (0.0, None)}


@pytest.fixture(scope="module")
def patched():
    return install.apply(PatchConfig(device="cuda"), role="test")  # hooks only, no CPU runtime patches


def _parse(recipe, layout):
    argv = training.build_openrlhf_argv(recipe, model="Qwen/Qwen2.5-Math-7B", train_file="train.jsonl",
                                        run_dir="/tmp/ngrpo-parse", layout=layout)
    return training.parse_with_openrlhf(argv)


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
    """The hooks read their settings from the environment, as in a Ray worker."""
    for key, value in config.to_env().items():
        monkeypatch.setenv(key, value)


def _maker(args):
    from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker
    from openrlhf.trainer.ppo_utils.kl_controller import FixedKLController

    return RemoteExperienceMaker(None, None, None, None, FixedKLController(0.0), SimpleNamespace(args=args), None)


def test_patched_experience_maker_gives_spec_table(openrlhf_args, monkeypatch):
    _use(monkeypatch, PatchConfig(estimator="ngrpo"))
    groups = [[1.0] * k + [0.0] * (8 - k) for k in range(9)]
    experiences = _maker(openrlhf_args).compute_advantages_and_returns(_experiences(groups))
    advantages = _per_sample(experiences)
    for k, (a_pos, a_neg) in SPEC_NGRPO.items():
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
    _use(monkeypatch, PatchConfig(estimator="ngrpo", virtual_samples=0))
    ours = _per_sample(_maker(openrlhf_args).compute_advantages_and_returns(_experiences(groups)))
    from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker

    upstream = RemoteExperienceMaker.compute_advantages_and_returns.__wrapped__
    assert openrlhf_args.algo.advantage.estimator == "group_norm"
    theirs = _per_sample(upstream(_maker(openrlhf_args), _experiences(groups)))
    # ngrpo's epsilon is the reference code's 1e-6, OpenRLHF's is 1e-9
    assert ours == pytest.approx(theirs, abs=1e-5)
    assert max(abs(a) for a in ours) > 0.5  # the comparison is not between zeros


def test_upstream_estimators_are_left_alone(openrlhf_args, monkeypatch):
    """grpo runs OpenRLHF's own group_norm; the patch only adds diagnostics."""
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
    assert wrapped._ngrpo and not getattr(wrapped.__wrapped__, "_ngrpo", False)  # wrapped exactly once
    assert ppo_actor.PolicyLoss.__name__ == "PolicyLossWithClipBounds"
    assert ppo_actor.PolicyLoss.__mro__[1].__name__ == "PolicyLoss"
    with pytest.raises(install.UnsupportedOpenRLHFVersion, match=r"openrlhf 0\.12\.0 is not supported.*0\.11\.2"):
        install.check_openrlhf_version("0.12.0")


EXPECTED = {  # algo: (estimator given to OpenRLHF, clip low/high, kl init coef, kl as loss, filter range or None)
    "ngrpo": ("group_norm", (0.16, 0.24), 0.0, False, (-0.0625, 0.9375)),
    "grpo": ("group_norm", (0.2, 0.2), 0.001, True, None),
    "dapo": ("group_norm", (0.2, 0.28), 0.0, False, (0.0625, 0.9375)),
    "w_reinforce": ("group_norm", (0.2, 0.2), 0.0, False, None),
    "psr": ("group_norm", (0.2, 0.2), 0.0, False, None),
    "nsr": ("group_norm", (0.2, 0.2), 0.0, False, None),
    "ppo": ("gae", (0.2, 0.2), 0.001, False, None),
    "dr_grpo": ("dr_grpo", (0.2, 0.2), 0.0, False, None),
    "rloo": ("rloo", (0.2, 0.2), 0.0, False, None),
}


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("algo", ALGOS)
def test_every_recipe_passes_openrlhf_parser(patched, algo, device):
    layout = (training.Layout.for_device("cpu") if device == "cpu"
              else training.Layout(device="cuda", gpus_per_node=8))
    args = _parse(build_recipe(algo, "paper"), layout)
    estimator, clip, kl, kl_loss, filter_range = EXPECTED[algo]
    assert args.algo.advantage.estimator == estimator
    assert tuple(args.actor.eps_clip_low_high) == pytest.approx(clip)
    assert args.algo.kl.init_coef == kl and args.algo.kl.use_loss == kl_loss
    assert args.algo.dynamic_filtering_enable == (filter_range is not None)
    if filter_range:
        assert tuple(args.algo.dynamic_filtering_range) == pytest.approx(filter_range)
    # SPEC §5 shared settings: 1024 prompts x 8 samples, mini-batch of 256 prompts, lr 1e-6 constant
    assert (args.rollout.batch_size, args.rollout.n_samples_per_prompt, args.train.batch_size) == (1024, 8, 2048)
    assert args.actor.adam.lr == 1e-6 and args.actor.lr_scheduler == "constant"
    assert args.actor.adam.weight_decay == 0.01 and args.actor.entropy_coef == 0.001
    assert (args.data.max_len, args.rollout.max_new_tokens) == (4096, 3072)
    assert (args.reward.overlong_buffer_len == 1024) == (algo == "dapo")
    assert bool(args.critic.model_name_or_path) == (algo == "ppo")
    if device == "cpu":
        assert args.vllm.sync_backend == "gloo" and args.ds.attn_implementation == "eager"
        assert training.logical_gpus_needed(args) == 2 + (kl > 0) + (algo == "ppo")
    else:
        assert args.train.colocate_all and args.vllm.num_engines == 8


def test_parser_rejects_bad_passthrough(patched):
    recipe = build_recipe("ngrpo", "paper")
    argv = training.build_openrlhf_argv(recipe, model="m", train_file="t", run_dir="/tmp/x",
                                        layout=training.Layout.for_device("cpu"), extra=["--no.such.flag", "1"])
    with pytest.raises(SystemExit):
        training.parse_with_openrlhf(argv)
