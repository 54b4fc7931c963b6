"""Synthetic arithmetic problems for CPU runs: levels, question-disjoint splits, worked answers.

A question is an expression such as `37 + 85`. Its split (warmup, train or test) is a fixed
function of the expression (a SHA-256 bucket), so a test question is never seen in warm-up or RL
training, whatever the seeds and counts of the draws. Every level has at least 10,000 distinct
expressions; a draw is distinct within itself until its split of the level is used up.

`synthetic:arith?n=2000&level=1&split=train&seed=0` (or `mix=NAME` instead of `level`) is the
prepare-data SOURCE for these problems.
"""
import dataclasses
import hashlib
import random
from typing import Dict, List, Optional

SPLITS = {"train": (0, 70), "warmup": (70, 85), "test": (85, 100)}  # percent buckets of the expression's hash
TEMPLATES = ("What is {e}?", "Compute {e}.", "Evaluate {e}.", "Calculate the value of {e}.")


@dataclasses.dataclass(frozen=True)
class Level:
    about: str
    operands: int
    ops: str      # operators drawn between the operands (usual precedence)
    high: int     # operands are drawn from 0..high

    @property
    def size(self) -> int:
        """Distinct expressions of the level."""
        return (self.high + 1) ** self.operands * len(self.ops) ** (self.operands - 1)


LEVELS = {
    1: Level("two-digit sums: a + b", 2, "+", 99),
    2: Level("two-digit sums and differences: a + b, a - b", 2, "+-", 99),
    3: Level("two-digit products: a * b", 2, "*", 99),
    4: Level("three two-digit terms: a + b - c", 3, "+-", 99),
    5: Level("three two-digit terms with +, - and * (usual precedence)", 3, "+-*", 99),
}
# Named mixtures of levels: {level: share of the problems}.
MIXES = {
    "study": {1: 0.5, 2: 0.3, 4: 0.2},
}


def split_of(expression: str) -> str:
    bucket = int.from_bytes(hashlib.sha256(expression.encode()).digest()[:4], "little") % 100
    return next(name for name, (lo, hi) in SPLITS.items() if lo <= bucket < hi)


def _expression(level: Level, rng: random.Random) -> str:
    nums = [rng.randint(0, level.high) for _ in range(level.operands)]
    expr = str(nums[0])
    for x in nums[1:]:
        expr += f" {rng.choice(level.ops)} {x}"
    return expr


def _draw(level_id: int, n: int, split: str, rng: random.Random, seen: set) -> List[dict]:
    """N problems of one level; SEEN (shared by the levels of a mix: a + b is in levels 1 and 2)
    keeps them distinct while the split of the level has room."""
    level = LEVELS[level_id]
    capacity = level.size * (SPLITS[split][1] - SPLITS[split][0]) // 100  # about; the hash decides exactly
    out, own = [], 0
    while len(out) < n:
        expr = _expression(level, rng)
        if split_of(expr) != split:
            continue
        if expr in seen and own < 0.9 * capacity:
            continue
        seen.add(expr)
        own += 1
        value = eval(expr, {"__builtins__": {}}, {})  # noqa: S307 - digits and + - * only
        out.append({"problem": rng.choice(TEMPLATES).format(e=expr), "answer": str(value), "level": level_id,
                    "expression": expr})
    return out


def problems(n: int, *, level: Optional[int] = None, mix: Optional[str] = None, split: str = "train",
             seed: int = 0) -> List[dict]:
    """N problems of one LEVEL or of a named MIX of levels, from SPLIT, in a seeded random order.
    Each has problem, answer, level, expression and an id unique within the draw."""
    if (level is None) == (mix is None):
        raise ValueError("give exactly one of level and mix")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if level is not None and level not in LEVELS:
        raise ValueError(f"unknown level {level}; choose one of {', '.join(map(str, LEVELS))}")
    if mix is not None and mix not in MIXES:
        raise ValueError(f"unknown mix {mix!r}; choose one of {', '.join(MIXES)}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    shares: Dict[int, float] = {level: 1.0} if level is not None else MIXES[mix]
    rng = random.Random(f"arith/{split}/{level or mix}/{seed}")
    counts = {lv: int(round(n * share)) for lv, share in shares.items()}
    counts[max(shares, key=shares.get)] += n - sum(counts.values())
    seen: set = set()
    rows = [row for lv, count in counts.items() if count > 0 for row in _draw(lv, count, split, rng, seen)]
    rng.shuffle(rows)
    for i, row in enumerate(rows):
        row["id"] = str(i)
    return rows


def solution_text(expression: str, answer: str) -> str:
    """One line of work, then the boxed answer: "37 + 85 = 122. The answer is \\boxed{122}."."""
    return f"{expression} = {answer}. The answer is \\boxed{{{answer}}}."
