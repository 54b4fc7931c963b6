"""Baselines train as OpenRLHF trains them: `ngrpo train` against OpenRLHF 0.11.2 without ngrpo's
patch, run side by side.

For every recipe whose estimator is OpenRLHF's own (grpo = group_norm with its KL loss and
reference model, dr_grpo, rloo, ppo with its critic, reinforce_pp = REINFORCE++ with its KL in the
reward and reinforce_pp_baseline with its k2 KL loss), with the group filter off:

  ngrpo     `ngrpo train --algo A` for 3 steps (12 prompts, 4 a step, one pass) on the tiny model,
            with every hook of ngrpo's patch in place (diagnostics, reward checks, step log,
            progress, tokenizer once), in CPU mode's default lean layout (trainer and policy in
            the driver, the engine core in a thread) and, for grpo, also in OpenRLHF's own process
            layout (NGRPO_CPU_LAYOUT=upstream), the one GPU runs have.
  openrlhf  the same OpenRLHF argv and seed through benchmarks/openrlhf_unpatched.py: OpenRLHF's
            own estimators, loss, generation loop and logger; only CPU mode's patches (no CUDA,
            gloo weight sync, torch's AdamW since FusedAdam cannot be built) and the seeded prompt
            order (see that file).

The updated weights are compared tensor by tensor, bit for bit, and so is every step metric both
sides log (timings aside). OpenRLHF's vLLM sampling is not reproducible between two launches (one
generator per engine, shared by whatever requests run together), and the groups
reach the replay buffer in the order they finish. So both sides run with --reproducible-rollouts
(openrlhf_patch/reproducible_rollouts.py: one vLLM seed per sample, groups in dispatch order),
applied the same way in both; then both train on the same samples in the same order, which the
step metrics show (response lengths, rewards).

With --old-log-probs reuse-on-policy (ngrpo's default when a rollout is one optimizer step) the
ratio's old log-probs come from the training forward instead of a separate one: the same weights,
other micro-batches, so they differ in the last bits. That case is checked against a tolerance
(the largest weight difference is reported in the failure message).
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fixtures_runs import COIN_REWARD
from pipelines.launch.recipes import ALGO_SETTINGS, UPSTREAM_ESTIMATORS

pytestmark = [pytest.mark.pipeline, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
ALGOS = ("grpo", "dr_grpo", "rloo", "ppo", "reinforce_pp", "reinforce_pp_baseline")
# every recipe whose estimator is OpenRLHF's own is compared here
assert {ALGO_SETTINGS[a]["estimator"] for a in ALGOS} >= set(UPSTREAM_ESTIMATORS)
STEPS = 3
# Same settings both sides; one pass over 12 prompts at 4 a step gives the 3 steps.
COMMON = ["--device", "cpu", "--preset", "cpu-tiny", "--group-filter", "none", "--seed", "0", "--lr", "1e-3",
          "--episodes", "1", "--reproducible-rollouts"]
# Logged by one side only, or clock time.
NOT_COMPARED = ("timing/", "ngrpo/", "perf/")


def _ngrpo_train(run_dir, model, data, reward, algo, *extra, layout="lean"):
    log = run_dir.with_name(run_dir.name + ".log")
    proc = subprocess.run([sys.executable, "-m", "ngrpo_cli.main", "train", "--model", str(model), "--data", str(data),
                           "--algo", algo, "--output", str(run_dir), "--reward-file", str(reward), *COMMON, *extra],
                          capture_output=True, text=True, cwd=REPO, timeout=1200,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", "NGRPO_CPU_LAYOUT": layout})
    log.write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, f"ngrpo train --algo {algo} failed:\n{(proc.stdout + proc.stderr)[-5000:]}"
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _openrlhf_train(run_dir):
    log = run_dir.with_name(run_dir.name + ".openrlhf.log")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "openrlhf_unpatched.py"), str(run_dir), str(log)],
                          capture_output=True, text=True, cwd=REPO, timeout=1200)
    assert proc.returncode == 0, f"OpenRLHF on {run_dir} failed:\n{proc.stderr[-3000:]}\n{log.read_text()[-3000:]}"
    return [json.loads(line) for line in (run_dir / "unpatched" / "steps.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data_and_reward(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    data = root / "problems.jsonl"
    data.write_text("".join(json.dumps({"id": str(i), "problem": f"What is {i} + {i % 5}?", "answer": str(i + i % 5)})
                            + "\n" for i in range(4 * STEPS)))
    reward = root / "coin_reward.py"
    reward.write_text(COIN_REWARD)
    return root, data, reward


@pytest.fixture(scope="module")
def pairs(data_and_reward, tiny_model_dir):
    """{algo: (ngrpo's step metrics, OpenRLHF's, ngrpo's run dir)}, made lazily, once per algo."""
    root, data, reward = data_and_reward
    made = {}

    def get(algo, *extra, layout="lean"):
        key = (algo, layout, *extra)
        if key not in made:
            run_dir = root / "-".join([algo, layout, *[e.strip("-") for e in extra]])
            ours = _ngrpo_train(run_dir, tiny_model_dir, data, reward, algo, *extra, layout=layout)
            made[key] = (ours, _openrlhf_train(run_dir), run_dir)
        return made[key]

    return get


def _weights(run_dir):
    return (load_file(str(run_dir / "final_model" / "model.safetensors")),
            load_file(str(run_dir / "unpatched" / "final_model" / "model.safetensors")))


def _compared(ours, theirs):
    """{step: {metric: (ngrpo, openrlhf)}} for the metrics both sides log at each step."""
    assert [m["step"] for m in ours] == [m["global_step"] for m in theirs] == list(range(1, STEPS + 1))
    out = {}
    for a, b in zip(ours, theirs):
        keys = {k for k in a.keys() & b.keys() if not k.startswith(NOT_COMPARED) and k not in ("step", "time")}
        out[a["step"]] = {k: (a[k], float(b[k])) for k in sorted(keys)}
    return out


@pytest.mark.parametrize("algo,layout", [(algo, "lean") for algo in ALGOS] + [("grpo", "upstream")])
def test_a_baseline_trains_bit_for_bit_as_openrlhf(pairs, algo, layout, tiny_model_dir):
    ours, theirs, run_dir = pairs(algo, "--old-log-probs", "forward", layout=layout)
    launch_log = (run_dir / "logs" / "launch-1.log").read_text()
    assert ("[ngrpo] CPU layout: the policy runs in the driver" in launch_log) == (layout == "lean")
    compared = _compared(ours, theirs)
    # the comparison covers the loss, the rewards and the samples, not just a couple of keys
    for key in ("policy_loss", "reward", "response_length", "actor_lr", "kl"):
        assert all(key in metrics for metrics in compared.values()), (key, sorted(compared[1]))
    if algo == "ppo":
        assert all("critic_loss" in metrics for metrics in compared.values())
    different = {step: {k: v for k, v in m.items() if not (v[0] == v[1] or (math.isnan(v[0]) and math.isnan(v[1])))}
                 for step, m in compared.items()}
    assert different == {1: {}, 2: {}, 3: {}}
    mine, upstream = _weights(run_dir)
    assert mine.keys() == upstream.keys()
    unequal = [name for name in mine if not torch.equal(mine[name], upstream[name])]
    assert unequal == []
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    assert any(not torch.equal(mine[name], base[name]) for name in mine)  # training moved the weights


def test_reused_old_log_probs_stay_within_float_noise_of_openrlhf(pairs):
    """ngrpo's default for a one-optimizer-step rollout: the same samples, the same metrics but the
    ratio's, and weights within 1e-5 of OpenRLHF's after 3 steps of lr 1e-3."""
    ours, theirs, run_dir = pairs("grpo")
    compared = _compared(ours, theirs)
    for step, metrics in compared.items():
        for key in ("reward", "response_length"):
            assert metrics[key][0] == metrics[key][1], (step, key)
        assert metrics["policy_loss"][0] == pytest.approx(metrics["policy_loss"][1], rel=1e-4, abs=1e-6)
    mine, upstream = _weights(run_dir)
    worst = max((mine[n].float() - upstream[n].float()).abs().max().item() for n in mine)
    assert worst <= 1e-5, f"largest weight difference {worst}"
