"""Vectorised NGRPO advantages vs the per-sample Python loop of the authors' verl code.

One training step of the docs/ALGORITHM.md §5 recipe: 1024 prompts x 8 samples, binary rewards. The
reference (openrlhf_patch.reference) builds a dict of groups keyed by prompt index and loops
over samples, as verl 0.2 does; openrlhf_patch.algorithms.group_advantages does one reshape
and a few reductions. Both run on CPU with torch.set_num_threads(1), so the comparison
measures the algorithm, not how many cores the machine happens to have free.

    .venv/bin/python benchmarks/advantages.py
"""
import statistics
import time

import torch

from openrlhf_patch.algorithms import group_advantages
from openrlhf_patch.reference import reference_group_advantages

N_PROMPTS, GROUP_SIZE = 1024, 8
GOAL_SPEEDUP = 100.0
GOAL_VECTORISED_MS = 1.0


def median_ms(fn, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    rewards = (torch.rand(N_PROMPTS * GROUP_SIZE, generator=gen) < 0.3).float()

    fast = group_advantages(rewards, GROUP_SIZE, "ngrpo")
    slow = reference_group_advantages(rewards, GROUP_SIZE, "ngrpo")
    max_diff = (fast - slow).abs().max().item()

    vec_ms = median_ms(lambda: group_advantages(rewards, GROUP_SIZE, "ngrpo"), repeats=200, warmup=20)
    ref_ms = median_ms(lambda: reference_group_advantages(rewards, GROUP_SIZE, "ngrpo"), repeats=5, warmup=1)
    speedup = ref_ms / vec_ms

    print(f"ngrpo advantages, {N_PROMPTS} prompts x {GROUP_SIZE} samples, binary rewards, CPU, torch threads = 1")
    print(f"  vectorised (group_advantages):      {vec_ms:10.4f} ms  (median of 200, after 20 warm-up)")
    print(f"  per-sample loop (reference.py):     {ref_ms:10.4f} ms  (median of 5, after 1 warm-up)")
    print(f"  speed-up:                           {speedup:10.1f} x")
    print(f"  max |vectorised - reference|:       {max_diff:10.2e}")
    print(f"{'PASS' if speedup >= GOAL_SPEEDUP else 'FAIL'}: vectorised >= {GOAL_SPEEDUP:.0f}x faster than the loop ({speedup:.1f}x)")
    print(f"{'PASS' if vec_ms < GOAL_VECTORISED_MS else 'FAIL'}: vectorised < {GOAL_VECTORISED_MS} ms ({vec_ms:.4f} ms)")
    print(f"{'PASS' if max_diff < 1e-5 else 'FAIL'}: same advantages as the reference (max diff {max_diff:.2e} < 1e-5)")


if __name__ == "__main__":
    main()
