"""--reproducible-rollouts (openrlhf_patch/reproducible_rollouts.py): the seed of a sample, the dispatch
order of a step's groups, and the loud stop on a vLLM whose AsyncLLM.generate moved its arguments.
Its effect end to end is in tests/test_upstream_parity.py (two launches train on the same samples)."""
import asyncio
import importlib
from types import SimpleNamespace

import pytest

from openrlhf_patch import reproducible_rollouts as rr
from openrlhf_patch import touchpoints


def test_a_samples_seed_depends_on_the_run_seed_the_prompt_and_its_index_only():
    seed = rr.sample_seed(0, [1, 2, 3], 0)
    assert seed == rr.sample_seed(0, (1, 2, 3), 0) and 0 <= seed < 2 ** 63
    assert len({seed, rr.sample_seed(1, [1, 2, 3], 0), rr.sample_seed(0, [1, 2, 4], 0), rr.sample_seed(0, [1, 2, 3], 1)}) == 4


def test_each_request_of_a_prompt_gets_the_next_seed_and_a_given_seed_is_kept():
    seen = []

    class Engine:
        async def generate(self, prompt, sampling_params, request_id, *args, **kwargs):
            seen.append(sampling_params.seed)
            yield request_id

    class Params(SimpleNamespace):
        def clone(self):
            return Params(**vars(self))

    Engine.generate = rr.wrap_generate(Engine.generate, run_seed=7)
    engine = Engine()

    async def run(params):
        return [out async for out in engine.generate({"prompt_token_ids": [5, 6]}, params, "r")]

    for _ in range(3):
        asyncio.run(run(Params(seed=None)))
    asyncio.run(run(Params(seed=123)))
    assert seen == [rr.sample_seed(7, [5, 6], i) for i in range(3)] + [123]


def test_groups_come_back_in_dispatch_order():
    exp = lambda prompt, k: SimpleNamespace(prompts=[prompt], k=k)  # noqa: E731
    finished = [exp("b", 0), exp("b", 1), exp("c", 0), exp("a", 0), exp("a", 1)]
    ordered = rr.in_dispatch_order(finished, ["a", "b", "c"])
    assert [(e.prompts[0], e.k) for e in ordered] == [("a", 0), ("a", 1), ("b", 0), ("b", 1), ("c", 0)]


def test_a_vllm_with_other_generate_arguments_is_refused_by_name():
    class Moved:
        async def generate(self, request, params, rid):
            yield None

    with pytest.raises(RuntimeError, match=r"AsyncLLM\.generate takes \['self', 'request', 'params', 'rid'\]"):
        rr.patches(0)[rr.VLLM_MODULE](SimpleNamespace(AsyncLLM=Moved))
    real = importlib.import_module(rr.VLLM_MODULE)
    original = real.AsyncLLM.generate
    target = "vllm.v1.engine.async_llm.AsyncLLM.generate"
    try:
        rr.patches(0)[rr.VLLM_MODULE](real)  # the installed vLLM has the arguments it reads
        first = real.AsyncLLM.generate
        assert (target, "openrlhf_patch/reproducible_rollouts.py:patches") in touchpoints.markers(first)
        assert first.__wrapped__ is original
        rr.patches(0)[rr.VLLM_MODULE](real)  # applied again: vLLM's own generate wrapped once, not twice
        assert real.AsyncLLM.generate.__wrapped__ is original
    finally:
        touchpoints.undo(target, owner=real.AsyncLLM)
    assert real.AsyncLLM.generate is original
