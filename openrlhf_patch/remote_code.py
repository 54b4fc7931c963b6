"""trust_remote_code as the run decided it (`--trust-remote-code`), in every process of the run.

OpenRLHF 0.11.2 hard-codes `trust_remote_code=True` where it loads the model, its config and its
tokenizer, and in the keyword arguments of every vLLM engine: a model folder whose config names
custom code (auto_map) would run that code in every Ray worker without the user asking. ngrpo
refuses such a model before anything starts (pipelines.models.check_remote_code) unless the user
passed --trust-remote-code; this patch makes OpenRLHF and vLLM follow the same decision
(PatchConfig.trust_remote_code), so that nothing is trusted without the flag:

  * openrlhf.utils.utils: `AutoTokenizer` (get_tokenizer) and `is_vlm_model` (its AutoConfig);
  * openrlhf.models.actor: `AutoModelForCausalLM`, `AutoModelForImageTextToText` (Actor);
  * openrlhf.models.model: `AutoConfig` (reward and critic models; the model class then gets
    that config);
  * openrlhf.trainer.ray.vllm_engine: `RolloutRayActor` (the vLLM engine's keyword arguments).

Not covered (never reached by an ngrpo run, which is text-only and writes JSONL data): the
AutoProcessor of a vision-language model (get_tokenizer, create_vllm_engines with images) and a
dataset given as a Python script (openrlhf.datasets.utils).
"""
class TrustDecided:
    """CLS (a transformers Auto class) whose from_pretrained always gets trust_remote_code=TRUST;
    every other attribute is CLS's own."""

    def __init__(self, cls, trust: bool):
        self._ngrpo_upstream, self._ngrpo_trust = getattr(cls, "_ngrpo_upstream", cls), bool(trust)

    def from_pretrained(self, *args, **kwargs):
        kwargs["trust_remote_code"] = self._ngrpo_trust
        return self._ngrpo_upstream.from_pretrained(*args, **kwargs)

    def __getattr__(self, name):
        if name.startswith("_ngrpo"):
            raise AttributeError(name)
        return getattr(self._ngrpo_upstream, name)

    def __repr__(self):
        return f"<{self._ngrpo_upstream.__name__} with trust_remote_code={self._ngrpo_trust} (ngrpo)>"


class ActorClassTrustDecided:
    """A Ray actor class whose `.remote(**kwargs)` (also after `.options(...)`) always gets
    trust_remote_code=TRUST: the keyword arguments OpenRLHF gives its vLLM engines."""

    def __init__(self, actor_class, trust: bool):
        self._ngrpo_upstream, self._ngrpo_trust = getattr(actor_class, "_ngrpo_upstream", actor_class), bool(trust)

    def options(self, *args, **kwargs):
        return ActorClassTrustDecided(self._ngrpo_upstream.options(*args, **kwargs), self._ngrpo_trust)

    def remote(self, *args, **kwargs):
        kwargs["trust_remote_code"] = self._ngrpo_trust
        return self._ngrpo_upstream.remote(*args, **kwargs)

    def __getattr__(self, name):
        if name.startswith("_ngrpo"):
            raise AttributeError(name)
        return getattr(self._ngrpo_upstream, name)


def make_is_vlm_model(trust: bool):
    """openrlhf.utils.utils.is_vlm_model with trust_remote_code=TRUST (a copy: upstream.COPIES)."""

    def is_vlm_model(pretrain: str) -> bool:
        """Check if a pretrained model is a VLM by looking for vision_config in its HF config."""
        from transformers import AutoConfig

        try:
            cfg = AutoConfig.from_pretrained(pretrain, trust_remote_code=trust)
            return hasattr(cfg, "vision_config")
        except Exception:
            return False

    is_vlm_model._ngrpo_trust = trust
    return is_vlm_model


def patches(trust: bool) -> dict:
    """{module: patch} for upstream.patch_on_import (every name is in upstream.SYMBOLS)."""

    from openrlhf_patch import touchpoints

    def put(target, module, make):
        # a later run in this process (its own --trust-remote-code) puts its value in place of this one
        name = target.rsplit(".", 1)[1]
        touchpoints.patch(target, make(getattr(module, name)), owner=module, reinstall=True)

    def patch_utils(utils):
        put("openrlhf.utils.utils.AutoTokenizer", utils, lambda cls: TrustDecided(cls, trust))
        put("openrlhf.utils.utils.is_vlm_model", utils, lambda _: make_is_vlm_model(trust))

    def patch_actor(actor):
        put("openrlhf.models.actor.AutoModelForCausalLM", actor, lambda cls: TrustDecided(cls, trust))
        put("openrlhf.models.actor.AutoModelForImageTextToText", actor, lambda cls: TrustDecided(cls, trust))

    def patch_model(model):
        put("openrlhf.models.model.AutoConfig", model, lambda cls: TrustDecided(cls, trust))

    def patch_vllm_engine(vllm_engine):
        put("openrlhf.trainer.ray.vllm_engine.RolloutRayActor", vllm_engine,
            lambda cls: ActorClassTrustDecided(cls, trust))

    return {
        "openrlhf.utils.utils": patch_utils,
        "openrlhf.models.actor": patch_actor,
        "openrlhf.models.model": patch_model,
        "openrlhf.trainer.ray.vllm_engine": patch_vllm_engine,
    }


def install(trust: bool) -> None:
    """Apply `patches(TRUST)` in this process, each when (if ever) its module is imported."""
    from openrlhf_patch import upstream

    upstream.patch_on_import(patches(trust))

