"""CPU mode's optional speed-ups behind one switch: `ngrpo train --cpu-speedups on|off`
(environment NGRPO_CPU_SPEEDUPS, which the run's Ray processes inherit).

With `off` a CPU run keeps only what CPU needs in order to run (torch.cuda stand-ins, the gloo
weight sync, DeepSpeed's CPU accelerator, the flash_attn stub: kind "cpu-required" in
openrlhf_patch/touchpoints.py) and runs OpenRLHF's own layout, Ray's own node and vLLM's own
settings. That separates an upgrade break from a speed-up break: a run that fails with `on` and
passes with `off` points at a speed-up.

Each part below is a set of touchpoints of kind "cpu-speedup". A part whose library is installed
at a version outside the one its entries were checked on turns itself off, in one line, and the
run goes on without it (the switch's `off` behaviour for that part).
"""
import os
import sys
from typing import Dict, Tuple

ENV = "NGRPO_CPU_SPEEDUPS"
VALUES = ("on", "off")

_CPU = "openrlhf_patch/cpu/"
# part -> (what it does, the touchpoint sites it consists of: "file.py:" prefixes of entry sites)
PARTS: Dict[str, Tuple[str, Tuple[str, ...]]] = {
    "early-ray-node": ("the run's Ray node starts while the command line is checked, without the dashboard, "
                       "monitor and API server, with a stand-in for the dashboard agent",
                       (_CPU + "early_ray.py:", _CPU + "ray_agent_stand_in.py:")),
    "lean-layout": ("the trainer and the policy in the driver, vLLM's engine core in a thread, GC freezing",
                    (_CPU + "cpu_layout.py:", _CPU + "vllm_engine_thread.py:")),
    "tokenizer-once": ("prompts tokenized once per batch, not once per engine call",
                       ("openrlhf_patch/install.py:_patch_samples_generator",)),
    "weight-buckets": ("weights sent to vLLM in buckets, not tensor by tensor",
                       (_CPU + "cpu_mode.py:patch_weight_sync", _CPU + "cpu_mode.py:broadcast_to_vllm_in_buckets")),
    "vllm-stats": ("vLLM's statistics off (only its API server reads them)", (_CPU + "cpu_mode.py:_patch_vllm",)),
    "cpu-env": ("every core for each phase (OMP_NUM_THREADS), vLLM's model in its engine core, bounded oneDNN "
                "caches, no torch.compile (SGPO's judge server too)",
                (_CPU + "cpu_mode.py:cpu_env", _CPU + "cpu_mode.py:apply_cpu_patches",
                 "pipelines/launch/judge_server.py:server_env")),
}
_decided: Dict[str, bool] = {}


def enabled() -> bool:
    """The switch: NGRPO_CPU_SPEEDUPS, 'on' unless set."""
    value = os.environ.get(ENV, "on")
    if value not in VALUES:
        raise ValueError(f"{ENV}={value!r}: use one of {', '.join(VALUES)}")
    return value == "on"


def entries(part: str):
    """The touchpoints of PART (kind cpu-speedup, at one of its sites)."""
    from openrlhf_patch import touchpoints

    sites = PARTS[part][1]
    return [e for e in touchpoints.TOUCHPOINTS if e.kind == "cpu-speedup" and e.site.startswith(sites)]


def unchecked_versions(part: str) -> Dict[str, str]:
    """{library: installed version} for PART's libraries installed outside the versions checked."""
    from openrlhf_patch import touchpoints

    out = {}
    for entry in entries(part):
        installed = touchpoints.installed_version(entry.library)
        if installed is not None and not touchpoints.version_checked(entry, installed):
            out[entry.library] = f"{installed} (checked on {entry.checked_on})"
    return out


def on(part: str) -> bool:
    """Whether PART applies in this process: the switch is on and its libraries are at a checked
    version. A part that turns itself off says so once per process."""
    if part not in PARTS:
        raise KeyError(f"no CPU speed-up {part!r}; the parts are {', '.join(PARTS)}")
    if not enabled():
        return False
    if part not in _decided:
        unchecked = unchecked_versions(part)
        if unchecked:
            found = ", ".join(f"{lib} {v}" for lib, v in sorted(unchecked.items()))
            print(f"[ngrpo] CPU speed-up {part} off: {found}", file=sys.stderr, flush=True)
        _decided[part] = not unchecked
    return _decided[part]
