"""The settings a run's patch needs, carried from the driver to every Ray worker.

Ray workers (PPOTrainer, PolicyModelActor, vLLM engines) are separate processes that never see
the driver's Python objects, so the settings travel as one JSON environment variable, set in
`ray.init(runtime_env={"env_vars": ...})` and read back by the worker set-up hook.
"""
import dataclasses
import json
import os
from typing import Optional

ENV_VAR = "NGRPO_PATCH_CONFIG"


@dataclasses.dataclass(frozen=True)
class PatchConfig:
    # Advantage estimator of ngrpo's core (a name in openrlhf_patch.algorithms.ESTIMATORS) that
    # replaces OpenRLHF's group step, or None to leave OpenRLHF's own estimator (PPO's gae) alone.
    estimator: Optional[str] = None
    # The estimator options (algorithms.ESTIMATOR_OPTIONS: K, R_max, eps, lambda), one mapping.
    estimator_options: dict = dataclasses.field(default_factory=dict)
    # Dynamic sampling (algorithms.GROUP_FILTERS), decided by the correctness of each response.
    group_filter: str = "none"
    # Stop the run when the filter dropped this many groups in a row (the reward cannot support it).
    max_consecutive_dropped_groups: int = 512
    # "cpu" applies the CPU runtime patches in every worker; "cuda" applies none of them.
    device: str = "cuda"
    # Where the trainer writes metrics.jsonl, progress.json and its progress lines.
    run_dir: Optional[str] = None
    # Stop cleanly after this many training steps (None: run the whole schedule).
    max_steps: Optional[int] = None
    # The global step the run starts from (the checkpoint's step when resuming).
    start_step: int = 0
    # Equal budgets (`--max-samples`, `--max-generated-tokens`): stop cleanly once this many responses
    # (or response tokens) were generated, groups the filter dropped included; None: no such budget.
    max_samples: Optional[int] = None
    max_generated_tokens: Optional[int] = None
    # The counts at the checkpoint a resume starts from (metrics.jsonl's ngrpo/generated_* there).
    start_generated_samples: int = 0
    start_generated_tokens: int = 0
    # Seed of each worker's torch RNG (see install.worker_setup); None leaves it unseeded.
    seed: Optional[int] = None
    # How the reward extracts the final answer (pipelines.datasets.grading.EXTRACTIONS).
    answer_extraction: str = "boxed"
    # The reward file, named in errors about the rewards it returns.
    reward_file: Optional[str] = None
    # PPO's old log-probs: "reuse-on-policy" takes the training forward's own (detached) when a
    # rollout is one optimizer step, "forward" always runs OpenRLHF's extra policy forward.
    old_log_probs: str = "reuse-on-policy"
    # The same rollouts in every launch: one vLLM seed per sample, groups in dispatch order
    # (reproducible_rollouts.py).
    reproducible_rollouts: bool = False
    # Let the model's own code run (`--trust-remote-code`): what OpenRLHF and vLLM get as
    # trust_remote_code in every process of the run (openrlhf_patch/remote_code.py).
    trust_remote_code: bool = False
    # Stop the run after this many seconds without progress (`--stall-timeout`; 0: never); None:
    # the device's default (pipelines/launch/watchdog.py). Read by the driver's watchdog only.
    stall_timeout: Optional[float] = None
    # Responses whose advantage is exactly 0 (`--uniform-groups`, openrlhf_patch/uniform_groups.py):
    # "keep" (OpenRLHF's training), "mask-aux" (out of the entropy and KL terms), "skip" (no
    # optimizer step for a mini-batch without any non-zero advantage).
    uniform_groups: str = "keep"
    # SGPO (docs/ALGORITHM.md §10): the step judge's settings (openrlhf_patch.judge.JudgeSettings,
    # the prompt's text included); empty: off. All-wrong groups get graded rewards in the refill loop.
    sgpo: dict = dataclasses.field(default_factory=dict)

    @property
    def max_reward(self) -> float:
        return float(self.estimator_options.get("max_reward", 1.0))

    def to_env(self) -> dict:
        return {ENV_VAR: json.dumps(dataclasses.asdict(self))}

    @classmethod
    def from_env(cls, environ=os.environ) -> Optional["PatchConfig"]:
        raw = environ.get(ENV_VAR)
        if not raw:
            return None
        return cls(**json.loads(raw))


_active = {"config": None}


def activate(config: PatchConfig) -> None:
    _active["config"] = config


def active() -> PatchConfig:
    """The config this process was patched with. A hook running without one would train with
    silent defaults, so that is an error rather than a fallback."""
    config = _active["config"]
    if config is None:
        raise RuntimeError(
            f"ngrpo's OpenRLHF patch runs in process {os.getpid()} without its run settings: {ENV_VAR} did not "
            "reach this worker (start runs with `ngrpo train`, which passes it in Ray's runtime_env)")
    return config
