"""ngrpo's refill loop (sampling.make_generate_vllm) against OpenRLHF 0.11.2's own
SamplesGenerator._generate_vllm, on the same dispatches.

Both loops run as they are, on a real local Ray (the responses travel as object refs) and with
OpenRLHF's own _collect_prompt_batch and _process_response_into_experience. Only the rollout
engines are replaced: `_dispatch_prompts_to_vllm` puts, for each prompt, the group of responses
whose rewards its label lists ("1,0,0,1"). So the two loops can be compared sample by sample:
which prompts were dispatched, in what order, which groups were kept, the prompt count and the
exhaustion flag.

- Without a group filter, ngrpo leaves OpenRLHF's loop in place (install._patch_samples_generator);
  a run's worker is checked for that in test_train_pipeline's patched-worker probe and here.
- With DAPO's filter on 0/1 rewards, ngrpo's loop and OpenRLHF's range (0, 1) on the mean keep the
  same groups and consume the same prompts: the same samples.
- Where they differ, by design: partial-credit rewards (a group whose rewards are all below R_max
  but not 0: OpenRLHF's mean range keeps it, ngrpo's "all wrong" drops it), NGRPO's one-sided
  filter, and a filter that never keeps a group (ngrpo stops with an error instead of consuming
  the data set).
"""
from types import SimpleNamespace

import pytest
import torch

ray = pytest.importorskip("ray")
samples_generator = pytest.importorskip("openrlhf.trainer.ppo_utils.samples_generator")

from openrlhf_patch import config as patch_config  # noqa: E402
from openrlhf_patch import reward_checks, sampling  # noqa: E402

GROUP = 4


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def _responses(prompt, label):
    """The group of responses a stand-in engine returns for PROMPT: one per reward in LABEL."""
    out = []
    for i, reward in enumerate(float(x) for x in label.split(",")):
        out.append({"prompt": prompt, "label": label, "observation_tokens": [1, 2, 3 + i, 4],
                    "action_ranges": [(2, 4)], "reward": reward, "scores": reward, "rollout_log_probs": None,
                    "extra_logs": {}})
    return out


class StandInGenerator:
    """What _generate_vllm reads of a SamplesGenerator, with the engines replaced."""

    def __init__(self, filtering_range=(0.0, 1.0)):
        self.args = SimpleNamespace(algo=SimpleNamespace(dynamic_filtering_range=list(filtering_range)))
        self.dispatched = []

    def _dispatch_prompts_to_vllm(self, prompts, labels, images=None, **kwargs):
        self.dispatched.extend(prompts)
        return [ray.put(_responses(p, label)) for p, label in zip(prompts, labels)]

    def _process_response_into_experience(self, response, **kwargs):
        return samples_generator.SamplesGenerator._process_response_into_experience(self, response, **kwargs)


def _loader(labels, batch=1):
    """OpenRLHF's prompt loader yields (indices, prompts, labels, images) batches. (A refill takes the
    first prompt of the next batch and drops the rest of it, in both loops: batches of 1 keep
    the hand-worked counts below simple.)"""
    items = [(f"prompt {i}", label) for i, label in enumerate(labels)]
    for start in range(0, len(items), batch):
        chunk = items[start:start + batch]
        yield (list(range(start, start + len(chunk))), [p for p, _ in chunk], [l for _, l in chunk],
               [None] * len(chunk))


def _run(loop, labels, num_prompts, dynamic_filtering, batch=1, **generator_kwargs):
    generator = StandInGenerator(**generator_kwargs)
    experiences, consumed, exhausted = loop(generator, _loader(labels, batch), num_prompts, dynamic_filtering)
    kept = sorted({e.prompts[0] for e in experiences}, key=lambda p: int(p.split()[1]))
    rewards = {p: sorted(float(e.rewards[0]) for e in experiences if e.prompts[0] == p) for p in kept}
    return {"kept": kept, "rewards": rewards, "consumed": consumed, "exhausted": exhausted,
            # ray.wait hands back ready groups in no fixed order, so refills go out in no fixed order
            "dispatched": sorted(generator.dispatched, key=lambda p: int(p.split()[1])), "samples": len(experiences)}


UPSTREAM = samples_generator.SamplesGenerator._generate_vllm


def _ngrpo_loop(group_filter, max_in_a_row=512):
    patch_config.activate(patch_config.PatchConfig(group_filter=group_filter, device="cpu",
                                                   max_consecutive_dropped_groups=max_in_a_row))
    return sampling.make_generate_vllm()


MIXED_DATA = ["1,0,0,0", "1,1,1,1", "0,0,0,0", "0,1,0,1", "1,1,0,1", "0,0,0,0", "1,1,1,1", "0,0,1,0",
              "1,0,1,1", "0,0,0,0"]


def test_the_patch_leaves_openrlhfs_loop_without_a_filter():
    """install._patch_samples_generator replaces _generate_vllm only for a group filter."""
    from openrlhf_patch import install

    class Generator(samples_generator.SamplesGenerator):  # the patch installs on the class (or a subclass) only
        _generate_vllm = UPSTREAM

    module = SimpleNamespace(SamplesGenerator=Generator)
    patch_config.activate(patch_config.PatchConfig(group_filter="none", device="cpu"))
    install._patch_samples_generator(module)
    assert Generator._generate_vllm is UPSTREAM

    class Filtered(Generator):
        _generate_vllm = UPSTREAM

    module = SimpleNamespace(SamplesGenerator=Filtered)
    patch_config.activate(patch_config.PatchConfig(group_filter="drop_all_correct", device="cpu"))
    install._patch_samples_generator(module)
    from openrlhf_patch import touchpoints

    assert ("openrlhf.trainer.ppo_utils.samples_generator.SamplesGenerator._generate_vllm",
            "openrlhf_patch/install.py:_patch_samples_generator") in touchpoints.markers(Filtered._generate_vllm)


@pytest.mark.parametrize("num_prompts", [4, 10, 12])
def test_without_filtering_the_loops_take_the_same_samples(local_ray, num_prompts):
    """With dynamic filtering off (OpenRLHF's flag), both loops take every group of the first
    NUM_PROMPTS prompts and report the same count and exhaustion (12 > the 10 prompts there are)."""
    theirs = _run(UPSTREAM, MIXED_DATA, num_prompts, False, batch=3)
    ours = _run(_ngrpo_loop("none"), MIXED_DATA, num_prompts, False, batch=3)
    assert ours == theirs
    assert theirs["samples"] == GROUP * min(num_prompts, len(MIXED_DATA))
    assert theirs["exhausted"] == (num_prompts > len(MIXED_DATA))


@pytest.mark.parametrize("num_prompts", [3, 5, 7])
def test_dapo_filter_on_binary_rewards_equals_openrlhfs_mean_range(local_ray, num_prompts):
    """drop_all_correct_and_all_wrong on 0/1 rewards keeps exactly the groups whose mean is in
    (0, 1), OpenRLHF's default range: same kept groups, refills, prompt count and exhaustion."""
    theirs = _run(UPSTREAM, MIXED_DATA, num_prompts, True, filtering_range=(0.0, 1.0))
    ours = _run(_ngrpo_loop("drop_all_correct_and_all_wrong"), MIXED_DATA, num_prompts, True)
    assert ours == theirs
    assert theirs["kept"] == ["prompt 0", "prompt 3", "prompt 4", "prompt 7", "prompt 8"][:num_prompts]
    # 5 mixed groups in the data: a request for 7 refills until the loader runs dry
    assert theirs["exhausted"] == (num_prompts > 5) and theirs["consumed"] == (10 if num_prompts > 5 else {3: 5, 5: 9}[num_prompts])


def test_where_the_loops_differ(local_ray):
    """Partial credit: a group of rewards 0.5 has no correct response. OpenRLHF's mean range keeps
    it as 'mixed'; ngrpo's filter, by correctness (reward >= R_max), drops it as all wrong.
    On 0/1 rewards NGRPO's one-sided filter (drop all-correct) is OpenRLHF's range (-1, 1)."""
    data = ["0.5,0.5,0.5,0.5", "1,0,0,0", "0,0,0,0", "1,1,1,1"]
    theirs = _run(UPSTREAM, data, 2, True, filtering_range=(0.0, 1.0))
    ours = _run(_ngrpo_loop("drop_all_correct_and_all_wrong"), data, 2, True)
    assert theirs["kept"] == ["prompt 0", "prompt 1"]
    assert ours["kept"] == ["prompt 1"] and ours["exhausted"] and ours["consumed"] == 4

    ngrpo = _run(_ngrpo_loop("drop_all_correct"), MIXED_DATA, 4, True)
    below_one = _run(UPSTREAM, MIXED_DATA, 4, True, filtering_range=(-1.0, 1.0))
    assert ngrpo == below_one
    assert ngrpo["kept"] == ["prompt 0", "prompt 2", "prompt 3", "prompt 4"]


def test_a_filter_that_keeps_nothing_stops_instead_of_draining_the_data(local_ray):
    data = ["1,1,1,1"] * 12
    theirs = _run(UPSTREAM, data, 2, True, filtering_range=(0.0, 1.0))
    assert theirs["samples"] == 0 and theirs["consumed"] == 12 and theirs["exhausted"]
    with pytest.raises(reward_checks.RewardError, match="dropped 3 groups in a row"):
        _run(_ngrpo_loop("drop_all_correct_and_all_wrong", max_in_a_row=3), data, 2, True)


def test_a_non_finite_reward_is_refused_in_the_loop_and_before_the_advantages(local_ray):
    patch_config.activate(patch_config.PatchConfig(group_filter="drop_all_correct", device="cpu", reward_file="r.py"))
    with pytest.raises(reward_checks.RewardError, match=r"returned nan for a response of prompt 'prompt 1'"):
        _run(sampling.make_generate_vllm(), ["1,0,0,0", "0,nan,1,0"], 2, True)
    # without a filter OpenRLHF's loop takes it; the batch check before the estimator refuses it
    experiences, _, _ = UPSTREAM(StandInGenerator(), _loader(["1,0,0,0", "0,1,inf,0"]), 2, False)
    assert len(experiences) == 8
    first = next(e for e in experiences if e.prompts[0] == "prompt 0" and e.rewards[0] == 1.0)
    assert torch.equal(reward_checks.checked_rewards(first, patch_config.active()), torch.tensor([1.0], dtype=torch.float64))
    with pytest.raises(reward_checks.RewardError, match=r"returned inf for a response of prompt 'prompt 1'"):
        for e in experiences:
            reward_checks.checked_rewards(e, patch_config.active())
