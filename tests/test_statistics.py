"""Intervals over seeds and questions, and the seeds a difference needs (pipelines/studies/statistics.py)."""
import numpy as np
import pytest

from pipelines.studies import statistics
from pipelines.studies.study_report import bootstrap_lines


def test_per_question_is_the_share_of_correct_samples():
    rows = [{"benchmark": "b", "id": 1, "correct": True}, {"benchmark": "b", "id": 1, "correct": False},
            {"benchmark": "b", "id": 2, "correct": False}, {"benchmark": "c", "id": 1, "correct": True}]
    assert statistics.per_question(rows) == {("b", "1"): 0.5, ("b", "2"): 0.0, ("c", "1"): 1.0}


@pytest.mark.parametrize("by_seed, delta, expected", [
    ([1.0, 3.0], 2.0, 2),    # s = sqrt(2): (1.96 * 1.4142 / 2)^2 = 1.92 -> 2
    ([1.0, 3.0], 0.5, 31),   # (1.96 * 1.4142 / 0.5)^2 = 30.73 -> 31
    ([0.0, 4.0, 8.0], 1.0, 62),  # s = 4: (1.96 * 4)^2 = 61.47 -> 62
    ([2.0, 2.0], 1.0, 2),    # no spread: the fewest seeds that show one
    ([5.0], 1.0, None),      # one seed: no spread measured
    ([1.0, 3.0], 0.0, None),
])
def test_seeds_needed_by_hand(by_seed, delta, expected):
    assert statistics.seeds_needed(by_seed, delta) == expected


def _loop_bootstrap(matrix, draws, seed):
    """The resampling written as a plain loop, with the generator's draws in the same order."""
    rng = np.random.default_rng(seed)
    seeds, questions = matrix.shape
    rows = rng.integers(0, seeds, size=(draws, seeds))
    cols = rng.integers(0, questions, size=(draws, questions))
    out = []
    for d in range(draws):
        total = 0.0
        for i in rows[d]:
            for j in cols[d]:
                total += matrix[i, j]
        out.append(total / (seeds * questions))
    return np.array(out)


def test_the_vectorised_draw_equals_a_loop_and_resamples_both_seeds_and_questions():
    rng = np.random.default_rng(1)
    matrix = rng.random((3, 7))
    got = statistics._draw(matrix, 50, np.random.default_rng(0))
    assert np.allclose(got, _loop_bootstrap(matrix, 50, 0), rtol=0, atol=1e-12)
    # seeds alike, questions not: the interval comes from the questions alone, and vice versa
    same_seeds = np.tile(matrix[:1], (3, 1))
    assert statistics._draw(same_seeds, 200, np.random.default_rng(0)).std() > 0
    same_questions = np.tile(matrix[:, :1], (1, 7))
    assert statistics._draw(same_questions, 200, np.random.default_rng(0)).std() > 0
    assert statistics._draw(np.full((3, 7), 0.25), 200, np.random.default_rng(0)).tolist() == [0.25] * 200


def test_a_paired_difference_cancels_what_the_two_sides_share():
    questions = {("b", str(q)): q / 10 for q in range(10)}
    base = {0: questions, 1: {k: v / 2 for k, v in questions.items()}, 2: {k: v / 3 for k, v in questions.items()}}
    better = {s: {k: v + 0.1 for k, v in qs.items()} for s, qs in base.items()}
    paired = statistics.paired_bootstrap(better, base)
    assert paired["mean"] == pytest.approx(10.0) and paired["ci95"] == pytest.approx([10.0, 10.0])
    assert paired["by_seed"] == pytest.approx([10.0, 10.0, 10.0]) and paired["seeds_needed"] == 2
    alone = statistics.bootstrap(better)
    assert alone["ci95"][1] - alone["ci95"][0] > 10  # unpaired, the seeds' and questions' spread remains
    assert (alone["seeds"], alone["questions"]) == (3, 10)


def test_only_shared_seeds_and_questions_are_compared():
    a = {0: {"q1": 1.0, "q2": 0.0}, 1: {"q1": 1.0, "q2": 1.0}, 5: {"q1": 0.0, "q2": 0.0}}
    b = {0: {"q1": 0.0, "q2": 0.0, "q3": 1.0}, 1: {"q1": 0.0, "q2": 1.0}}
    paired = statistics.paired_bootstrap(a, b)
    assert (paired["seeds"], paired["questions"]) == (2, 2)
    assert paired["by_seed"] == [50.0, 50.0] and paired["mean"] == 50.0
    assert statistics.paired_bootstrap(a, {}) is None and statistics.bootstrap({}) is None


def test_study_md_states_the_intervals_and_the_seeds_needed():
    results = {"bootstrap": {"test": {
        "algos": {"ngrpo": {"mean": 41.25, "ci95": [38.0, 44.5], "seeds": 3, "questions": 200}},
        "paired": {"grpo": {"mean": 1.5, "ci95": [-1.25, 4.0], "by_seed": [0.5, 1.0, 3.0], "seeds": 3,
                            "questions": 200, "seeds_needed": 6, "seeds_needed_2pt": 4}}}}}
    lines = bootstrap_lines(results)
    assert "| ngrpo | 41.2 [38.0, 44.5] | 3 | 200 |" in lines
    assert "| ngrpo - grpo | +1.5 [-1.2, +4.0] | +0.5, +1.0, +3.0 | 6 | 4 |" in lines
