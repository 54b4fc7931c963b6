"""`--uniform-groups keep|mask-aux|skip` (openrlhf_patch/uniform_groups.py, docs/ALGORITHM.md §9).

The step test runs one real OpenRLHF policy update in a child process: the recipe's command line
through OpenRLHF's own parser, ngrpo's patch installed in CPU mode, OpenRLHF's PolicyModelActor
built by its own init_model_from_pretrained (DeepspeedStrategy, ZeRO-2 on gloo, the tiny model),
a rollout of 4 prompts x 4 samples where every answer is wrong, its advantages from OpenRLHF's
experience maker through ngrpo's wrap, then PolicyModelActor.fit (ppo_train: 4 micro-batches of 4,
one optimizer step). The weights (bf16) and DeepSpeed's fp32 master copy are compared bit for
bit. GRPO's loss on that batch is only the paper's entropy bonus (0.001) and KL loss (k3, 0.001;
the reference is the policy's log-probs shifted, as after some training, so its gradient is not 0).

    python tests/test_uniform_groups.py MODEL_DIR WORK_DIR CASES_JSON   (prints UNIFORM-STEP {json})
"""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from openrlhf_patch import config as patch_config  # noqa: E402
from openrlhf_patch import uniform_groups  # noqa: E402
from openrlhf_patch.config import PatchConfig  # noqa: E402
from pipelines.launch import training  # noqa: E402
from pipelines.launch.recipes import ALGOS, RecipeError, build_recipe  # noqa: E402


# ------------------------------------------------------------------ the recipe and the launch


def test_every_recipe_defaults_to_keep_and_the_flag_reaches_the_workers():
    for algo in ALGOS:
        for preset in ("paper", "cpu-tiny", "paper-cpu"):
            assert build_recipe(algo, preset).uniform_groups == "keep", (algo, preset)
    recipe = build_recipe("grpo", "cpu-tiny", {"uniform_groups": "mask-aux"})
    config = training.build_patch_config(recipe, device="cpu", max_steps=None, reward_file="r.py")
    assert config.uniform_groups == "mask-aux"
    assert PatchConfig.from_env(config.to_env()).uniform_groups == "mask-aux"
    with pytest.raises(RecipeError, match="--uniform-groups 'drop'"):
        build_recipe("grpo", "cpu-tiny", {"uniform_groups": "drop"})


def test_mask_aux_and_skip_refuse_packing_and_turn_its_default_off():
    with pytest.raises(RecipeError, match=r"--uniform-groups 'skip': needs fixed micro-batches"):
        build_recipe("grpo", "paper", {"uniform_groups": "skip", "packing": True})
    layout = training.Layout(device="cuda", gpus_per_node=1)
    for mode in ("mask-aux", "skip"):
        argv = training.build_openrlhf_argv(build_recipe("grpo", "paper", {"uniform_groups": mode}),
                                            model="m", layout=layout)
        assert "--ds.packing_samples" not in argv and "--train.dynamic_batch_enable" not in argv


# ------------------------------------------------------------------ the decisions, on OpenRLHF's iterator


def test_zero_rows_are_responses_without_a_non_zero_advantage_on_any_token():
    advantages = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, 2.0], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    # row 2's only non-zero advantage sits on a padding token
    assert uniform_groups.zero_rows(advantages, mask).tolist() == [True, False, True, False]


def _windows(monkeypatch, mode, advantage_rows, gas):
    from openrlhf.utils.loss_utils import iter_grad_accum_global_norm

    monkeypatch.setitem(patch_config._active, "config", PatchConfig(uniform_groups=mode))
    items = []
    for rows in advantage_rows:  # one micro-batch per entry: per-row advantage, 3 tokens, the last padding
        adv = torch.tensor(rows).unsqueeze(-1).repeat(1, 3)
        mask = torch.ones(len(rows), 3, dtype=torch.bool)
        mask[:, -1] = False
        items.append(SimpleNamespace(advantages=adv * mask, action_mask=mask))
    wrapped = uniform_groups.wrap_iter_grad_accum_global_norm(iter_grad_accum_global_norm)
    return list(wrapped(iter(items), SimpleNamespace(), gas, lambda e: e.action_mask))


def test_skip_decides_per_optimizer_step_window(monkeypatch):
    pairs = _windows(monkeypatch, "skip", [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.3], [0.0, 0.0]], gas=2)
    decisions = [getattr(item, uniform_groups.ATTR) for item, _ in pairs]
    # windows: (0, 1) all zero -> skipped; (2, 3) one non-zero -> trained; (4) the trailing rest, all zero
    assert [d.skip for d in decisions] == [True, True, False, False, True]
    # upstream's normalisers are unchanged: 4 tokens of 2 rows per micro-batch, 2 micro-batches a step
    assert [float(info["batch_num_tokens"]) for _, info in pairs] == [4.0, 4.0, 4.0, 4.0, 2.0]


def test_mask_aux_normalises_the_auxiliary_terms_over_the_remaining_tokens(monkeypatch):
    pairs = _windows(monkeypatch, "mask-aux", [[0.0, 0.0], [0.0, 0.3], [0.0, 0.0], [0.0, 0.0]], gas=2)
    decisions = [getattr(item, uniform_groups.ATTR) for item, _ in pairs]
    assert not any(d.skip for d in decisions)
    assert [d.zero_rows.tolist() for d in decisions] == [[True, True], [True, False], [True, True], [True, True]]
    # window 1 keeps 2 tokens of 8 (/ gas 2): 1.0; window 2 keeps none (0: the step's guard makes it 1)
    assert [float(d.aux_info["batch_num_tokens"]) for d in decisions] == [1.0, 1.0, 0.0, 0.0]
    assert [float(d.aux_info["global_batch_size"]) for d in decisions] == [0.5, 0.5, 0.0, 0.0]
    assert [float(info["batch_num_tokens"]) for _, info in pairs] == [4.0] * 4  # the policy loss's: upstream's


def test_mask_aux_gives_the_auxiliary_terms_the_masked_mask(monkeypatch):
    from openrlhf_patch.cpu.cpu_mode import ensure_flash_attn_importable

    ensure_flash_attn_importable()  # openrlhf.models imports flash_attn
    from openrlhf.models.loss import aggregate_loss

    wrapped = uniform_groups.wrap_aggregate_loss(aggregate_loss)
    loss = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    mask = torch.ones(2, 2, dtype=torch.bool)
    assert float(wrapped(loss, mask, batch_num_tokens=torch.tensor(4.0))) == 2.5  # no step running: upstream's
    token = uniform_groups._aux.set(uniform_groups._Aux(torch.tensor([[False, False], [True, True]]),
                                                        torch.tensor(2.0), torch.tensor(1.0), 1))
    try:
        assert float(wrapped(loss, mask, batch_num_tokens=torch.tensor(4.0))) == 3.5  # (3 + 4) / 2
    finally:
        uniform_groups._aux.reset(token)


# ------------------------------------------------------------------ one real policy update


def _rollout(args, policy, algo):
    """4 prompts x 4 samples, every answer wrong, advantages by OpenRLHF's experience maker
    through ngrpo's wrap; a reference shifted from the policy (a KL loss with a gradient)."""
    from openrlhf.trainer.ppo_utils.experience import Experience
    from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker
    from openrlhf.trainer.ppo_utils.kl_controller import FixedKLController

    gen = torch.Generator().manual_seed(0)
    n, prompt_len, response_len = 16, 8, 8
    sequences = torch.randint(3, 200, (n, prompt_len + response_len), generator=gen)
    attention_mask = torch.ones_like(sequences)
    action_mask = torch.ones(n, response_len, dtype=torch.bool)
    lengths = torch.randint(3, response_len + 1, (n,), generator=gen)
    for i, length in enumerate(lengths.tolist()):  # responses that stopped early: right padding
        action_mask[i, length:] = False
        attention_mask[i, prompt_len + length:] = 0
    with torch.no_grad():
        log_probs = policy.actor(sequences, action_mask, attention_mask=attention_mask).float() * action_mask
    reference = (log_probs + 0.3 * torch.randn(log_probs.shape, generator=gen)) * action_mask
    experiences = []
    for start in range(0, n, 4):
        rows = slice(start, start + 4)
        experiences.append(Experience(
            sequences=sequences[rows], attention_mask=attention_mask[rows], action_mask=action_mask[rows],
            action_log_probs=log_probs[rows], base_action_log_probs=reference[rows],
            kl=torch.zeros(4, response_len), rewards=torch.zeros(4), scores=torch.zeros(4),
            response_length=action_mask[rows].sum(-1).float(), total_length=attention_mask[rows].sum(-1).float(),
            index=list(range(start, start + 4)), info={}))
    maker = RemoteExperienceMaker(None, None, None, None, FixedKLController(0.0), SimpleNamespace(args=args), None)
    experiences = maker.compute_advantages_and_returns(experiences)
    for e in experiences:
        e.info = {}
        policy.trainer.replay_buffer.append(e)
    return [float(a) for e in experiences for a in e.advantages[:, 0]]


def _state(policy):
    engine = policy.actor.model
    weights = [p.detach().clone() for p in engine.module.parameters()]
    masters = [t.detach().clone() for t in getattr(engine.optimizer, "single_partition_of_fp32_groups", [])]
    return weights, masters


def _one_step(model_dir: str, work: str, case: dict) -> dict:
    from openrlhf.trainer.ray.ppo_actor import PolicyModelActor
    from openrlhf.utils import get_strategy

    recipe = build_recipe(case["algo"], "cpu-tiny", case["overrides"])
    argv = training.build_openrlhf_argv(recipe, model=model_dir, layout=training.Layout.for_device("cpu"))
    args = training.parse_with_openrlhf(training.materialise_argv(argv, work))
    patch_config.activate(training.build_patch_config(recipe, device="cpu", max_steps=None, reward_file=None))
    strategy = get_strategy(args)
    torch.manual_seed(0)
    policy = PolicyModelActor.__ray_metadata__.modified_class(1, 0, "127.0.0.1", case["port"])
    policy.init_model_from_pretrained(strategy, model_dir, max_steps=4, vllm_engines=None)
    advantages = _rollout(args, policy, case["algo"])
    weights, masters = _state(policy)
    steps_before = policy.actor.model.global_steps
    status = policy.fit(kl_ctl=recipe.kl_coef if recipe.kl_mode == "loss" else 0.0)
    after_weights, after_masters = _state(policy)
    return {
        "case": case["name"], "advantages": advantages, "masters": len(masters),
        "weights_changed": sum(not torch.equal(a, b) for a, b in zip(weights, after_weights)),
        "masters_changed": sum(not torch.equal(a, b) for a, b in zip(masters, after_masters)),
        "optimizer_steps": policy.actor.model.global_steps - steps_before,
        "metrics": {k: float(v) for k, v in status.items() if isinstance(v, (int, float))},
    }


def _main(model_dir, work, cases_json):
    os.environ.update(DS_ACCELERATOR="cpu", LOCAL_RANK="0")
    from openrlhf_patch import install

    # the first case's config installs the hooks (mask-aux or skip installs the uniform-groups layers;
    # a later case with keep runs through them unchanged, uniform_groups.mode() is read per call)
    cases = json.loads(cases_json)
    recipe = build_recipe(cases[0]["algo"], "cpu-tiny", cases[0]["overrides"])
    install.apply(training.build_patch_config(recipe, device="cpu", max_steps=None, reward_file=None), role="test")
    for case in cases:
        print("UNIFORM-STEP " + json.dumps(_one_step(model_dir, work, case)), flush=True)


if __name__ == "__main__":
    _main(*sys.argv[1:4])


GRPO = {"kl_mode": "loss", "kl_coef": 0.001, "entropy_coef": 0.001}  # the paper's (GRPO's recipe has them)
CASES = [
    # weight_decay 0 where the step runs: AdamW's decoupled decay would move weights whatever the gradient
    dict(name="grpo-keep", algo="grpo", overrides=dict(GRPO, uniform_groups="keep", weight_decay=0.0)),
    dict(name="grpo-mask-aux", algo="grpo", overrides=dict(GRPO, uniform_groups="mask-aux", weight_decay=0.0)),
    dict(name="grpo-skip", algo="grpo", overrides=dict(GRPO, uniform_groups="skip")),  # the recipe's decay: no step
    dict(name="ngrpo-keep", algo="ngrpo", overrides=dict(uniform_groups="keep")),
    dict(name="ngrpo-mask-aux", algo="ngrpo", overrides=dict(uniform_groups="mask-aux")),
    dict(name="ngrpo-skip", algo="ngrpo", overrides=dict(uniform_groups="skip")),
]


@pytest.fixture(scope="module")
def steps(tiny_model_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("uniform")
    # mask-aux first: it installs the layers (see _main); ports differ per case (one gloo group each)
    order = [CASES[1], CASES[0], *CASES[2:]]
    cases = [dict(c, port=29700 + i) for i, c in enumerate(order)]
    proc = subprocess.run([sys.executable, __file__, str(tiny_model_dir), str(work), json.dumps(cases)],
                          capture_output=True, text=True, cwd=REPO, timeout=1200,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", "DS_ACCELERATOR": "cpu"})
    out = {}
    for line in proc.stdout.splitlines():
        if line.startswith("UNIFORM-STEP "):
            result = json.loads(line[len("UNIFORM-STEP "):])
            out[result["case"]] = result
    assert proc.returncode == 0 and len(out) == len(CASES), (proc.stdout[-3000:] + proc.stderr[-6000:])
    print(json.dumps(out, indent=1))
    return out


@pytest.mark.pipeline
def test_an_all_wrong_grpo_step_moves_no_weight_under_mask_aux_and_skip(steps):
    assert all(a == 0.0 for a in steps["grpo-keep"]["advantages"])  # GRPO: no signal in the batch
    keep, masked, skipped = steps["grpo-keep"], steps["grpo-mask-aux"], steps["grpo-skip"]
    assert keep["weights_changed"] > 0 and keep["masters_changed"] > 0 and keep["optimizer_steps"] == 1
    assert masked["weights_changed"] == 0 and masked["masters_changed"] == 0 and masked["masters"] > 0
    assert masked["optimizer_steps"] == 1  # it stepped, with a gradient of exactly 0
    assert masked["metrics"][uniform_groups.MASKED_METRIC] == 1.0
    assert skipped["weights_changed"] == 0 and skipped["masters_changed"] == 0 and skipped["optimizer_steps"] == 0
    assert skipped["metrics"][uniform_groups.SKIPPED_METRIC] == 1.0
    assert "entropy_loss" in skipped["metrics"] and "policy_loss" in skipped["metrics"]  # forward ran, metrics came


@pytest.mark.pipeline
def test_an_all_wrong_ngrpo_step_moves_weights_under_every_setting(steps):
    advantages = steps["ngrpo-keep"]["advantages"]
    assert all(a < 0 for a in advantages)  # NGRPO's virtual correct answer: every wrong answer pushed down
    for mode in ("keep", "mask-aux", "skip"):
        result = steps[f"ngrpo-{mode}"]
        assert result["advantages"] == advantages
        assert result["weights_changed"] > 0 and result["masters_changed"] > 0 and result["optimizer_steps"] == 1, mode
    assert steps["ngrpo-mask-aux"]["metrics"][uniform_groups.MASKED_METRIC] == 0.0
    assert steps["ngrpo-skip"]["metrics"][uniform_groups.SKIPPED_METRIC] == 0.0
