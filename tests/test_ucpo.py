"""UCPO and GRPO-UC (docs/ALGORITHM.md §8): abstention, ternary advantage decoupling, non-ternary
filtering, diagnostics, the reward's abstention check, the eval metrics, the recipes, and one CPU
training run whose scripted reward forces every class.

Expected advantages are worked by hand (closed forms in the comments) or by `_ucpo_loop`, a plain
per-response loop written here from the formulas, never by calling the code under test.
"""
import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from openrlhf_patch import algorithms
from openrlhf_patch.algorithms import batch_diagnostics, group_advantages, group_keep_mask
from openrlhf_patch.config import PatchConfig
from pipelines.datasets import abstention, prompts
from pipelines.evaluate import evaluation
from pipelines.launch.recipes import RecipeError, build_recipe

EPS = 1e-6
U = 0.2  # the uncertain reward of the recipes
U32 = float(torch.tensor(U, dtype=torch.float32))  # 0.2 as a float32 reward holds it (0.20000000298...)
C, W = 1.0, 0.0


# ---------------------------------------------------------------- the oracle: a plain loop

def _ucpo_loop(rewards, g, uncertain=U, w=1.0, eps=EPS, max_reward=1.0):
    """UCPO as the formulas read, one group and one response at a time, in float64."""
    out = []
    for start in range(0, len(rewards), g):
        group = [float(r) for r in rewards[start:start + g]]
        kind = ["c" if r >= max_reward else "u" if r == uncertain else "w" for r in group]
        if "c" not in kind or "w" not in kind:
            out += [0.0] * g
            continue
        det = [r for r, k in zip(group, kind) if k != "u"]
        mean = sum(det) / len(det)
        std = math.sqrt(sum((r - mean) ** 2 for r in det) / (len(det) - 1))
        adv = {i: (r - mean) / (std + eps) for i, (r, k) in enumerate(zip(group, kind)) if k != "u"}
        correct = [adv[i] for i, k in enumerate(kind) if k == "c"]
        a_right = sum(correct) / len(correct)
        p_r, p_w, p_u = (kind.count(k) / g for k in "cwu")
        gamma = p_w / (p_u + p_w + eps) * (1 - p_u) - w * p_r / (p_r + p_w + eps) * p_u
        out += [adv[i] if k != "u" else gamma * a_right for i, k in enumerate(kind)]
    return out


# ---------------------------------------------------------------- hand-worked groups of 8

# (rewards, A correct, A wrong, gamma, closed forms by hand with eps neglected)
#  2 correct, 4 wrong, 2 uncertain: det mean 1/3, Bessel var (2(2/3)^2 + 4(1/3)^2)/5 = 4/15,
#    A+ = (2/3)/sqrt(4/15) = sqrt(5/3), A- = -sqrt(5/12); gamma = .5/.75*.75 - .25/.75*.25 = 5/12.
#  1 correct, 1 wrong, 6 uncertain: A+- = +-1/sqrt(2); gamma = (1/8)/(7/8)*(2/8) - (1/8)/(2/8)*(6/8) = -19/56.
#  3 correct, 4 wrong, 1 uncertain: det mean 3/7, var 2/7, A+ = 4/sqrt(14), A- = -3/sqrt(14);
#    gamma = (4/8)/(5/8)*(7/8) - (3/8)/(7/8)*(1/8) = 181/280.
#  6 correct, 1 wrong, 1 uncertain: mean 6/7, var 1/7, A+ = (1/7)*sqrt(7) = 1/sqrt(7), A- = -6/sqrt(7);
#    gamma = (1/8)/(2/8)*(7/8) - (6/8)/(7/8)*(1/8) = 7/16 - 3/28 = 37/112.
HAND = [
    ([C, W, U, W, C, W, U, W], math.sqrt(5 / 3), -math.sqrt(5 / 12), 5 / 12),
    ([U, U, C, U, U, W, U, U], 1 / math.sqrt(2), -1 / math.sqrt(2), -19 / 56),
    ([W, C, W, C, W, C, W, U], 4 / math.sqrt(14), -3 / math.sqrt(14), 181 / 280),
    ([C, C, C, U, C, C, W, C], 1 / math.sqrt(7), -6 / math.sqrt(7), 37 / 112),
]


def _expected_hand(rewards, a_pos, a_neg, gamma):
    return [a_pos if r == C else a_neg if r == W else gamma * a_pos for r in rewards]


def test_hand_worked_groups_of_8():
    rewards = torch.tensor([r for rs, *_ in HAND for r in rs])
    got = group_advantages(rewards, 8, "ucpo", uncertain_reward=U)
    want = [v for rs, a, b, g in HAND for v in _expected_hand(rs, a, b, g)]
    # eps = 1e-6 moves each value by < 3e-6 of itself; float32 rounding by ~1e-7
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), torch.tensor(want, dtype=torch.float64), rtol=4e-6, atol=1e-6), got
    # the uncertain response of the first group: 5/12 * sqrt(5/3) = 0.537914...
    assert got[2].item() == pytest.approx(0.5379143, abs=2e-6)
    # and the exact values, eps included, from the loop (float64 input is computed in float64)
    got64 = group_advantages(rewards.double(), 8, "ucpo", uncertain_reward=U)
    assert got64.dtype == torch.float64
    assert torch.allclose(got64, torch.tensor(_ucpo_loop(rewards.tolist(), 8, uncertain=U32), dtype=torch.float64),
                          rtol=1e-12, atol=1e-14)


def test_suppression_weight_scales_only_the_second_term():
    rewards = torch.tensor(HAND[0][0])
    # w = 0.5: gamma = 1/2 - 0.5 * 1/12 = 11/24
    got = group_advantages(rewards, 8, "ucpo", uncertain_reward=U, ucpo_suppression_weight=0.5)
    assert got[2].item() == pytest.approx(11 / 24 * math.sqrt(5 / 3), rel=4e-6)
    assert got[0].item() == pytest.approx(math.sqrt(5 / 3), rel=4e-6)  # the det responses do not move
    # w = 0: only the incentive term, P_w / (P_u + P_w) * (1 - P_u) = 1/2
    got = group_advantages(rewards, 8, "ucpo", uncertain_reward=U, ucpo_suppression_weight=0.0)
    assert got[6].item() == pytest.approx(0.5 * math.sqrt(5 / 3), rel=4e-6)


def test_non_ternary_groups_get_zero():
    groups = [[C, C, U, U, C, C, U, C],   # no wrong response
              [W, U, W, W, U, W, W, W],   # no correct response
              [U] * 8, [C] * 8, [W] * 8]
    rewards = torch.tensor([r for g in groups for r in g])
    got = group_advantages(rewards, 8, "ucpo", uncertain_reward=U)
    assert torch.equal(got, torch.zeros(40))
    keep = group_keep_mask(rewards, 8, "drop_non_ternary", uncertain_reward=U)
    assert keep.tolist() == [False] * 5


def test_filter_tells_uncertain_from_wrong():
    rewards = torch.tensor([C, U, U, U,   # correct and uncertain only: dropped
                            C, W, U, U,   # ternary: kept
                            C, W, W, W,   # binary mixed: kept
                            W, U, W, U])  # no correct: dropped
    assert group_keep_mask(rewards, 4, "drop_non_ternary", uncertain_reward=U).tolist() == [False, True, True, False]
    # without an uncertain reward every response short of R_max counts as wrong
    assert group_keep_mask(rewards, 4, "drop_non_ternary").tolist() == [True, True, True, False]


@pytest.mark.parametrize("g,n_groups,seed", [(8, 64, 0), (3, 50, 1), (5, 40, 2), (16, 24, 3)])
def test_without_uncertain_responses_ucpo_is_grpo_exactly(g, n_groups, seed):
    gen = torch.Generator().manual_seed(seed)
    rewards = (torch.rand(n_groups * g, generator=gen) < 0.4).float()  # uniform groups included
    ucpo = group_advantages(rewards, g, "ucpo", uncertain_reward=U)
    grpo = group_advantages(rewards, g, "grpo")
    assert torch.equal(ucpo, grpo)  # bit for bit
    assert bool((grpo != 0).any())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_random_ternary_batches_match_the_loop(dtype):
    gen = torch.Generator().manual_seed(7)
    rewards = torch.tensor([C, W, U])[torch.randint(0, 3, (80 * 8,), generator=gen)].to(dtype)
    got = group_advantages(rewards, 8, "ucpo", uncertain_reward=U, ucpo_suppression_weight=0.7)
    want = torch.tensor(_ucpo_loop(rewards.tolist(), 8, uncertain=U32, w=0.7),
                        dtype=torch.float64)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
    assert torch.allclose(got.double(), want, **tol)
    assert bool((want != 0).any()) and bool((want == 0).any())


def test_estimator_refuses_what_it_cannot_classify():
    rewards = torch.tensor([C, W, U, W])
    with pytest.raises(ValueError, match=r"needs group_size >= 3.*got 2"):
        group_advantages(rewards, 2, "ucpo", uncertain_reward=U)
    with pytest.raises(ValueError, match="needs uncertain_reward"):
        group_advantages(rewards, 4, "ucpo")
    for bad in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"uncertain_reward must lie strictly between 0 .* and max_reward"):
            group_advantages(rewards, 4, "ucpo", uncertain_reward=bad)
    with pytest.raises(ValueError, match="ucpo_suppression_weight must be >= 0"):
        group_advantages(rewards, 4, "ucpo", uncertain_reward=U, ucpo_suppression_weight=-1)


# ---------------------------------------------------------------- diagnostics

def test_diagnostics_per_class_and_gamma():
    # group 1: HAND[0] (2 c, 4 w, 2 u); group 2: 1 c, 1 w, 6 u; group 3: no wrong (non-ternary, 0)
    rewards = torch.tensor(HAND[0][0] + HAND[1][0] + [C, C, U, U, C, C, U, C])
    adv = group_advantages(rewards, 8, "ucpo", uncertain_reward=U)
    options = {"uncertain_reward": U}
    d = batch_diagnostics(rewards, 8, adv, estimator="ucpo", estimator_options=options)
    assert d["frac_uncertain"] == 11 / 24 and d["frac_correct_answers"] == 8 / 24
    assert d["frac_wrong_answers"] == 5 / 24
    assert d["frac_non_ternary"] == 1 / 3 and d["ucpo_gamma_groups"] == 2.0
    assert d["ucpo_gamma_mean"] == pytest.approx((5 / 12 - 19 / 56) / 2, abs=1e-6)
    # advantage mass per class: correct 2*sqrt(5/3) + 1/sqrt(2); wrong -4*sqrt(5/12) - 1/sqrt(2)
    # (= minus the correct mass: GRPO's sums over the det responses are 0); uncertain
    # 2 * 5/12 * sqrt(5/3) + 6 * (-19/56) / sqrt(2)
    assert d["adv_sum_correct"] == pytest.approx(2 * math.sqrt(5 / 3) + 1 / math.sqrt(2), rel=1e-5)
    assert d["adv_sum_wrong"] == pytest.approx(-d["adv_sum_correct"], rel=1e-5)
    # (two terms of ~1 cancel to -0.36: eps moves the sum by ~5e-6)
    assert d["adv_sum_uncertain"] == pytest.approx(2 * 5 / 12 * math.sqrt(5 / 3) - 6 * 19 / 56 / math.sqrt(2),
                                                   abs=2e-5)
    # the keys the existing diagnostics had are unchanged, and without options nothing is added
    plain = batch_diagnostics(rewards, 8, adv)
    assert set(plain) == {"frac_all_wrong", "frac_all_correct", "frac_mixed", "accuracy", "adv_sum_all_wrong",
                          "adv_sum_all_correct", "adv_sum_mixed"}
    assert all(d[k] == v for k, v in plain.items())
    # grpo_uc (OpenRLHF's group_norm: no estimator of ngrpo's) still gets the class metrics
    d = batch_diagnostics(rewards, 8, adv, estimator=None, estimator_options=options)
    assert "frac_uncertain" in d and "ucpo_gamma_mean" not in d


# ---------------------------------------------------------------- abstention check and prompt

@pytest.mark.parametrize("response,abstains", [
    ("so \\boxed{\\text{I don't know}}", True),
    ("\\boxed{I Don\u2019t Know.}", True),
    ("\\boxed{\\textbf{\\text{IDK}}}", True),
    ("\\boxed{\\text{I\\ am\\ not\\ sure}}", True),
    ("$\\boxed{\\text{ unknown }}$", True),
    ("\\boxed{I don't know} wait, \\boxed{5}", False),        # the final box is an answer
    ("\\boxed{5} hmm \\boxed{\\text{I don't know}}", True),
    ("\\boxed{I don't know why, but 5}", False),              # a phrase inside an answer is not one
    ("I don't know", False),                                  # not boxed
    ("\\boxed{\\text{I don't know}", False),                  # never closed
])
def test_abstention_is_the_final_boxed_answer(response, abstains):
    assert abstention.abstains(response) is abstains
    assert abstention.abstentions([response]) == [abstains]


def test_phrases_are_configurable():
    assert abstention.abstains("\\boxed{pass}", "pass|skip")
    assert not abstention.abstains("\\boxed{I don't know}", "pass|skip")
    with pytest.raises(ValueError, match="no abstention phrase"):
        abstention.split_phrases(" | ")


def test_the_prompt_offers_an_answer_that_counts_as_abstention():
    assert abstention.abstains(prompts.ABSTENTION_ANSWER)
    plain, offered = prompts.build_prompt("What is 2+2?"), prompts.build_prompt("What is 2+2?", abstention=True)
    assert plain == prompts.CHAT_PROMPT_TEMPLATE.format(question="What is 2+2?")  # the paper's, unchanged
    assert offered == plain.replace("\\boxed{}.<|im_end|>", "\\boxed{}. If you are not sure of the answer, put "
                                    "\\boxed{\\text{I don't know}} as your final answer instead.<|im_end|>")


def _patch_env(monkeypatch, **options):
    env = PatchConfig(estimator="ucpo", estimator_options=options).to_env()
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def test_reward_marks_abstentions_before_math_verify(monkeypatch):
    import pipelines.reward as reward

    graded = []

    def fake_grade_many(responses, golds, **kwargs):
        graded.extend(responses)
        from pipelines.datasets.grading import GradeResult

        return [GradeResult(r.endswith("{4}"), "x", False) for r in responses]

    monkeypatch.setattr(reward, "grade_many", fake_grade_many)
    queries = ["\\boxed{4}", "\\boxed{\\text{I don't know}}", "\\boxed{5}", "no box \\boxed{unknown}"]
    _patch_env(monkeypatch, uncertain_reward=0.5, abstention_phrases="I don't know")
    out = reward.math_verify_reward(queries, [""] * 4, ["4"] * 4)
    assert out["rewards"].tolist() == [1.0, 0.5, 0.0, 0.0]  # "unknown" is not among this run's phrases
    assert out["extra_logs"]["uncertain_frac"].tolist() == [0.0, 1.0, 0.0, 0.0]
    assert graded == ["\\boxed{4}", "\\boxed{5}", "no box \\boxed{unknown}"]  # the abstention never graded
    # without uncertain_reward the run has no abstention: everything is graded, 0/1 as before
    graded.clear()
    _patch_env(monkeypatch)
    out = reward.math_verify_reward(queries, [""] * 4, ["4"] * 4)
    assert out["rewards"].tolist() == [1.0, 0.0, 0.0, 0.0] and len(graded) == 4
    assert "uncertain_frac" not in out["extra_logs"]
    monkeypatch.delenv("NGRPO_PATCH_CONFIG")
    assert reward.abstention_settings() is None


# ---------------------------------------------------------------- evaluation metrics

def test_abstention_metrics_from_raw_counts():
    m = evaluation.abstention_metrics(correct=3, wrong=1, uncertain=4)
    assert m == {"correct": 3, "wrong": 1, "uncertain": 4, "accuracy": 3 / 8, "uncertainty_ratio": 4 / 8,
                 "paq": 3 / 4, "hallucination_rate": 1 / 8, "f1": 2 * (3 / 8) * (3 / 4) / (3 / 8 + 3 / 4)}
    assert m["f1"] == 0.5
    none_answered = evaluation.abstention_metrics(0, 0, 5)
    assert none_answered["paq"] is None and none_answered["f1"] is None and none_answered["uncertainty_ratio"] == 1
    assert evaluation.abstention_metrics(0, 4, 0)["f1"] == 0.0
    with pytest.raises(ValueError, match="wrong must be a count"):
        evaluation.abstention_metrics(1, -1, 0)


def test_summary_counts_classes_per_benchmark():
    def row(pid, k, correct, uncertain):
        return {"id": pid, "sample": k, "correct": correct, "uncertain": uncertain, "extracted": "1",
                "n_tokens": 10, "finish_reason": "stop"}

    rows = [row("a", 0, True, False), row("a", 1, False, True), row("b", 0, False, False), row("b", 1, False, True)]
    summary = evaluation.summarise_benchmark(rows, 2, abstention=True)
    a = summary["abstention"]
    assert (a["correct"], a["wrong"], a["uncertain"]) == (1, 1, 2)
    assert (a["accuracy"], a["paq"], a["hallucination_rate"]) == (0.25, 0.5, 0.25)
    assert "abstention" not in evaluation.summarise_benchmark(rows, 2)
    md = evaluation.summary_markdown({"settings": {"model": "m", "n": 2, "temperature": 0.6, "top_p": 0.95,
                                                   "max_new_tokens": 8, "seed": 0, "backend": "hf",
                                                   "abstention": True},
                                      "benchmarks": {"bench": summary}})
    assert "| bench | 4 | 1 | 1 | 2 | 25.00 | 50.00 | 50.00 | 25.00 | 33.33 |" in md


def test_eval_settings_key_is_unchanged_without_abstention():
    s = evaluation.EvalSettings(model="m")
    old = {"model": "m", "temperature": 0.6, "top_p": 0.95, "max_new_tokens": 4096, "seed": 0,
           "answer_extraction": "boxed",
           "prompt_template_sha": hashlib.sha256(prompts.CHAT_PROMPT_TEMPLATE.encode()).hexdigest()[:16]}
    assert s.key() == hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]
    a = evaluation.EvalSettings(model="m", abstention=True, abstention_phrases="idk")
    assert a.key() != s.key()
    assert a.prompt_template_sha == hashlib.sha256(prompts.ABSTENTION_PROMPT_TEMPLATE.encode()).hexdigest()[:16]


def test_eval_grades_only_non_abstentions(monkeypatch):
    import pipelines.datasets.grading as grading

    seen = []

    def fake_grade_many(responses, golds, **kwargs):
        seen.extend(responses)
        return [grading.GradeResult(True, "4", False) for _ in responses]

    monkeypatch.setattr(grading, "grade_many", fake_grade_many)
    settings = evaluation.EvalSettings(model="m", abstention=True, abstention_phrases="I don't know")
    results, uncertain = evaluation._grade_chunk(["\\boxed{4}", "\\boxed{I don't know}"], ["4", "4"], settings)
    assert uncertain == [False, True] and seen == ["\\boxed{4}"]
    assert [r.correct for r in results] == [True, False] and results[1].extracted == "I don't know"


def test_eval_cli_refuses_phrases_without_abstention(problems, tmp_path):
    from ngrpo_cli.main import cli

    result = CliRunner().invoke(cli, ["eval", "--model", str(tmp_path / "nope"), "--benchmarks", str(problems),
                                      "-o", str(tmp_path / "out"), "--abstention-phrases", "idk"])
    assert result.exit_code != 0 and "--abstention-phrases needs --abstention" in result.output


# ---------------------------------------------------------------- recipes

def test_recipes():
    ucpo, uc, grpo = build_recipe("ucpo"), build_recipe("grpo_uc"), build_recipe("grpo")
    assert (ucpo.estimator, ucpo.group_filter, ucpo.uncertain_reward) == ("ucpo", "drop_non_ternary", 0.2)
    assert (uc.estimator, uc.group_filter, uc.uncertain_reward) == ("group_norm", "none", 0.2)
    # both on GRPO's settings otherwise
    for r in (ucpo, uc):
        diff = {f.name for f in dataclasses.fields(r) if getattr(r, f.name) != getattr(grpo, f.name)}
        assert diff <= {"estimator", "group_filter", "uncertain_reward"}
    assert build_recipe("grpo_uc", overrides={"uncertain_reward": 0.5}).uncertain_reward == 0.5
    assert grpo.uncertain_reward is None  # no abstention unless asked


@pytest.mark.parametrize("overrides,flag,why", [
    ({"samples_per_prompt": 2}, "--samples-per-prompt 2", "needs at least 3 responses per prompt"),
    ({"overlong_buffer": 100}, "--overlong-buffer 100", "overlong shaping changes the reward"),
    ({"uncertain_reward": 1.0}, "--uncertain-reward 1.0", "strictly between 0"),
    ({"uncertain_reward": 0.0}, "--uncertain-reward 0.0", "strictly between 0"),
    ({"ucpo_suppression_weight": -0.5}, "--ucpo-suppression-weight -0.5", "must be >= 0"),
    ({"abstention_phrases": "|"}, "--abstention-phrases '|'", "at least one phrase"),
])
def test_recipe_errors_name_the_flag(overrides, flag, why):
    with pytest.raises(RecipeError) as err:
        build_recipe("ucpo", overrides=overrides)
    assert str(err.value).startswith(flag + ":") and why in str(err.value)


def test_ucpo_needs_an_uncertain_reward():
    with pytest.raises(RecipeError, match=r"^--uncertain-reward None: the ucpo estimator recognises"):
        dataclasses.replace(build_recipe("ucpo"), uncertain_reward=None).validate()


def test_train_dry_run_and_flags(tmp_path, tiny_model_dir):
    from ngrpo_cli.main import cli

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"id": str(i), "problem": f"{i}+1?", "answer": str(i + 1)}) + "\n"
                            for i in range(8)))
    base = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--device", "cpu", "--dry-run"]
    result = CliRunner().invoke(cli, base + ["--algo", "ucpo", "--uncertain-reward", "0.3",
                                             "--ucpo-suppression-weight", "0.5"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(cli, base + ["--algo", "ucpo", "--samples-per-prompt", "2"], catch_exceptions=False)
    assert result.exit_code != 0 and "--samples-per-prompt 2: the ucpo estimator needs at least 3" in result.output
    result = CliRunner().invoke(cli, base + ["--algo", "ucpo", "--overlong-buffer", "10"], catch_exceptions=False)
    assert result.exit_code != 0 and "--overlong-buffer 10" in result.output
    help_text = CliRunner().invoke(cli, ["train", "--help"]).output
    for flag in ("--uncertain-reward", "--ucpo-suppression-weight", "--abstention-phrases", "drop_non_ternary"):
        assert flag in help_text


# ---------------------------------------------------------------- one CPU training run

# Scripted: in each group of 4 the k-th response of a prompt gets correct, wrong, uncertain,
# uncertain (counted per prompt in the one rollout actor of a CPU run), whatever the tiny model wrote.
SCRIPTED_REWARD = '''
import threading, torch
_lock, _seen = threading.Lock(), {}
CLASSES = [1.0, 0.0, 0.2, 0.2]

def reward_func(queries, prompts, labels, **kwargs):
    out = []
    with _lock:
        for p in prompts:
            k = _seen.get(p, 0)
            _seen[p] = k + 1
            out.append(CLASSES[k % len(CLASSES)])
    rewards = torch.tensor(out)
    return {"rewards": rewards, "scores": rewards.clone(), "extra_logs": {}}
'''
# Each group [1, 0, 0.2, 0.2]: A+- = +-0.5 / (1/sqrt(2) + eps); P_r = P_w = 1/4, P_u = 1/2:
# gamma = (1/4)/(3/4)*(1/2) - (1/4)/(1/2)*(1/2) = -1/12; group sum = 2 * gamma * A+ = -sqrt(2)/12.
GROUP_SUM = 2 * (0.25 / (0.75 + EPS) * 0.5 - 0.25 / (0.5 + EPS) * 0.5) * 0.5 / (math.sqrt(0.5) + EPS)


@pytest.fixture(scope="module")
def ucpo_run(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("ucpo_run")
    data = root / "arith.jsonl"
    data.write_text("".join(json.dumps({"id": str(i), "problem": f"What is {i} + {i % 7}?", "answer": str(i + i % 7)})
                            + "\n" for i in range(64)))
    (root / "reward.py").write_text(SCRIPTED_REWARD)
    run = root / "run"
    cmd = [sys.executable, "-m", "ngrpo_cli.main", "train", "--model", str(tiny_model_dir), "--data", str(data),
           "--algo", "ucpo", "--output", str(run), "--reward-file", str(root / "reward.py"), "--device", "cpu",
           "--preset", "cpu-tiny", "--kl-mode", "none", "--max-steps", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return {"run": run, "metrics": [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]}


@pytest.mark.pipeline
def test_cpu_run_trains_on_the_decoupled_advantages(ucpo_run):
    metrics = ucpo_run["metrics"]
    assert [m["step"] for m in metrics] == [1, 2]
    from pipelines.launch.rundir import TRAIN_DATA

    prompt = json.loads((ucpo_run["run"] / TRAIN_DATA).read_text().splitlines()[0])["prompt"]
    assert prompts.ABSTENTION_SENTENCE in prompt  # the recipe's uncertain_reward offers abstention
    for m in metrics:
        # 4 ternary groups a step: every one kept, accuracy 1/4, and the advantage mass of the
        # batch is the uncertain responses' (GRPO's det sums are 0): 4 * (-sqrt(2)/12)
        assert m["ngrpo/frac_mixed"] == 1.0 and m["ngrpo/accuracy"] == 0.25, m
        assert m["ngrpo/adv_sum_mixed"] == pytest.approx(4 * GROUP_SUM, abs=1e-5)
        assert m["ngrpo/adv_sum_mixed"] == pytest.approx(-4 * math.sqrt(2) / 12, abs=2e-5)


@pytest.mark.pipeline
def test_cpu_run_logs_the_uncertain_share_and_gamma(ucpo_run):
    for m in ucpo_run["metrics"]:
        assert m["ngrpo/frac_uncertain"] == 0.5 and m["ngrpo/frac_non_ternary"] == 0.0
        assert m["ngrpo/ucpo_gamma_mean"] == pytest.approx(-1 / 12, abs=1e-6)
        assert m["ngrpo/adv_sum_uncertain"] == pytest.approx(4 * GROUP_SUM, abs=1e-5)
