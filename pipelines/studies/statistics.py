"""Intervals over seeds and questions, and how many seeds a difference needs (study.md).

A study's number for an algorithm is an average over two random things: the training seed and the
held-out questions. `bootstrap` resamples both (seeds with replacement, then questions with
replacement, the same questions for every seed of a replicate) and gives the percentile interval
of the mean accuracy. `paired_bootstrap` does it for the difference of two algorithms: the same
seed draw and the same question draw on both sides, so what the seeds and questions share cancels.

`seeds_needed`: from the observed spread of the seed-by-seed differences (standard deviation s,
n - 1), the seeds for which the 95 % interval of the mean difference, 1.96 * s / sqrt(n), is
narrower than the difference itself (normal approximation; with a few seeds Student's t makes the
true need somewhat larger). With one seed there is no spread, and no answer.
"""
import math
from typing import Dict, Hashable, List, Optional, Tuple

import numpy as np

Z95 = 1.96
DRAWS = 2000


def per_question(sample_rows) -> Dict[Tuple[str, str], float]:
    """{(benchmark, question id): share of correct samples} of an eval's samples.jsonl rows."""
    counts: Dict[Tuple[str, str], List[int]] = {}
    for r in sample_rows:
        c = counts.setdefault((str(r["benchmark"]), str(r["id"])), [0, 0])
        c[0] += bool(r["correct"])
        c[1] += 1
    return {k: c / n for k, (c, n) in counts.items()}


def _matrix(per_seed: Dict[Hashable, Dict[Hashable, float]], seeds: List, questions: List) -> np.ndarray:
    return np.array([[per_seed[s][q] for q in questions] for s in seeds], dtype=np.float64)


def _interval(values: np.ndarray) -> List[float]:
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def _draw(matrix: np.ndarray, draws: int, rng: np.random.Generator) -> np.ndarray:
    """The mean of MATRIX (seeds x questions) under DRAWS resamplings of its rows and columns."""
    seeds, questions = matrix.shape
    rows = rng.integers(0, seeds, size=(draws, seeds))
    cols = rng.integers(0, questions, size=(draws, questions))
    return matrix[rows[:, :, None], cols[:, None, :]].mean(axis=(1, 2))


def common_questions(*per_seeds: Dict[Hashable, Dict[Hashable, float]]) -> List:
    """The questions every run of every side was evaluated on, sorted."""
    sets = [set(qs) for per_seed in per_seeds for qs in per_seed.values()]
    return sorted(set.intersection(*sets)) if sets else []


def bootstrap(per_seed: Dict[Hashable, Dict[Hashable, float]], draws: int = DRAWS, seed: int = 0) -> Optional[dict]:
    """Mean accuracy (in %) over seeds and questions with its 95 % interval over both."""
    seeds, questions = sorted(per_seed), common_questions(per_seed)
    if not seeds or not questions:
        return None
    matrix = 100.0 * _matrix(per_seed, seeds, questions)
    means = _draw(matrix, draws, np.random.default_rng(seed))
    return {"mean": float(matrix.mean()), "ci95": _interval(means), "seeds": len(seeds), "questions": len(questions)}


def paired_bootstrap(a: Dict[Hashable, Dict[Hashable, float]], b: Dict[Hashable, Dict[Hashable, float]],
                     draws: int = DRAWS, seed: int = 0) -> Optional[dict]:
    """A - B (in points) over the seeds both have, with its 95 % interval over seeds and questions,
    the seed-by-seed differences, and the seeds needed to resolve it and to resolve 2 points."""
    seeds = sorted(set(a) & set(b))
    questions = common_questions({s: a[s] for s in seeds}, {s: b[s] for s in seeds})
    if not seeds or not questions:
        return None
    diff = 100.0 * (_matrix(a, seeds, questions) - _matrix(b, seeds, questions))
    means = _draw(diff, draws, np.random.default_rng(seed))
    by_seed = [float(v) for v in diff.mean(axis=1)]
    mean = float(diff.mean())
    return {"mean": mean, "ci95": _interval(means), "by_seed": by_seed, "seeds": len(seeds),
            "questions": len(questions), "seeds_needed": seeds_needed(by_seed, mean),
            "seeds_needed_2pt": seeds_needed(by_seed, 2.0)}


def seeds_needed(by_seed: List[float], delta: float, z: float = Z95) -> Optional[int]:
    """Seeds for which z * s / sqrt(n) < |DELTA|, s the spread of BY_SEED (n - 1); None with one seed
    or no difference to resolve."""
    if len(by_seed) < 2 or delta == 0:
        return None
    mean = sum(by_seed) / len(by_seed)
    spread = math.sqrt(sum((v - mean) ** 2 for v in by_seed) / (len(by_seed) - 1))
    if spread == 0:
        return 2
    return max(2, math.floor((z * spread / abs(delta)) ** 2) + 1)
