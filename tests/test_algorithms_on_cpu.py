"""CPU tests of NGRPO's algorithm core (openrlhf_patch.algorithms) against docs/ALGORITHM.md §2-§4.

Every expected number here is either copied from the docs/ALGORITHM.md §2 table, derived from a closed form
written out in the test, or computed by the slow per-group reference (openrlhf_patch.reference),
never by the code under test.
"""
import importlib
import importlib.util
import math
import sys
import types
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from openrlhf_patch.algorithms import (
    ESTIMATORS,
    GROUP_FILTERS,
    batch_diagnostics,
    group_advantages,
    group_keep_mask,
)
from openrlhf_patch.reference import policy_loss, reference_group_advantages

EPS = 1e-6



def _doc_script(name: str):
    path = Path(__file__).resolve().parents[1] / "docs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"docs_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# docs/ALGORITHM.md §2 table, as docs/advantage_table.py (standalone, numpy only) quotes the reference
# specification: G = 8, binary rewards, k correct -> (GRPO A+, GRPO A-, NGRPO A+, NGRPO A-); None
# where the group has no response of that kind.
TABLE = _doc_script("advantage_table").SPEC_TABLE


def _binary_group(k: int, g: int = 8) -> torch.Tensor:
    return torch.tensor([1.0] * k + [0.0] * (g - k))


def _split(adv: torch.Tensor, k: int):
    """(advantages of the k correct responses, advantages of the wrong ones)."""
    return adv[:k], adv[k:]


# ------------------------------------------------------------------ docs/ALGORITHM.md §2 table and closed forms

@pytest.mark.parametrize("k", range(9))
def test_spec_table_values(k):
    rewards = _binary_group(k)
    grpo_pos, grpo_neg, ngrpo_pos, ngrpo_neg = TABLE[k]
    for estimator, pos, neg in (("grpo", grpo_pos, grpo_neg), ("ngrpo", ngrpo_pos, ngrpo_neg)):
        adv = group_advantages(rewards, 8, estimator)
        assert adv.shape == (8,) and adv.dtype == torch.float32
        correct, wrong = _split(adv, k)
        if pos is not None:
            assert torch.allclose(correct, torch.full_like(correct, pos), atol=1e-4, rtol=0), (estimator, correct)
        if neg is not None:
            assert torch.allclose(wrong, torch.full_like(wrong, neg), atol=1e-4, rtol=0), (estimator, wrong)


@pytest.mark.parametrize("k", range(9))
def test_ngrpo_closed_forms(k):
    adv = group_advantages(_binary_group(k), 8, "ngrpo")
    correct, wrong = _split(adv, k)
    a_pos = math.sqrt(8 * (8 - k) / (9 * (k + 1)))
    assert torch.allclose(correct, torch.full_like(correct, a_pos), atol=1e-4, rtol=0)
    if k < 8:
        a_neg = -math.sqrt(8 * (k + 1) / (9 * (8 - k)))
        assert torch.allclose(wrong, torch.full_like(wrong, a_neg), atol=1e-4, rtol=0)


@pytest.mark.parametrize("k", range(9))
def test_grpo_closed_forms(k):
    # Bessel std of k ones and 8-k zeros: sqrt(k(8-k)/(8*7)).
    adv = group_advantages(_binary_group(k), 8, "grpo")
    correct, wrong = _split(adv, k)
    std = math.sqrt(k * (8 - k) / 56)
    assert torch.allclose(correct, torch.full_like(correct, (1 - k / 8) / (std + EPS)), atol=1e-4, rtol=0)
    assert torch.allclose(wrong, torch.full_like(wrong, (0 - k / 8) / (std + EPS)), atol=1e-4, rtol=0)


def test_whole_table_in_one_vectorised_batch():
    # All nine groups in one batch: group boundaries must not leak between groups.
    rewards = torch.cat([_binary_group(k) for k in range(9)])
    adv = group_advantages(rewards, 8, "ngrpo").view(9, 8)
    for k in range(9):
        alone = group_advantages(_binary_group(k), 8, "ngrpo")
        assert torch.equal(adv[k], alone)


# ------------------------------------------------------------------ NGRPO == GRPO on augmented groups

@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_ngrpo_is_grpo_with_virtual_samples(data):
    group_size = data.draw(st.integers(1, 16), label="group_size")
    k_virtual = data.draw(st.integers(0, 4), label="K")
    n_groups = data.draw(st.integers(1, 6), label="n_groups")
    r_max = float(torch.tensor(data.draw(st.floats(0.05, 20.0), label="R_max"), dtype=torch.float32))
    fracs = data.draw(
        st.lists(st.floats(0.0, 1.0), min_size=n_groups * group_size, max_size=n_groups * group_size),
        label="fractions",
    )
    # Non-binary rewards in [0, R_max]; the clamp guards against float32 rounding above R_max.
    rewards = (torch.tensor(fracs, dtype=torch.float32) * r_max).clamp(max=r_max)

    ngrpo = group_advantages(rewards, group_size, "ngrpo", virtual_samples=k_virtual, max_reward=r_max)
    grpo = group_advantages(rewards, group_size, "grpo")
    assert ngrpo.shape == rewards.shape
    if k_virtual == 0 or group_size == 1:
        # K = 0 is exactly grpo; a lone response never gets a virtual sample (verl convention).
        assert torch.equal(ngrpo, grpo)
        if group_size == 1:
            assert torch.allclose(ngrpo, rewards, rtol=2e-6, atol=0)
        return

    groups = rewards.view(n_groups, group_size)
    virtual = torch.full((n_groups, k_virtual), r_max)
    augmented = torch.cat([groups, virtual], dim=1).reshape(-1)
    # the expectation comes from the per-group reference loop, not from the code under test
    expected = reference_group_advantages(augmented, group_size + k_virtual, "grpo").view(n_groups, -1)[:, :group_size]
    assert torch.allclose(ngrpo.view(n_groups, group_size), expected, atol=1e-4, rtol=1e-4)


def test_group_of_one_follows_verl_convention():
    # mean 0, std 1, no virtual sample: A = (r - 0) / (1 + eps).
    rewards = torch.tensor([0.0, 1.0, 0.25, 1.0])
    for estimator in ("grpo", "ngrpo"):
        adv = group_advantages(rewards, 1, estimator, virtual_samples=3)
        assert torch.equal(adv, rewards / (torch.ones(4) + EPS))
    assert torch.equal(group_advantages(rewards, 1, "dr_grpo"), rewards)
    assert torch.equal(adv, reference_group_advantages(rewards, 1, "ngrpo", virtual_samples=3))


def test_all_correct_groups_get_exactly_zero_even_for_non_dyadic_rewards():
    # 0.7 has no exact float32 mean over 9 copies; a naive (r - mean) / (std + 1e-6) turns that
    # rounding into an advantage of ~0.056. An all-correct group must carry no signal.
    rewards = torch.full((16,), 0.7)
    for estimator in ("grpo", "ngrpo", "dr_grpo", "rloo"):
        adv = group_advantages(rewards, 8, estimator, max_reward=0.7)
        assert torch.equal(adv, torch.zeros(16)), estimator


def test_eps_is_added_to_the_std():
    # std of [0, 2e-6] is sqrt(2)*1e-6, so eps=1e-6 matters: A = +-1e-6 / (sqrt(2)*1e-6 + 1e-6).
    adv = group_advantages(torch.tensor([0.0, 2e-6], dtype=torch.float64), 2, "grpo")
    want = 1 / (1 + math.sqrt(2))
    assert torch.allclose(adv, torch.tensor([-want, want], dtype=torch.float64), rtol=1e-9, atol=0)
    # A large eps shrinks the §2 table values: k=1 NGRPO A+ = (1 - 2/9) / (std + 0.5).
    std = math.sqrt((2 * (7 / 9) ** 2 + 7 * (2 / 9) ** 2) / 8)
    got = group_advantages(_binary_group(1), 8, "ngrpo", adv_eps=0.5)[0].item()
    assert got == pytest.approx((7 / 9) / (std + 0.5), abs=1e-6)


def test_dtype_promotion_and_device():
    rewards = _binary_group(3).to(torch.bfloat16)
    adv = group_advantages(rewards, 8, "ngrpo")
    assert adv.dtype == torch.float32 and adv.device == rewards.device
    assert torch.allclose(adv, group_advantages(_binary_group(3), 8, "ngrpo"))
    adv64 = group_advantages(_binary_group(3).double(), 8, "ngrpo")
    assert adv64.dtype == torch.float64
    assert abs(adv64[0].item() - math.sqrt(8 * 5 / (9 * 4))) < 1e-5  # eps only
    assert group_advantages(torch.tensor([1, 0, 0, 0]), 4, "grpo").dtype == torch.float32


# ------------------------------------------------------------------ vectorised == per-group reference

def _random_rewards(kind: str, n_groups: int, group_size: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    n = n_groups * group_size
    if kind == "binary":
        return (torch.rand(n, generator=gen) < 0.35).float()
    if kind == "partial":  # dyadic partial credit, with all-equal groups likely
        return torch.tensor([0.0, 0.25, 0.5, 1.0])[torch.randint(0, 4, (n,), generator=gen)]
    return torch.rand(n, generator=gen)  # continuous in [0, 1)


# ucpo needs an uncertain reward and groups of 3 or more: tests/test_ucpo.py checks it against its own loop.
@pytest.mark.parametrize("estimator", [e for e in ESTIMATORS if e != "ucpo"])
@pytest.mark.parametrize(
    "kind,n_groups,group_size,seed",
    [("binary", 64, 8, 0), ("binary", 40, 4, 1), ("partial", 32, 5, 2), ("continuous", 24, 16, 3), ("binary", 20, 2, 4)],
)
def test_vectorised_matches_reference(estimator, kind, n_groups, group_size, seed):
    rewards = _random_rewards(kind, n_groups, group_size, seed)
    kwargs = dict(virtual_samples=2 if seed % 2 else 1, max_reward=1.0, w_reinforce_lambda=0.1)
    got = group_advantages(rewards, group_size, estimator, **kwargs)
    want = reference_group_advantages(rewards, group_size, estimator, **kwargs)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=2e-5, rtol=1e-5), (got - want).abs().max()


def test_sample_wise_estimators_exact_values():
    rewards = torch.tensor([1.0, 0.0, 0.5, 1.0])
    assert torch.allclose(group_advantages(rewards, 2, "w_reinforce"), torch.tensor([0.1, -1.0, -1.0, 0.1]))
    assert torch.equal(group_advantages(rewards, 2, "w_reinforce", w_reinforce_lambda=0.5), torch.tensor([0.5, -1, -1, 0.5]))
    assert torch.equal(group_advantages(rewards, 2, "psr"), torch.tensor([1.0, 0.0, 0.0, 1.0]))
    assert torch.equal(group_advantages(rewards, 2, "nsr"), torch.tensor([0.0, -1.0, -1.0, 0.0]))
    # RLOO and Dr. GRPO by hand: group [1, 0] and [0.5, 1].
    assert torch.allclose(group_advantages(rewards, 2, "rloo"), torch.tensor([1.0, -1.0, -0.5, 0.5]))
    assert torch.allclose(group_advantages(rewards, 2, "dr_grpo"), torch.tensor([0.5, -0.5, -0.25, 0.25]))


# ------------------------------------------------------------------ policy loss

def _loss_inputs(ratios, advantages, mask):
    ratios = torch.tensor(ratios, dtype=torch.float32)
    old = torch.full_like(ratios, -1.5)
    log_probs = (old + ratios.log()).requires_grad_(True)
    return log_probs, old, torch.tensor(advantages, dtype=torch.float32), torch.tensor(mask, dtype=torch.bool)


def test_gradient_is_zero_exactly_where_clipped():
    eps_low, eps_high = 0.16, 0.24
    # Ratios on both sides of each bound (0.84 and 1.24), far enough to be unambiguous in float32.
    row = [0.5, 0.83, 0.85, 1.0, 1.23, 1.25, 2.0]
    ratios = [row, row, row, row]
    adv = [[1.0] * 7, [-1.0] * 7, [0.3] * 7, [-2.5] * 7]
    mask = [[1] * 7, [1] * 7, [1] * 7, [1, 1, 1, 0, 1, 1, 1]]
    log_probs, old, advantages, action_mask = _loss_inputs(ratios, adv, mask)
    loss, _ = policy_loss(log_probs, old, advantages, action_mask, eps_low=eps_low, eps_high=eps_high)
    loss.backward()
    grad = log_probs.grad

    r = torch.tensor(ratios)
    a = torch.tensor(adv)
    clipped = ((a > 0) & (r > 1 + eps_high)) | ((a < 0) & (r < 1 - eps_low))
    m = action_mask
    assert clipped.any() and (~clipped & m).any()
    assert torch.all(grad[clipped & m] == 0)
    assert torch.all(grad[~clipped & m] != 0)
    assert torch.all(grad[~m] == 0)
    # Unclipped tokens: d/dlogp of -A*ratio/N_tokens is -A*ratio/N_tokens.
    n_tok = m.sum()
    want = (-a * r / n_tok)[~clipped & m]
    assert torch.allclose(grad[~clipped & m], want, rtol=1e-5, atol=0)


def test_masked_tokens_get_zero_gradient_even_with_garbage_log_probs():
    log_probs = torch.tensor([[-1.0, float("-inf"), float("nan")], [-0.5, -0.7, 3.0]], requires_grad=True)
    old = torch.tensor([[-1.1, -1.0, -1.0], [-0.4, float("nan"), -1.0]])
    mask = torch.tensor([[1, 0, 0], [1, 0, 0]])
    for aggregation in ("token-mean", "seq-mean"):
        log_probs.grad = None
        loss, stats = policy_loss(log_probs, old, torch.tensor([1.0, -1.0]), mask, aggregation=aggregation)
        loss.backward()
        assert torch.isfinite(loss) and all(torch.isfinite(v) for v in stats.values())
        assert torch.all(log_probs.grad[mask == 0] == 0)
        assert torch.all(log_probs.grad[mask == 1] != 0)


def test_zero_advantages_give_exactly_zero_gradient():
    gen = torch.Generator().manual_seed(0)
    log_probs = (-torch.rand(6, 10, generator=gen) * 3).requires_grad_(True)
    old = -torch.rand(6, 10, generator=gen) * 3
    mask = torch.rand(6, 10, generator=gen) < 0.7
    for aggregation in ("token-mean", "seq-mean"):
        log_probs.grad = None
        loss, _ = policy_loss(log_probs, old, torch.zeros(6), mask, eps_low=0.16, eps_high=0.24, aggregation=aggregation)
        loss.backward()
        assert loss.item() == 0.0
        assert torch.all(log_probs.grad == 0)


def test_clip_fractions_and_kl_on_hand_built_batch():
    ratios = [[1.3, 1.1, 0.5, 1.5], [0.7, 0.9, 1.5, 0.8]]
    mask = [[1, 1, 1, 0], [1, 1, 1, 1]]  # 7 action tokens; the masked 1.5 must not count
    log_probs, old, _, action_mask = _loss_inputs(ratios, [[0.0] * 4] * 2, mask)
    loss, stats = policy_loss(log_probs, old, torch.tensor([1.0, -1.0]), action_mask, eps_low=0.16, eps_high=0.24)
    # high: A>0 and ratio>1.24 -> {1.3}; low: A<0 and ratio<0.84 -> {0.7, 0.8}.
    assert stats["clip_frac_high"].item() == pytest.approx(1 / 7, abs=1e-7)
    assert stats["clip_frac_low"].item() == pytest.approx(2 / 7, abs=1e-7)
    assert stats["clip_frac"].item() == pytest.approx(3 / 7, abs=1e-7)
    kept = [1.3, 1.1, 0.5, 0.7, 0.9, 1.5, 0.8]
    assert stats["approx_kl"].item() == pytest.approx(-sum(math.log(x) for x in kept) / 7, abs=1e-6)
    # Loss by hand: A=+1 row: -min(r, 1.24) per token; A=-1 row: max(r, 0.84) per token.
    want = (-(1.24 + 1.1 + 0.5) + (0.84 + 0.9 + 1.5 + 0.84)) / 7
    assert loss.item() == pytest.approx(want, abs=1e-6)
    assert not any(v.requires_grad for v in stats.values())


def test_token_mean_vs_seq_mean_on_hand_built_batch():
    # ratio 1 everywhere, so every action token's loss is -A.
    old = torch.zeros(3, 4)
    log_probs = torch.zeros(3, 4)
    adv = torch.tensor([1.0, -2.0, 5.0])
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0]])  # 3 + 1 + 0 action tokens
    token_mean, _ = policy_loss(log_probs, old, adv, mask, aggregation="token-mean")
    seq_mean, _ = policy_loss(log_probs, old, adv, mask, aggregation="seq-mean")
    assert token_mean.item() == pytest.approx((-1.0 * 3 + 2.0 * 1) / 4, abs=1e-7)  # -0.25
    assert seq_mean.item() == pytest.approx((-1.0 + 2.0) / 2, abs=1e-7)  # 0.5: empty sequence left out


def test_per_token_advantages_equal_broadcast_ones():
    gen = torch.Generator().manual_seed(1)
    log_probs, old = -torch.rand(4, 5, generator=gen), -torch.rand(4, 5, generator=gen)
    adv = torch.randn(4, generator=gen)
    mask = torch.ones(4, 5)
    a, sa = policy_loss(log_probs, old, adv, mask, eps_low=0.16, eps_high=0.24)
    b, sb = policy_loss(log_probs, old, adv[:, None].expand(4, 5), mask, eps_low=0.16, eps_high=0.24)
    assert torch.equal(a, b) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_bf16_inputs_are_computed_in_float32():
    log_probs = torch.full((2, 3), -1.0, dtype=torch.bfloat16)
    loss, stats = policy_loss(log_probs, log_probs, torch.tensor([1.0, 1.0]), torch.ones(2, 3))
    assert loss.dtype == torch.float32 and loss.item() == -1.0


# ------------------------------------------------------------------ group filters

def test_group_keep_masks_for_each_mode():
    rewards = torch.tensor(
        [1, 1, 1, 1,              # all correct
         0, 0, 0, 0,              # all wrong
         1, 0, 0, 1,              # mixed
         0.5, 0.5, 0.5, 0.5,      # partial credit only: no response correct -> "all wrong"
         1, 0.5, 0.5, 0.5],       # mixed
        dtype=torch.float32,
    )
    expected = {
        "none": [True, True, True, True, True],
        "drop_all_correct": [False, True, True, True, True],
        "drop_all_correct_and_all_wrong": [False, False, True, False, True],
        "drop_all_wrong": [True, False, True, False, True],
        # no uncertain_reward: every response short of R_max is wrong (tests/test_ucpo.py has the ternary case)
        "drop_non_ternary": [False, False, True, False, True],
    }
    assert set(expected) == set(GROUP_FILTERS)
    for mode, want in expected.items():
        got = group_keep_mask(rewards, 4, mode)
        assert got.dtype == torch.bool and got.tolist() == want, mode
    # With max_reward 0.5 the partial-credit group counts as all correct.
    assert group_keep_mask(rewards, 4, "drop_all_correct", max_reward=0.5).tolist() == [False, True, True, False, False]


# ------------------------------------------------------------------ diagnostics

def _ngrpo_group_sum(k: int, g: int = 8) -> float:
    """Sum of NGRPO advantages over the g real samples (k correct, binary, K=1): the g+1 centred
    values sum to 0, so the real ones sum to minus the virtual sample's (1 - mean) / (std + eps)."""
    n = g + 1
    mean = (k + 1) / n
    std = math.sqrt(((k + 1) * (1 - mean) ** 2 + (g - k) * mean**2) / (n - 1))
    return -(1 - mean) / (std + EPS)


def test_batch_diagnostics_on_hand_built_batch():
    # Two all-wrong groups, one all-correct, two mixed (k=2, k=5): 5 groups of 8.
    rewards = torch.cat([_binary_group(0), _binary_group(8), _binary_group(2), _binary_group(0), _binary_group(5)])
    base = batch_diagnostics(rewards, 8)
    assert base == {"frac_all_wrong": 0.4, "frac_all_correct": 0.2, "frac_mixed": 0.4, "accuracy": 15 / 40}

    ngrpo = batch_diagnostics(rewards, 8, group_advantages(rewards, 8, "ngrpo"))
    assert _ngrpo_group_sum(0) == pytest.approx(-8 / 3, abs=1e-5)  # -G/3 per all-wrong group
    assert ngrpo["adv_sum_all_wrong"] == pytest.approx(2 * -8 / 3, abs=1e-4)
    assert ngrpo["adv_sum_all_correct"] == 0.0
    assert ngrpo["adv_sum_mixed"] == pytest.approx(_ngrpo_group_sum(2) + _ngrpo_group_sum(5), abs=1e-4)
    assert ngrpo["adv_sum_mixed"] < 0  # every mixed group gets a net negative push (docs/ALGORITHM.md §2)

    grpo = batch_diagnostics(rewards, 8, group_advantages(rewards, 8, "grpo"))
    assert grpo["adv_sum_all_wrong"] == 0.0 and grpo["adv_sum_all_correct"] == 0.0
    assert grpo["adv_sum_mixed"] == pytest.approx(0.0, abs=1e-5)
    assert {k: grpo[k] for k in base} == base


# ------------------------------------------------------------------ bad input

_R8 = torch.tensor([1.0, 0, 0, 1, 0, 0, 0, 0])


def _lp(shape=(2, 3)):
    return torch.zeros(shape)


BAD_INPUTS = [
    (lambda: group_advantages(torch.tensor([0.0, float("nan"), 1, float("inf")]), 2, "grpo"),
     r"rewards contains 2 non-finite.*first at index 1"),
    (lambda: group_advantages(torch.zeros(10), 4, "ngrpo"), r"10 elements.*not a multiple of group_size=4"),
    (lambda: group_advantages(torch.tensor([0.0, 1.0, 1.5, 0.0]), 2, "ngrpo"),
     r"rewards\[2\] = 1.5 is above max_reward=1.0"),
    (lambda: group_advantages(_R8, 8, "ngrpo", virtual_samples=-1), r"virtual_samples must be >= 0, got -1"),
    (lambda: group_advantages(_R8, 8, "ngrpo", adv_eps=0.0), r"adv_eps must be > 0.*got 0.0"),
    (lambda: group_advantages(_R8, 8, "grpo", adv_eps=-1e-6), r"adv_eps must be > 0"),
    (lambda: group_advantages(_R8, 0, "grpo"), r"group_size must be >= 1, got 0"),
    (lambda: group_advantages(_R8, 1, "rloo"), r"rloo.*group_size >= 2 \(a leave-one-out baseline\), got 1"),
    (lambda: group_advantages(_R8, 8, "ppo"), r"unknown estimator 'ppo'; valid: grpo, ngrpo, dr_grpo, rloo"),
    (lambda: group_advantages(_R8.view(2, 4), 4, "grpo"), r"rewards must be a 1-D tensor.*\(2, 4\)"),
    (lambda: group_keep_mask(_R8, 4, "dapo"), r"unknown mode 'dapo'; valid: none, drop_all_correct"),
    (lambda: group_keep_mask(torch.zeros(6), 4, "none"), r"6 elements.*group_size=4"),
    (lambda: batch_diagnostics(torch.tensor([0.0, float("nan")]), 2), r"1 non-finite.*index 1"),
    (lambda: batch_diagnostics(_R8, 4, torch.zeros(7)), r"advantages must have the shape of rewards \(8,\), got \(7,\)"),
    (lambda: policy_loss(_lp(), _lp(), torch.zeros(2), torch.ones(2, 3), eps_low=0.0), r"eps_low must be in \(0, 1\), got 0.0"),
    (lambda: policy_loss(_lp(), _lp(), torch.zeros(2), torch.ones(2, 3), eps_high=1.0), r"eps_high must be in \(0, 1\), got 1.0"),
    (lambda: policy_loss(_lp(), _lp(), torch.zeros(2), torch.ones(2, 3), eps_low=-0.2), r"eps_low must be in \(0, 1\)"),
    (lambda: policy_loss(_lp(), _lp(), torch.zeros(2), torch.ones(2, 3), aggregation="sum"),
     r"unknown aggregation 'sum'; valid: token-mean, seq-mean"),
    (lambda: policy_loss(_lp(), _lp((2, 4)), torch.zeros(2), torch.ones(2, 3)), r"old_log_probs has shape \(2, 4\)"),
    (lambda: policy_loss(_lp(), _lp(), torch.zeros(2), torch.ones(3, 3)), r"action_mask has shape \(3, 3\)"),
    (lambda: policy_loss(_lp(), _lp(), torch.zeros(3), torch.ones(2, 3)), r"advantages must have shape \(B,\).*got \(3,\)"),
]


@pytest.mark.parametrize("call,match", BAD_INPUTS, ids=[m[:40] for _, m in BAD_INPUTS])
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ------------------------------------------------------------------ upstream OpenRLHF PolicyLoss

def _upstream_policy_loss():
    """OpenRLHF's PolicyLoss; if openrlhf.models cannot be imported because flash_attn (a GPU-only
    package) is missing, load openrlhf/models/loss.py itself (and its utils.py) without running
    openrlhf/models/__init__.py, which is what pulls flash_attn in."""
    if importlib.util.find_spec("openrlhf") is None:
        pytest.skip("openrlhf is not installed in this environment")
    try:
        from openrlhf.models.loss import PolicyLoss

        return PolicyLoss
    except ModuleNotFoundError as err:
        if not (err.name or "").startswith("flash_attn"):
            raise
    models_dir = Path(importlib.util.find_spec("openrlhf").submodule_search_locations[0]) / "models"
    name = "_ngrpo_upstream_openrlhf_models"
    if name not in sys.modules:
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(models_dir)]
        sys.modules[name] = pkg
    try:
        return importlib.import_module(f"{name}.loss").PolicyLoss
    except ImportError as err:
        pytest.skip(f"openrlhf.models needs flash_attn, and loading openrlhf/models/loss.py alone failed: {err}")


@pytest.mark.parametrize("eps_low,eps_high", [(0.16, 0.24), (0.2, 0.2), (0.2, 0.28)])
def test_matches_upstream_openrlhf_policy_loss(eps_low, eps_high):
    PolicyLoss = _upstream_policy_loss()
    gen = torch.Generator().manual_seed(int(eps_high * 100))
    b, t = 12, 20
    old = -torch.rand(b, t, generator=gen) * 4
    log_probs = old + torch.randn(b, t, generator=gen) * 0.3  # ratios roughly in [0.4, 2.5]
    adv = torch.randn(b, generator=gen)
    mask = torch.rand(b, t, generator=gen) < 0.8
    mask[:, 0] = True
    ours, stats = policy_loss(log_probs, old, adv, mask, eps_low=eps_low, eps_high=eps_high, aggregation="token-mean")
    upstream = PolicyLoss(clip_eps_low=eps_low, clip_eps_high=eps_high, token_level_loss=True)
    loss, clip_ratio, *_ = upstream(log_probs, old, adv[:, None].expand(b, t), action_mask=mask.float())
    assert stats["clip_frac"].item() > 0.05  # the example really exercises clipping
    assert torch.allclose(ours, loss, atol=1e-6, rtol=1e-6)
    assert torch.allclose(stats["clip_frac"], clip_ratio, atol=1e-7)
