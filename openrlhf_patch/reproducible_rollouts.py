"""Rollouts that are the same in every launch (`--reproducible-rollouts`, off by default).

Two launches of OpenRLHF with the same --seed train on different rollouts, for two reasons:
  * vLLM samples from one generator per engine (seeded `seed + engine index`), shared by the
    running batch, and each sample of a group is a request of its own: a sample's tokens depend
    on which requests happened to share its decoding steps;
  * `SamplesGenerator._generate_vllm` collects the groups in the order they finish
    (`ray.wait`), which becomes the order of the replay buffer, so the shuffled micro-batches
    differ even for the same samples.
With this option, in every process of the run:
  * each vLLM request gets its own seed, made from the run's seed, the prompt's tokens and the
    sample's index among that prompt's requests in the engine (vLLM then draws it from a
    generator of its own); a request that already carries a seed keeps it
    (`vllm.v1.engine.async_llm.AsyncLLM.generate`, in the rollout actor);
  * a step's groups are put back in the order their prompts were dispatched, whichever loop made
    them, OpenRLHF's or ngrpo's refill loop (`SamplesGenerator._generate_vllm`, in the trainer).
tests/test_upstream_parity.py runs both sides of its comparison (ngrpo, and OpenRLHF without
ngrpo's patch) with it; a researcher can use it to rerun a step exactly.
"""
import functools
import hashlib

from openrlhf_patch import touchpoints

VLLM_MODULE = "vllm.v1.engine.async_llm"
GENERATOR_MODULE = "openrlhf.trainer.ppo_utils.samples_generator"


def sample_seed(run_seed: int, prompt_token_ids, index: int) -> int:
    """A 63-bit seed for the INDEX-th request of this prompt (sha256: the same in every process)."""
    digest = hashlib.sha256(f"{run_seed}|{index}|{list(prompt_token_ids)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def wrap_generate(upstream, run_seed: int):
    """AsyncLLM.generate, giving a request without a seed the one `sample_seed` makes."""
    @functools.wraps(upstream)
    async def generate(self, prompt, sampling_params, request_id, *args, **kwargs):
        tokens = prompt.get("prompt_token_ids") if isinstance(prompt, dict) else None
        if tokens is not None and getattr(sampling_params, "seed", 0) is None:
            # The index is taken before the first await, in the order the agent's tasks call
            # generate, which is the same in every launch.
            seen = self.__dict__.setdefault("_ngrpo_sample_index", {})
            key = hashlib.sha256(str(list(tokens)).encode()).hexdigest()
            index = seen[key] = seen.get(key, -1) + 1
            sampling_params = sampling_params.clone()
            sampling_params.seed = sample_seed(run_seed, tokens, index)
        async for output in upstream(self, prompt, sampling_params, request_id, *args, **kwargs):
            yield output

    return generate


def wrap_dispatch(upstream):
    """SamplesGenerator._dispatch_prompts_to_vllm, remembering the order of the prompts sent."""
    @functools.wraps(upstream)
    def dispatch(self, prompts, *args, **kwargs):
        self.__dict__.setdefault("_ngrpo_dispatched", []).extend(prompts)
        return upstream(self, prompts, *args, **kwargs)

    return dispatch


def in_dispatch_order(experiences, dispatched):
    """EXPERIENCES (one sample each) sorted by the first dispatch of their prompt; a group keeps
    its own order (the engine returns a group's samples in the order of their requests)."""
    first = {}
    for i, prompt in enumerate(dispatched):
        first.setdefault(prompt, i)
    return sorted(experiences, key=lambda e: first[e.prompts[0]])


def wrap_generate_vllm(upstream):
    """SamplesGenerator._generate_vllm (OpenRLHF's or ngrpo's), its groups in dispatch order."""
    @functools.wraps(upstream)
    def _generate_vllm(self, *args, **kwargs):
        self._ngrpo_dispatched = []
        experiences, consumed, exhausted = upstream(self, *args, **kwargs)
        return in_dispatch_order(experiences, self._ngrpo_dispatched), consumed, exhausted

    return _generate_vllm


def patches(run_seed: int) -> dict:
    """{module: patch} for upstream.patch_on_import. Register after ngrpo's own patch of the
    samples generator, so that the order is restored around whichever loop runs."""

    def patch_vllm(async_llm):
        import inspect

        # wrap_generate reads the prompt and the sampling params by position: a vLLM that moved
        # them would leave every request unseeded without a word, so it stops here instead.
        generate = getattr(async_llm.AsyncLLM, "generate", None)
        params = list(inspect.signature(generate).parameters)[:4] if generate is not None else []
        if params != ["self", "prompt", "sampling_params", "request_id"]:
            raise RuntimeError(f"--reproducible-rollouts: {VLLM_MODULE}.AsyncLLM.generate takes {params or 'nothing'}, "
                               "not (self, prompt, sampling_params, request_id) as in vLLM 0.29; "
                               "openrlhf_patch/reproducible_rollouts.py must be ported to this vLLM")
        # another run in this process (its own seed) wraps vLLM's own generate in place of this one
        engine = async_llm.AsyncLLM
        upstream = touchpoints.original("vllm.v1.engine.async_llm.AsyncLLM.generate", owner=engine)
        touchpoints.patch("vllm.v1.engine.async_llm.AsyncLLM.generate", wrap_generate(upstream, run_seed),
                          owner=engine, reinstall=True)

    def patch_generator(samples_generator):
        generator = samples_generator.SamplesGenerator
        touchpoints.patch("openrlhf.trainer.ppo_utils.samples_generator.SamplesGenerator._dispatch_prompts_to_vllm",
                          wrap_dispatch(generator._dispatch_prompts_to_vllm), owner=generator)
        touchpoints.patch("openrlhf.trainer.ppo_utils.samples_generator.SamplesGenerator._generate_vllm",
                          wrap_generate_vllm(generator._generate_vllm), owner=generator)

    return {VLLM_MODULE: patch_vllm, GENERATOR_MODULE: patch_generator}
