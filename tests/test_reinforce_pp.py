"""REINFORCE++ and REINFORCE++-baseline (Hu et al., arXiv 2501.03262) as recipes: OpenRLHF's own
`reinforce` and `reinforce_baseline` estimators, run through ngrpo's wrap of the experience maker
(docs/ALGORITHM.md §5). Hand-worked advantages for 2 prompts x 4 samples, one group all wrong.

Both estimators put the reward on the last response token, take the return (gamma 1: the reward on
every response token), and then normalise over *every response token of the batch*:
A = (x - mean) / std, mean and std weighted by token. REINFORCE++'s x is the reward; the
baseline variant's is the reward minus its group's mean. Group A = [1, 0, 0, 0], group B all 0.

Equal lengths (3 tokens each):
  REINFORCE++           mean 1/8, var 7/64: correct sqrt(7) = 2.6458, wrong -1/sqrt(7) = -0.3780 in both groups,
                        so the all-wrong group is pushed down like any wrong answer (as NGRPO's, not GRPO's 0).
  REINFORCE++-baseline  x = [.75, -.25, -.25, -.25 | 0, 0, 0, 0], mean 0, var 3/32: correct sqrt(6) = 2.4495,
                        wrong in A -sqrt(6)/3 = -0.8165, the all-wrong group 0.
Ragged lengths (group A's correct answer 2 tokens, every other 4; 30 tokens):
  REINFORCE++           mean 2/30 = 1/15, var 28/450: all-wrong group -(1/15) sqrt(450/28) = -0.26726.
  REINFORCE++-baseline  mean -1.5/30 = -0.05, var 1.8/30 = 0.06: all-wrong group +0.05 / sqrt(0.06) = +0.20412
                        (the token-weighted mean is not 0 when lengths differ: a shorter correct answer
                        makes the all-wrong group's advantage positive).
"""
import math
from types import SimpleNamespace

import pytest
import torch

from openrlhf_patch import config as patch_config
from openrlhf_patch import install
from openrlhf_patch.config import PatchConfig
from pipelines.launch import training
from pipelines.launch.recipes import UPSTREAM_ESTIMATORS, build_recipe

REWARDS = [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]  # group A mixed, group B all wrong


@pytest.fixture(scope="module")
def patched():
    return install.apply(PatchConfig(device="cuda"), role="test")  # hooks only, no CPU runtime patches


def _args(algo):
    recipe = build_recipe(algo, "cpu-tiny", {"samples_per_prompt": 4, "prompts_per_step": 2, "mini_batch_prompts": 2})
    argv = training.build_openrlhf_argv(recipe, model="Qwen/Qwen2.5-Math-7B", layout=training.Layout.for_device("cpu"))
    return recipe, training.parse_with_openrlhf(training.materialise_argv(argv, "/tmp/ngrpo-parse"))


def _advantages(monkeypatch, algo, lengths):
    """Per-sample advantages (prompt order) from OpenRLHF's experience maker through ngrpo's wrap,
    with the run's PatchConfig active; every response token must carry the same value."""
    from openrlhf.trainer.ppo_utils.experience import Experience
    from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker
    from openrlhf.trainer.ppo_utils.kl_controller import FixedKLController

    recipe, args = _args(algo)
    monkeypatch.setitem(patch_config._active, "config",
                        training.build_patch_config(recipe, device="cpu", max_steps=None, reward_file="r.py"))
    flat = [r for group in REWARDS for r in group]
    order = [5, 0, 7, 2, 1, 6, 3, 4]  # micro-batches of 4 in the order they finished
    experiences = []
    for start in (0, 4):
        idx = order[start:start + 4]
        mask = torch.arange(5).unsqueeze(0) < torch.tensor([lengths[i] for i in idx]).unsqueeze(1)
        experiences.append(Experience(action_mask=mask, kl=torch.zeros(4, 5), rewards=torch.tensor([flat[i] for i in idx]),
                                      index=idx, info={}))
    maker = RemoteExperienceMaker(None, None, None, None, FixedKLController(recipe.kl_coef), SimpleNamespace(args=args), None)
    out = {}
    for e in maker.compute_advantages_and_returns(experiences):
        assert any(k.startswith("ngrpo/") for k in e.info)  # ngrpo's wrap ran (diagnostics)
        for row, i in enumerate(e.index):
            values = e.advantages[row][e.action_mask[row]]
            assert torch.all(values == values[0])
            out[i] = values[0].item()
    return [out[i] for i in range(8)]


def test_the_recipes_run_openrlhfs_estimators(patched):
    for algo, estimator, kl in (("reinforce_pp", "reinforce", (0.001, False, "k1")),
                                ("reinforce_pp_baseline", "reinforce_baseline", (0.001, True, "k2"))):
        recipe, args = _args(algo)
        assert recipe.estimator == estimator and estimator in UPSTREAM_ESTIMATORS
        assert args.algo.advantage.estimator == estimator and args.algo.advantage.gamma == 1.0
        assert (args.algo.kl.init_coef, args.algo.kl.use_loss, args.algo.kl.estimator) == kl
        config = training.build_patch_config(recipe, device="cpu", max_steps=None, reward_file="r.py")
        assert config.estimator is None  # OpenRLHF's own step; ngrpo only adds diagnostics
        assert build_recipe(algo, "paper").uniform_groups == "keep"
    # REINFORCE++ needs no group: one sample per prompt is allowed
    assert build_recipe("reinforce_pp", "cpu-tiny", {"samples_per_prompt": 1}).samples_per_prompt == 1


def test_reinforce_pp_pushes_an_all_wrong_group_down(patched, monkeypatch):
    adv = _advantages(monkeypatch, "reinforce_pp", [3] * 8)
    wrong = -1 / math.sqrt(7)
    assert adv == pytest.approx([math.sqrt(7), wrong, wrong, wrong, wrong, wrong, wrong, wrong], abs=1e-6)
    assert adv[4:] == pytest.approx([-0.3779645] * 4, abs=1e-6)  # the all-wrong group: not GRPO's 0


def test_reinforce_pp_baseline_gives_an_all_wrong_group_zero_at_equal_lengths(patched, monkeypatch):
    adv = _advantages(monkeypatch, "reinforce_pp_baseline", [3] * 8)
    assert adv[:4] == pytest.approx([math.sqrt(6)] + [-math.sqrt(6) / 3] * 3, abs=1e-6)
    assert adv[4:] == [0.0, 0.0, 0.0, 0.0]  # exactly: the token-weighted mean is exactly 0 here


def test_with_ragged_lengths_the_batch_mean_reaches_the_all_wrong_group(patched, monkeypatch):
    lengths = [2, 4, 4, 4, 4, 4, 4, 4]
    pp = _advantages(monkeypatch, "reinforce_pp", lengths)
    rstd = math.sqrt(450 / 28)
    assert pp == pytest.approx([(14 / 15) * rstd] + [-(1 / 15) * rstd] * 7, abs=1e-5)
    assert pp[4] == pytest.approx(-0.2672612, abs=1e-6)
    baseline = _advantages(monkeypatch, "reinforce_pp_baseline", lengths)
    rstd = 1 / math.sqrt(0.06)
    assert baseline == pytest.approx([0.8 * rstd] + [-0.2 * rstd] * 3 + [0.05 * rstd] * 4, abs=1e-5)
    assert baseline[4] == pytest.approx(0.2041241, abs=1e-6)  # positive: the correct answer was shorter
