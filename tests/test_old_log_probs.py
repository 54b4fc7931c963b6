"""PPO's old log-probs reused from the training forward when a rollout is one optimizer step
(openrlhf_patch/old_log_probs.py): the decision as a function of the configuration, OpenRLHF's
experience maker with the policy's forward left out (NaN stand-ins nothing reads) or run as
upstream runs it, the short-rollout fallback, the loss, the guard, and real runs in real workers."""
from types import SimpleNamespace

import pytest
import torch

from fixtures_runs import make_run, tiny_runs  # noqa: F401 - the session fixture
from openrlhf_patch import config as patch_config
from openrlhf_patch import install, old_log_probs
from openrlhf_patch.config import PatchConfig
from pipelines.launch import rundir, training
from pipelines.launch.recipes import build_recipe

REUSED = old_log_probs.REUSED_METRIC


@pytest.fixture(scope="module")
def patched():
    return install.apply(PatchConfig(device="cuda"), role="test")  # hooks only, no CPU runtime patches


def _configure(monkeypatch, algo, preset="cpu-tiny", gpus=1, mode="reuse-on-policy", **overrides):
    """OpenRLHF's parsed arguments for ALGO's recipe (its own parser and checks), the run's
    PatchConfig made active, and the model groups OpenRLHF's launcher builds for these settings."""
    recipe = build_recipe(algo, preset, {**overrides, "old_log_probs": mode})
    layout = training.Layout.for_device("cpu", gpus_per_node=gpus)
    argv = training.build_openrlhf_argv(recipe, model="Qwen/Qwen2.5-Math-7B", layout=layout)
    args = training.parse_with_openrlhf(training.materialise_argv(argv, "/tmp/ngrpo-parse"))
    monkeypatch.setitem(patch_config._active, "config",
                        training.build_patch_config(recipe, device="cpu", max_steps=None, reward_file=None))
    groups = SimpleNamespace(critic_model_group="critic" if recipe.estimator == "gae" else None,
                             initial_model_group="ref" if recipe.kl_coef > 0 else None)
    return args, groups


# (algorithm, preset, policy ranks, overrides) -> None (reuse) or why the separate forward runs.
DECISIONS = [
    (("ngrpo", "cpu-tiny", 1, {}), None),
    (("grpo", "cpu-tiny", 1, {}), None),  # KL as a loss: the reference forward stays, the policy's goes
    (("w_reinforce", "cpu-tiny", 1, {}), None),
    (("ngrpo", "cpu-tiny", 2, {}), None),  # 4 micro-batches of 4, 2 to each rank
    (("ngrpo", "cpu-tiny", 1, {"mode": "forward"}), "--old-log-probs forward"),
    (("ngrpo", "cpu-tiny", 1, {"ppo_epochs": 2}), "2 epochs over each rollout"),
    (("ppo", "cpu-tiny", 1, {}), "a critic (PPO)"),
    (("grpo", "cpu-tiny", 1, {"kl_mode": "reward"}), "a KL penalty in the reward (it needs the policy's log-probs)"),
    (("ngrpo", "paper", 1, {}), "4 optimizer steps per rollout"),  # 1024 prompts, 256 an optimizer step
    (("ngrpo", "cpu-tiny", 1, {"mini_batch_prompts": 2}), "2 optimizer steps per rollout"),
    (("psr", "cpu-tiny", 1, {}), "psr trains on the correct responses only (a step's size depends on the rewards)"),
    (("nsr", "cpu-tiny", 1, {}), "nsr trains on the wrong responses only (a step's size depends on the rewards)"),
    (("ngrpo", "cpu-tiny", 1, {"micro_rollout_batch_size": 3}),
     "16 samples in micro-batches of 3 do not split evenly over 1 policy rank"),
    (("ngrpo", "cpu-tiny", 2, {"prompts_per_step": 6, "mini_batch_prompts": 6, "micro_rollout_batch_size": 8}),
     "24 samples in micro-batches of 8 do not split evenly over 2 policy ranks"),
]


def test_the_decision_is_a_function_of_the_configuration(patched, monkeypatch):
    """Taken before any rollout, from OpenRLHF's parsed arguments and the run's patch settings, as
    TRL's from num_iterations: the paper preset (4 optimizer steps a rollout) never reuses."""
    got = []
    for (algo, preset, gpus, overrides), _ in DECISIONS:
        args, groups = _configure(monkeypatch, algo, preset, gpus, **overrides)
        got.append(old_log_probs.deferral_blocker(args, groups))
    assert got == [why for _, why in DECISIONS]


# ------------------------------------------------------------------ OpenRLHF's experience maker


class _Ref:
    def __init__(self, value):
        self.value = value


@pytest.fixture
def object_store(monkeypatch):
    """Ray's object store, in this process (ray.put / ray.get), so that OpenRLHF's real
    experience maker runs without a Ray cluster."""
    import ray

    def get(ref, **kwargs):
        return [get(r) for r in ref] if isinstance(ref, list) else ref.value

    monkeypatch.setattr(ray, "put", _Ref)
    monkeypatch.setattr(ray, "get", get)


class _ModelGroup:
    """One of OpenRLHF's model groups (RayActorGroup) answering `forward` with per-token
    log-probs of every micro-batch, and recording what it was asked to run."""

    def __init__(self, log_prob):
        self.log_prob, self.calls = log_prob, []

    def async_run_method_batch(self, method_name, **kwargs):
        self.calls.append(method_name)
        return [_Ref([torch.full(tuple(mask.shape), self.log_prob) for mask in kwargs["action_mask"]])]

    def async_run_method(self, method_name, **kwargs):
        self.calls.append(method_name)
        return [_Ref(None)]


def _maker(args, groups):
    from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker
    from openrlhf.trainer.ppo_utils.kl_controller import FixedKLController

    policy = _ModelGroup(-1.0)
    reference = _ModelGroup(-1.5) if groups.initial_model_group else None
    maker = RemoteExperienceMaker(policy, None, None, reference, FixedKLController(args.algo.kl.init_coef),
                                  SimpleNamespace(args=args), SimpleNamespace(pad_token_id=0))
    return maker, policy, reference


def _rollout(args, prompts=None, seed=0):
    """One rollout as OpenRLHF's SamplesGenerator hands it over: one Experience per response, in
    groups of n_samples_per_prompt, ragged lengths, rewards in {0, 1} (mixed groups)."""
    from openrlhf.trainer.ppo_utils.experience import Experience

    gen = torch.Generator().manual_seed(seed)
    group = args.rollout.n_samples_per_prompt
    samples = []
    for i in range((prompts or args.rollout.batch_size) * group):
        prompt_len, response_len = 3, int(torch.randint(1, 6, (1,), generator=gen))
        length = prompt_len + response_len
        action_mask = torch.zeros(1, length - 1, dtype=torch.long)
        action_mask[0, prompt_len - 1:] = 1
        reward = float(i % 2)
        samples.append(Experience(
            sequences=torch.randint(1, 50, (1, length), generator=gen), attention_mask=torch.ones(1, length, dtype=torch.long),
            action_mask=action_mask, rewards=torch.tensor([reward]), scores=torch.tensor([reward]),
            response_length=torch.tensor([response_len]), truncated=torch.tensor([False]),
            total_length=torch.tensor([float(length)]), prompts=[f"prompt {i // group}"], labels=["1"],
            images=[None], mm_train_inputs=[None],
            info={"reward": torch.tensor([reward]), "response_clip_ratio": torch.tensor([False])}))
    return samples


def _nan_anywhere(experience) -> list:
    fields = {name: getattr(experience, name) for name in ("advantages", "returns", "kl", "values",
                                                          "base_action_log_probs", "action_log_probs")}
    fields.update({f"info[{k}]": v for k, v in experience.info.items()})
    return [name for name, value in fields.items() if isinstance(value, torch.Tensor) and value.isnan().any()]


@pytest.mark.parametrize("algo", ["ngrpo", "grpo"])
def test_a_left_out_forward_leaves_nan_that_nothing_reads(patched, monkeypatch, object_store, algo):
    """Where the configuration allows reuse, OpenRLHF's own make_experience_batch runs without the
    policy's forward: NaN stands in for its log-probs (so a read would show), the experiences
    carry none, and no advantage, return, KL or logged info holds a NaN (GRPO: the reference's
    forward runs, its KL is a loss term, computed in training)."""
    args, groups = _configure(monkeypatch, algo)
    maker, policy, reference = _maker(args, groups)
    stand_ins, nan_log_probs = [], old_log_probs.nan_log_probs

    def recorded(action_masks):
        stand_ins.extend(nan_log_probs(action_masks))
        return stand_ins[-len(action_masks):]

    monkeypatch.setattr(old_log_probs, "nan_log_probs", recorded)

    experiences = maker.make_experience_batch(_rollout(args))
    assert policy.calls == [] and (reference is None or reference.calls == ["forward"])
    assert len(stand_ins) == len(experiences) == 4 and all(t.isnan().all() for t in stand_ins)
    assert [e.action_log_probs for e in experiences] == [None] * 4
    assert [_nan_anywhere(e) for e in experiences] == [[]] * 4
    assert all(e.info["kl"].eq(0).all() and e.info[REUSED].eq(1).all() for e in experiences)
    assert sum(e.advantages.abs().sum() for e in experiences) > 0
    if reference is not None:
        assert all(e.base_action_log_probs.eq(-1.5).all() for e in experiences)


def test_a_kl_in_the_reward_would_read_the_stand_ins(patched, monkeypatch, object_store):
    """Why deferral_blocker refuses a KL penalty in the reward: there make_experience computes the
    KL from the policy's log-probs, and with the forward left out every logged KL is NaN (with
    zeros in their place it would have been a plausible, wrong number)."""
    args, groups = _configure(monkeypatch, "grpo", kl_mode="reward")
    assert old_log_probs.deferral_blocker(args, groups) is not None
    maker, _, _ = _maker(args, groups)
    samples_list = maker.split_rollout_samples(_rollout(args))
    with old_log_probs._policy_forward_left_out(maker):
        experiences = maker.make_experience(samples_list)
    assert all(e.info["kl"].isnan().all() and e.kl[e.action_mask.bool()].isnan().all() for e in experiences)
    assert "_dispatch_forward" not in vars(maker) and "make_experience" not in vars(maker)  # the class's again


def test_a_configuration_with_several_optimizer_steps_runs_upstream_unchanged(patched, monkeypatch, object_store):
    """Two optimizer steps a rollout: OpenRLHF's make_experience_batch with the policy's forward,
    as upstream runs it, and the same log-probs in the experiences."""
    args, groups = _configure(monkeypatch, "ngrpo", mini_batch_prompts=2)
    maker, policy, _ = _maker(args, groups)
    experiences = maker.make_experience_batch(_rollout(args))
    assert policy.calls == ["forward"]
    assert all(e.action_log_probs.eq(-1.0).all() and e.info[REUSED].eq(0).all() for e in experiences)


def test_a_short_rollout_turns_reuse_off_for_the_rest_of_the_run(patched, monkeypatch, object_store, capfd):
    """The last rollout of an episode can be short (OpenRLHF's prompt loader serves every prompt):
    it is not one optimizer step and shifts DeepSpeed's accumulation window, so from it on every
    step runs the policy's forward; said once in the log."""
    args, groups = _configure(monkeypatch, "ngrpo")
    maker, policy, _ = _maker(args, groups)
    reused = []
    for prompts in (4, 3, 4, 4):
        experiences = maker.make_experience_batch(_rollout(args, prompts=prompts))
        reused.append(float(experiences[0].info[REUSED][0]))
        assert all((e.action_log_probs is None) == bool(reused[-1]) for e in experiences)
    assert reused == [1.0, 0.0, 0.0, 0.0] and policy.calls == ["forward"] * 3
    err = capfd.readouterr().err
    assert err.count("old log-probs: reused from the training forward") == 1
    assert err.count("from a separate policy forward from this step on (a rollout of 12 samples, not 16") == 1


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
        out, metrics = loss_fn.loss_and_metrics(log_probs, None if old is None else log_probs.detach(), advantages, mask)
        out[0].backward()
        results.append((out[0].detach(), log_probs.grad, metrics))
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
        # two optimizer steps a rollout: the second is off-policy, so OpenRLHF's forward runs
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
    """The configuration decided it before the first rollout: OpenRLHF's own forward ran, and the
    second optimizer step of each rollout sees moved weights, so its ratio differs from 1 (a reused
    log-prob would make the PPO KL exactly 0)."""
    rows = _metrics(extra_runs["two_steps"])
    assert [r[REUSED] for r in rows] == [0.0, 0.0]
    assert all(r["ppo_kl"] != 0.0 for r in rows)
    log = (extra_runs["two_steps"] / "logs").glob("launch-*.log")
    assert any("old log-probs: from a separate policy forward (2 optimizer steps per rollout)" in p.read_text()
               for p in log)
