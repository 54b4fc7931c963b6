"""How often the NGRPO authors' batch filling trains responses in partial groups (docs/FIDELITY.md (a)).

An independent re-statement, in plain Python, of the batch-filling loop of the authors' verl 0.2
fork as read in `verl/trainer/ppo/ray_trainer.py` (RayPPOTrainer.fit, lines ~1076-1300, and
RayPPOTrainer._balance_batch / verl/utils/seqlen_balancing.py); none of their code is imported:

 1. A generation round takes `train_batch_size` = 1024 prompts and samples n = 8 responses each;
    the rows are laid out group by group (batch.repeat(interleave=True)) and every prompt gets a
    fresh uid.
 2. `_balance_batch` reorders the 8192 rows so the 8 data-parallel ranks get similar token counts:
    Karmarkar-Karp largest differencing with equal-size partitions (k = world size = 8); each
    partition is sorted by row index and the partitions are concatenated. Members of one group
    land in different partitions, so a group's rows are spread over the whole round.
 3. The group filter drops every row of a filtered uid (`batch.subset`), keeping row order.
 4. Kept rows are appended to `collected_batches`; rounds repeat until at least 8192 rows are
    collected. The concatenation is cut at exactly 8192 rows; the rest (`remained_batch`) is put
    in front of the next step's collection.
 5. Advantages are then computed per uid over the rows that made it into the trained batch, so a
    group cut at step 4 is normalised over a subset of its responses (a lone response gets
    mean 0 / std 1, i.e. A = r), and its other responses are normalised next step without them.

The model: a group survives the filter with probability `pass_rate`, independently of the others
(the real pass rate drifts over training; fixing it shows the effect per rate). Sequence lengths,
which only matter through step 2, are drawn as prompt ~ U[60, 300] tokens and, per prompt, a
log-normal mean response length (median 600) with log-normal spread sigma 0.35 inside the group,
capped at 3072. `--no-balance` keeps the group-by-group order instead (a lower bound on splitting).

Reported per pass rate, over steps 2..S: the share of the 8192 trained responses that sit in a
partial group (fewer than 8 of its responses in the batch), and the share in groups of size 1.

    python docs/fidelity_group_split_sim.py            # 12 pass rates, 30 steps each (~1 min)
    python docs/fidelity_group_split_sim.py --steps 10 --rates 0.5 0.25
"""
import argparse
import heapq
import itertools
import random
import statistics

PROMPTS_PER_ROUND = 1024
N = 8
TARGET_ROWS = PROMPTS_PER_ROUND * N
WORLD_SIZE = 8


def balanced_order(seqlens, k=WORLD_SIZE):
    """Row order after equal-size largest-differencing partitioning into k sets (see module doc)."""
    order = sorted(range(len(seqlens)), key=lambda i: (seqlens[i], i))
    counter = itertools.count()
    heap = []
    for off in range(0, len(order), k):
        # a state: k sets as [sum, items], kept in decreasing order of sum
        sets = sorted(([seqlens[i], [i]] for i in order[off:off + k]), key=lambda s: s[0], reverse=True)
        spread = sets[0][0] - sets[-1][0]
        heapq.heappush(heap, (-spread, next(counter), sets))
    while len(heap) > 1:
        _, _, a = heapq.heappop(heap)
        _, _, b = heapq.heappop(heap)
        for i in range(k):  # largest set of one state takes the smallest of the other
            a[i][0] += b[k - 1 - i][0]
            a[i][1].extend(b[k - 1 - i][1])
        a.sort(key=lambda s: s[0], reverse=True)
        heapq.heappush(heap, (-(a[0][0] - a[-1][0]), next(counter), a))
    sets = heap[0][2]
    return [i for s in sets for i in sorted(s[1])]


def generation_round(rng, next_uid, pass_rate, balance):
    """One rollout of 1024 prompts x 8: returns the kept rows (uids, in batch order) and the next uid."""
    uids, seqlens = [], []
    for g in range(PROMPTS_PER_ROUND):
        prompt = rng.randint(60, 300)
        median = rng.lognormvariate(6.4, 0.5)  # e^6.4 ~ 600 tokens
        for _ in range(N):
            resp = min(3072, max(8, int(median * rng.lognormvariate(0.0, 0.35))))
            uids.append(next_uid + g)
            seqlens.append(prompt + resp)
    kept_group = [rng.random() < pass_rate for _ in range(PROMPTS_PER_ROUND)]
    order = balanced_order(seqlens) if balance else range(len(uids))
    rows = [uids[i] for i in order if kept_group[uids[i] - next_uid]]
    return rows, next_uid + PROMPTS_PER_ROUND


def simulate(pass_rate, steps, seed, balance=True):
    rng = random.Random(seed)
    next_uid = 0
    remained = []
    per_step = []
    for step in range(1, steps + 1):
        collected = list(remained)
        remained = []
        rounds = 0
        while len(collected) < TARGET_ROWS:
            rows, next_uid = generation_round(rng, next_uid, pass_rate, balance)
            collected.extend(rows)
            rounds += 1
        batch, remained = collected[:TARGET_ROWS], collected[TARGET_ROWS:]
        sizes = {}
        for u in batch:
            sizes[u] = sizes.get(u, 0) + 1
        partial = sum(1 for u in batch if sizes[u] < N) / len(batch)
        lone = sum(1 for u in batch if sizes[u] == 1) / len(batch)
        split_groups = sum(1 for s in sizes.values() if s < N)
        per_step.append(dict(step=step, rounds=rounds, partial=partial, lone=lone,
                             split_groups=split_groups, groups=len(sizes), carried=len(remained)))
    return per_step


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rates", type=float, nargs="+", default=[0.95, 0.9, 0.8, 0.75, 0.7, 0.6, 0.5, 0.4, 0.3, 0.25, 0.2, 0.1])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-balance", action="store_true", help="keep group-by-group row order (no _balance_batch)")
    args = ap.parse_args()

    print(f"authors' batch filling, {'no balancing' if args.no_balance else 'with _balance_batch'}, "
          f"{args.steps} steps per pass rate, steps 2..{args.steps} summarised")
    print("| filter pass rate | rounds/step | responses in partial groups: mean (min-max) | in size-1 groups | step 1 |")
    print("|---|---|---|---|---|")
    for rate in args.rates:
        res = simulate(rate, args.steps, args.seed, balance=not args.no_balance)
        later = res[1:]
        p = [r["partial"] for r in later]
        lone = statistics.mean(r["lone"] for r in later)
        rounds = statistics.mean(r["rounds"] for r in later)
        print(f"| {rate:.2f} | {rounds:.2f} | {100 * statistics.mean(p):.1f} % ({100 * min(p):.1f}-{100 * max(p):.1f} %) "
              f"| {100 * lone:.2f} % | {100 * res[0]['partial']:.1f} % |")


if __name__ == "__main__":
    main()
