"""pipelines/datasets/arith.py: levels of >= 10,000 distinct questions, and splits disjoint by question."""
import itertools

import pytest

from pipelines.datasets import arith


def _all_expressions(level: arith.Level):
    """Every expression of a level (only for the small ones: up to 20,000)."""
    for nums in itertools.product(range(level.high + 1), repeat=level.operands):
        for ops in itertools.product(level.ops, repeat=level.operands - 1):
            expr = str(nums[0])
            for op, x in zip(ops, nums[1:]):
                expr += f" {op} {x}"
            yield expr


@pytest.mark.parametrize("level_id", sorted(arith.LEVELS))
def test_every_level_has_at_least_10000_questions(level_id):
    assert arith.LEVELS[level_id].size >= 10_000


@pytest.mark.parametrize("level_id", [1, 2, 3])
def test_the_splits_partition_a_whole_level(level_id):
    """Over every question of the level: each has exactly one split, and every split is non-empty."""
    expressions = list(_all_expressions(arith.LEVELS[level_id]))
    assert len(set(expressions)) == arith.LEVELS[level_id].size
    by_split = {name: {e for e in expressions if arith.split_of(e) == name} for name in arith.SPLITS}
    assert sum(len(v) for v in by_split.values()) == len(expressions)
    for a, b in itertools.combinations(by_split.values(), 2):
        assert not a & b
    for name, (lo, hi) in arith.SPLITS.items():  # the hash spreads questions as the buckets say (+-3 points)
        assert abs(len(by_split[name]) / len(expressions) - (hi - lo) / 100) < 0.03, name


@pytest.mark.parametrize("mix", sorted(arith.MIXES))
def test_generated_train_warmup_and_test_sets_share_no_question(mix):
    """Large draws as a study makes them (RL train, warm-up, evaluation), compared whole."""
    sizes = {"train": 20000, "warmup": 3000, "test": 1000}
    sets = {split: {p["expression"] for p in arith.problems(sizes[split], mix=mix, split=split, seed=seed)}
            for split, seed in (("train", 0), ("warmup", 1), ("test", 2))}
    for a, b in itertools.combinations(sets, 2):
        assert not sets[a] & sets[b], (a, b)
    assert len(sets["test"]) == 1000  # an evaluation set has distinct questions


def test_draws_are_seeded_and_answers_exact():
    a = arith.problems(50, level=5, split="train", seed=1)
    assert a == arith.problems(50, level=5, split="train", seed=1)
    assert a != arith.problems(50, level=5, split="train", seed=2)
    for p in a:
        x, op1, y, op2, z = p["expression"].split()
        assert {op1, op2} <= set("+-*") and max(int(x), int(y), int(z)) < 100
        assert int(p["answer"]) == eval(p["expression"])
        assert arith.split_of(p["expression"]) == "train"


def test_mix_shares():
    rows = arith.problems(1000, mix="study", split="train", seed=0)
    counts = {lv: sum(1 for r in rows if r["level"] == lv) for lv in arith.MIXES["study"]}
    assert counts == {lv: round(1000 * share) for lv, share in arith.MIXES["study"].items()}
    assert [r["id"] for r in rows] == [str(i) for i in range(1000)]


@pytest.mark.parametrize("expression, text", [
    ("37 + 85", "7 + 5 = 12, 3 + 8 + 1 = 12, so 37 + 85 = 122. The answer is \\boxed{122}."),
    ("85 - 37", "15 - 7 = 8, 8 - 1 - 3 = 4, so 85 - 37 = 48. The answer is \\boxed{48}."),
    ("37 - 85", "37 - 85 = -(85 - 37): 15 - 7 = 8, 8 - 1 - 3 = 4, so 85 - 37 = 48, so 37 - 85 = -48. "
                "The answer is \\boxed{-48}."),
    ("7 + 85", "7 + 5 = 12, 0 + 8 + 1 = 9, so 7 + 85 = 92. The answer is \\boxed{92}."),
    ("5 - 90 + 99", "5 - 90 = -(90 - 5): 10 - 5 = 5, 9 - 1 - 0 = 8, so 90 - 5 = 85, so 5 - 90 = -85. "
                    "-85 + 99 = 99 - 85: 9 - 5 = 4, 9 - 8 = 1, so 99 - 85 = 14. The answer is \\boxed{14}."),
])
def test_worked_solutions(expression, text):
    assert arith.solution_text(expression, str(eval(expression))) == text


def test_every_written_step_is_right():
    """Each 'a + b (+ 1) = c' and 'a (- 1) - b = c' a worked solution writes is true arithmetic."""
    import re

    step = re.compile(r"(-?\d+(?: [+-] -?\d+)+) = (-?\d+)(?=[,.:]| so)")
    checked = 0
    for p in arith.problems(3000, mix="study", split="warmup", seed=4):
        text = arith.solution_text(p["expression"], p["answer"])
        for lhs, rhs in step.findall(text.replace("-(", "(")):
            if "(" not in lhs:
                assert eval(lhs) == int(rhs), (p["expression"], lhs, rhs, text)
                checked += 1
    assert checked > 9_000  # about three written steps per problem
