"""Recompute the G = 8 advantage table of docs/ALGORITHM.md §2 in float32.

Standalone (numpy only; it does not import ngrpo). For every k = 0..8 correct responses out
of G = 8 with binary rewards it computes

  * GRPO:  A = (r - mean(r)) / (std(r) + eps) over the G real rewards,
  * NGRPO: the same with K = 1 virtual reward R_max = 1 appended before mean and std,

with the Bessel-corrected (N - 1) standard deviation and eps = 1e-6, all in float32 as the
authors' torch code does. It prints the table, checks the closed forms and the "NGRPO on G
equals GRPO on G + 1" identity, and compares against the values quoted in the project's
reference specification (rounded to 4 decimals).

    python docs/advantage_table.py
"""
import math

import numpy as np

G, K, R_MAX, EPS = 8, 1, 1.0, 1e-6
f32 = np.float32


def normalise(values, extra=()):
    """(r - mean) / (std + eps) for every real value, statistics over values + extra, float32."""
    real = np.asarray(values, dtype=f32)
    pool = np.concatenate([real, np.asarray(extra, dtype=f32)])
    mean = pool.mean(dtype=f32)
    std = pool.std(ddof=1, dtype=f32)
    return (real - mean) / (std + f32(EPS))


def row(k, g=G, extra=()):
    r = [1.0] * k + [0.0] * (g - k)
    a = normalise(r, extra)
    a_pos = float(a[0]) if k > 0 else None
    a_neg = float(a[-1]) if k < g else None
    return a_pos, a_neg


# Values as quoted in the reference specification's table (k: GRPO A+, GRPO A-, NGRPO A+, NGRPO A-).
SPEC_TABLE = {
    0: (None, 0.0, None, -0.3333),
    1: (2.4749, -0.3536, 1.7638, -0.5040),
    2: (1.6202, -0.5401, 1.3333, -0.6667),
    3: (1.2076, -0.7246, 1.0541, -0.8433),
    4: (0.9354, -0.9354, 0.8433, -1.0541),
    5: (0.7246, -1.2076, 0.6667, -1.3333),
    6: (0.5401, -1.6202, 0.5040, -1.7638),
    7: (0.3536, -2.4749, 0.3333, -2.6667),
    8: (0.0, None, 0.0, None),
}


def fmt(x):
    return "–" if x is None else f"{x:.4f}"


def main():
    problems = []
    print("| k | GRPO A+ | GRPO A− | NGRPO A+ | NGRPO A− |")
    print("|---|---|---|---|---|")
    for k in range(G + 1):
        gp, gn = row(k)
        np_, nn = row(k, extra=[R_MAX] * K)
        print(f"| {k} | {fmt(gp)} | {fmt(gn)} | {fmt(np_)} | {fmt(nn)} |")

        # Compare with the specification's table at its 4-decimal precision.
        for name, mine, theirs in zip(("GRPO A+", "GRPO A-", "NGRPO A+", "NGRPO A-"), (gp, gn, np_, nn), SPEC_TABLE[k]):
            if (mine is None) != (theirs is None):
                problems.append(f"k={k} {name}: defined here {mine}, spec {theirs}")
            elif mine is not None and round(mine, 4) != theirs and abs(mine - theirs) > 5e-5:
                problems.append(f"k={k} {name}: computed {mine:.6f}, spec {theirs}")

        # Closed forms for NGRPO (exact arithmetic; eps shifts the 5th decimal at most).
        if 0 < k < G:
            cf_pos = math.sqrt(G * (G - k) / ((G + 1) * (k + 1)))
            assert abs(np_ - cf_pos) < 1e-5, (k, np_, cf_pos)
        if k < G:
            cf_neg = -math.sqrt(G * (k + 1) / ((G + 1) * (G - k)))
            assert abs(nn - cf_neg) < 1e-5, (k, nn, cf_neg)

        # NGRPO(k of G) == GRPO(k+1 of G+1) restricted to the G real responses.
        if k < G:
            gp1, gn1 = row(k + 1, g=G + 1)
            if k > 0:
                assert abs(np_ - gp1) < 1e-6, (k, np_, gp1)
            assert abs(nn - gn1) < 1e-6, (k, nn, gn1)

        # Net push of a group: sum of advantages (GRPO: 0; NGRPO: negative for k < G).
        s = normalise([1.0] * k + [0.0] * (G - k), [R_MAX] * K).sum()
        if k < G:
            assert s < 0, (k, s)

    print()
    print("closed forms and the G+1 identity: OK")
    if problems:
        print("differences from the specification's table:")
        for p in problems:
            print("  ", p)
    else:
        print("specification's table: every value matches to 4 decimals")


if __name__ == "__main__":
    main()
