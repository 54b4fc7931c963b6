"""PPO's old log-probs reused from the training forward when a rollout is one optimizer step
(openrlhf_patch/old_log_probs.py): the rules, the loss, the guard, and real runs in real workers."""
from types import SimpleNamespace

import pytest
import torch

from fixtures_runs import make_run, tiny_runs  # noqa: F401 - the session fixture
from openrlhf_patch import config as patch_config
from openrlhf_patch import install, old_log_probs
from openrlhf_patch.config import PatchConfig
from pipelines import rundir, training
from pipelines.recipes import build_recipe

REUSED = old_log_probs.REUSED_METRIC


@pytest.fixture(scope="module")
def patched():
    return install.apply(PatchConfig(device="cuda"), role="test")  # hooks only, no CPU runtime patches


def test_one_optimizer_step_needs_the_whole_train_batch_split_evenly():
    assert old_log_probs.one_optimizer_step([4, 4, 4, 4], train_batch_size=16, policy_ranks=1)
    assert old_log_probs.one_optimizer_step([4, 4, 4, 4], train_batch_size=16, policy_ranks=2)
    assert not old_log_probs.one_optimizer_step([4, 4, 4, 4], train_batch_size=8, policy_ranks=1)  # two steps
    assert not old_log_probs.one_optimizer_step([4, 4, 3], train_batch_size=16, policy_ranks=1)  # PSR kept 11
    assert not old_log_probs.one_optimizer_step([4, 4, 4, 4], train_batch_size=16, policy_ranks=3)
    assert not old_log_probs.one_optimizer_step([6, 6, 4], train_batch_size=16, policy_ranks=2)


def _blocker(monkeypatch, algo, mode="reuse-on-policy", **overrides):
    monkeypatch.setitem(patch_config._active, "config", PatchConfig(old_log_probs=mode))
    recipe = build_recipe(algo, "cpu-tiny", overrides)
    argv = training.build_openrlhf_argv(recipe, model="Qwen/Qwen2.5-Math-7B", layout=training.Layout.for_device("cpu"))
    args = training.parse_with_openrlhf(training.materialise_argv(argv, "/tmp/ngrpo-parse"))
    # the model groups OpenRLHF's launcher builds for these settings
    maker = SimpleNamespace(critic_model_group="critic" if recipe.estimator == "gae" else None,
                            initial_model_group="ref" if recipe.kl_coef > 0 else None)
    return old_log_probs.deferral_blocker(args, maker)


def test_which_settings_keep_the_separate_forward(patched, monkeypatch):
    assert _blocker(monkeypatch, "ngrpo") is None
    assert _blocker(monkeypatch, "grpo") is None  # KL as a loss: the reference forward stays, the policy's goes
    assert _blocker(monkeypatch, "ngrpo", mode="forward") == "--old-log-probs forward"
    assert _blocker(monkeypatch, "ngrpo", ppo_epochs=2) == "2 epochs over each rollout"
    assert _blocker(monkeypatch, "ppo") == "a critic (PPO)"
    assert _blocker(monkeypatch, "grpo", kl_mode="reward") == "a KL penalty in the reward (it needs the policy's log-probs)"


def test_a_missing_old_log_prob_is_the_detached_training_one(patched):
    """Same loss value and same gradient as passing the detached log-probs (ratio exactly 1)."""
    from openrlhf.trainer.ray import ppo_actor

    gen = torch.Generator().manual_seed(0)
    advantages = torch.randn(3, 5, generator=gen)
    mask = torch.rand(3, 5, generator=gen) > 0.3
    results = []
    for old in (None, "detached"):
        log_probs = (torch.randn(3, 5, generator=torch.Generator().manual_seed(1)) - 2).requires_grad_()
        loss_fn = ppo_actor.PolicyLoss(clip_eps_low=0.16, clip_eps_high=0.24)
        out = loss_fn(log_probs, None if old is None else log_probs.detach(), advantages, mask)
        out[0].backward()
        results.append((out[0].detach(), log_probs.grad, loss_fn.last_clip_fractions))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert results[0][1].abs().sum() > 0 and results[0][2] == results[1][2]


def _trainer(steps_at_start, steps_now):
    trainer = SimpleNamespace(actor=SimpleNamespace(model=SimpleNamespace(global_steps=steps_now)))
    if steps_at_start is not None:
        trainer._ngrpo_steps_at_start = steps_at_start
    return trainer


def test_a_micro_batch_without_old_log_probs_after_an_optimizer_step_is_an_error():
    without, with_ = SimpleNamespace(action_log_probs=None), SimpleNamespace(action_log_probs=torch.zeros(1, 2))
    old_log_probs.check_weights_unchanged(_trainer(3, 3), without)
    old_log_probs.check_weights_unchanged(_trainer(3, 4), with_)
    with pytest.raises(RuntimeError, match=r"optimizer steps 3 at the start of ppo_train, 4 now"):
        old_log_probs.check_weights_unchanged(_trainer(3, 4), without)
    with pytest.raises(RuntimeError, match="--old-log-probs forward"):  # ppo_train was not wrapped
        old_log_probs.check_weights_unchanged(_trainer(None, 0), without)


# ------------------------------------------------------------------ real runs, real workers


def _metrics(run):
    return rundir.read_step_log(run / rundir.METRICS).rows


@pytest.mark.pipeline
def test_the_shared_runs_reuse_old_log_probs(tiny_runs):
    """cpu-tiny trains each rollout in one optimizer step: the trainer skipped the policy's forward
    and the policy's loss and guard ran (a None old log-prob would fail upstream's loss), with ZeRO-2
    and with ZeRO-3 and a reference model (GRPO's KL loss)."""
    for name in ("ngrpo", "grpo"):
        rows = _metrics(tiny_runs[name])
        assert [r[REUSED] for r in rows] == [1.0, 1.0]
        assert all(r["ppo_kl"] == 0.0 and r["policy_loss"] != 0.0 and r["actor_grad_norm"] > 0 for r in rows)
        log = (tiny_runs[name] / "logs").glob("launch-*.log")
        assert any("old log-probs: reused from the training forward" in p.read_text() for p in log)


@pytest.fixture(scope="module")
def extra_runs(tiny_runs, tmp_path_factory):
    root = tmp_path_factory.mktemp("old_log_probs")
    model, reward = tiny_runs["model"], tiny_runs["model"].parent / "coin_reward.py"
    return {
        # upstream's separate forward where the rollout is one optimizer step
        "forward": make_run(root / "forward", model, reward, "ngrpo", {"old_log_probs": "forward"}),
        # two optimizer steps a rollout: the second is off-policy, so ngrpo computes the old log-probs
        "two_steps": make_run(root / "two_steps", model, reward, "ngrpo", {"mini_batch_prompts": 2}),
    }


@pytest.mark.pipeline
@pytest.mark.slow
def test_the_separate_forward_gives_the_training_forwards_numbers(extra_runs):
    """Why reuse is exact, not an approximation: in one optimizer step, OpenRLHF's own separate
    forward gives log-probs equal to the training forward's, bit for bit (the PPO KL of every step
    is exactly 0 while the policy trains)."""
    rows = _metrics(extra_runs["forward"])
    assert [r[REUSED] for r in rows] == [0.0, 0.0]
    assert all(r["ppo_kl"] == 0.0 and r["actor_grad_norm"] > 0 for r in rows)


@pytest.mark.pipeline
@pytest.mark.slow
def test_two_optimizer_steps_a_rollout_compute_old_log_probs(extra_runs):
    """The fallback ran: the second optimizer step of each rollout sees moved weights, so its ratio
    differs from 1 (a reused log-prob would make the PPO KL exactly 0)."""
    rows = _metrics(extra_runs["two_steps"])
    assert [r[REUSED] for r in rows] == [0.0, 0.0]
    assert all(r["ppo_kl"] != 0.0 for r in rows)
    log = (extra_runs["two_steps"] / "logs").glob("launch-*.log")
    assert any("old log-probs: reused from the training forward" in p.read_text() for p in log)
