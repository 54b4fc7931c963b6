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
    "study": {1: 0.5, 2: 0.5},
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


# Draws in a row that find only questions already drawn before repeats are allowed: the split's
# unseen questions are then about used up (a level's split holds thousands).
MAX_SEEN_IN_A_ROW = 200


def _draw(level_id: int, n: int, split: str, rng: random.Random, seen: set) -> List[dict]:
    """N problems of one level; SEEN (shared by the levels of a mix: a + b is in levels 1 and 2)
    keeps them distinct until the split's unseen questions run out."""
    level = LEVELS[level_id]
    out, seen_in_a_row = [], 0
    while len(out) < n:
        expr = _expression(level, rng)
        if split_of(expr) != split:
            continue
        if expr in seen and seen_in_a_row < MAX_SEEN_IN_A_ROW:
            seen_in_a_row += 1
            continue
        seen_in_a_row = 0
        seen.add(expr)
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


def _digits(n: int, width: int) -> List[int]:
    return [(n // 10 ** i) % 10 for i in range(width)]  # units first


def _column_add(p: int, q: int) -> str:
    """Column addition of two non-negative numbers, units first, the carry written out:
    "7 + 5 = 12, 3 + 8 + 1 = 12, so 37 + 85 = 122"."""
    width = max(len(str(p)), len(str(q)))
    steps, carry = [], 0
    for a, b in zip(_digits(p, width), _digits(q, width)):
        total = a + b + carry
        steps.append(f"{a} + {b}" + (" + 1" if carry else "") + f" = {total}")
        carry = total // 10
    return f"{', '.join(steps)}, so {p} + {q} = {p + q}"


def _column_subtract(p: int, q: int) -> str:
    """Column subtraction p - q for p >= q >= 0, units first, a borrow written as "1x - 1":
    "15 - 7 = 8, 8 - 1 - 3 = 4, so 85 - 37 = 48"."""
    steps, borrow = [], 0
    for a, b in zip(_digits(p, len(str(p))), _digits(q, len(str(p)))):
        top = f"{a}" + (" - 1" if borrow else "")
        borrow = 1 if a - borrow < b else 0
        top = f"1{top}" if borrow else top
        steps.append(f"{top} - {b} = {a + 10 * borrow - (1 if top.endswith(' - 1') else 0) - b}")
    return f"{', '.join(steps)}, so {p} - {q} = {p - q}"


def _step(x: int, op: str, y: int) -> str:
    """One operation of a left-to-right evaluation, worked in columns (y >= 0)."""
    if op == "+" and x >= 0:
        return _column_add(x, y)
    if op == "-" and x >= y:
        return _column_subtract(x, y)
    if op == "-" and x >= 0:  # x < y
        return f"{x} - {y} = -({y} - {x}): {_column_subtract(y, x)}, so {x} - {y} = {x - y}"
    if op == "+":  # x < 0
        if y >= -x:
            return f"{x} + {y} = {y} - {-x}: {_column_subtract(y, -x)}"
        return f"{x} + {y} = -({-x} - {y}): {_column_subtract(-x, y)}, so {x} + {y} = {x + y}"
    return f"{x} - {y} = -({-x} + {y}): {_column_add(-x, y)}, so {x} - {y} = {x - y}"  # x < 0


# Tokens a worked solution of the study mix may take: the longest is 87 tokens of the tiny model's
# tokenizer (median 44). The CPU preset's response budget and the warm-up's own evaluation use it,
# so neither cuts a right answer off before its box.
WORKED_SOLUTION_TOKENS = 96


def solution_text(expression: str, answer: str) -> str:
    """The worked answer the warm-up teaches, then the boxed answer. Sums and differences are
    worked digit by digit in columns, left to right, each step a one-digit fact, so what is learned
    carries over to questions never seen; an expression with * gets one line."""
    tokens = expression.split()
    if "*" in tokens:
        return f"{expression} = {answer}. The answer is \\boxed{{{answer}}}."
    value, steps = int(tokens[0]), []
    for op, operand in zip(tokens[1::2], tokens[2::2]):
        steps.append(_step(value, op, int(operand)))
        value = value + int(operand) if op == "+" else value - int(operand)
    if str(value) != str(answer):
        raise ValueError(f"worked {expression} = {value}, but the answer is {answer}")
    return f"{'. '.join(steps)}. The answer is \\boxed{{{answer}}}."
