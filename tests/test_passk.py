"""pass@k, maj@n and the per-benchmark summary of `ngrpo eval`."""
import itertools
import math
from fractions import Fraction

import pytest

from pipelines.evaluate.evaluation import ks_for, majority_vote, pass_at_k, summarise_benchmark


def brute_force_pass_at_k(outcomes, k):
    """Share of the k-subsets of the samples that contain at least one correct sample."""
    subsets = list(itertools.combinations(range(len(outcomes)), k))
    hit = sum(1 for s in subsets if any(outcomes[i] for i in s))
    return Fraction(hit, len(subsets))


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_matches_enumeration_of_all_k_subsets(n):
    for c in range(n + 1):
        outcomes = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            exact = brute_force_pass_at_k(outcomes, k)
            assert pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-12), (n, c, k)
            # and the closed form 1 - C(n-c, k)/C(n, k)
            assert float(exact) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)


def test_pass_at_k_known_values():
    assert pass_at_k(16, 0, 1) == 0.0
    assert pass_at_k(16, 16, 16) == 1.0
    assert pass_at_k(16, 4, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    assert pass_at_k(8, 2, 4) == pytest.approx(1 - 15 / 70)
    # large n stays finite and exact enough (no factorial overflow)
    assert pass_at_k(1024, 1, 1) == pytest.approx(1 / 1024)
    assert pass_at_k(4096, 2, 2048) == pytest.approx(1 - (2048 * 2047) / (4096 * 4095))


@pytest.mark.parametrize("n,c,k", [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)])
def test_pass_at_k_rejects_bad_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_ks_for():
    assert ks_for(1) == [1]
    assert ks_for(2) == [1, 2]
    assert ks_for(16) == [1, 2, 4, 8, 16]
    assert ks_for(6) == [1, 2, 4, 6]


def test_majority_vote():
    # string-normalised and math-verify-equivalent wrong answers are pooled: 0.5 (x2) + 1/2 beats 3 (x2)
    answers = ["3", "0.5", "3", r"\frac{1}{2}", "0.5", None]
    correct = [True, False, True, False, False, False]
    assert majority_vote(answers, correct) == 1
    # the correct group wins when it is largest
    assert majority_vote(["7", "7", "8", None], [True, True, False, False]) == 0
    # ties go to the group seen first
    assert majority_vote(["8", "7"], [False, True]) == 0
    assert majority_vote(["7", "8"], [True, False]) == 0
    assert majority_vote([None, None], [False, False]) is None


def _rows(pid, outcomes, extracted=None, tokens=10):
    extracted = extracted or [("7" if ok else "8") for ok in outcomes]
    return [{"id": pid, "sample": i, "correct": ok, "extracted": e, "n_tokens": tokens,
             "finish_reason": "stop", "timed_out": False} for i, (ok, e) in enumerate(zip(outcomes, extracted))]


def test_summarise_benchmark_exact_values():
    rows = (_rows("a", [True, False, False, False])  # c=1
            + _rows("b", [True, True, True, False], tokens=20)  # c=3
            + _rows("c", [False] * 4, extracted=[None, None, "8", "9"]))  # c=0
    m = summarise_benchmark(rows, 4)
    assert m["problems"] == 3 and m["n"] == 4 and m["samples"] == 12
    assert m["avg@4"] == pytest.approx((0.25 + 0.75 + 0) / 3)
    assert m["pass@1"] == pytest.approx(m["avg@4"])
    assert m["pass@2"] == pytest.approx((0.5 + 1.0 + 0) / 3)
    assert m["pass@4"] == pytest.approx(2 / 3)
    assert m["maj@4"] == pytest.approx(1 / 3)  # only b's majority is right
    assert m["mean_response_tokens"] == pytest.approx((4 * 10 + 4 * 20 + 4 * 10) / 12)
    assert m["no_boxed_frac"] == pytest.approx(2 / 12)
    assert m["grader_timeouts"] == 0
