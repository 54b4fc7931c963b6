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
    # Advantage estimator of ngrpo's core (openrlhf_patch.algorithms.ESTIMATORS) that replaces
    # OpenRLHF's group step, or None to leave OpenRLHF's own estimator untouched (grpo, ppo, ...).
    estimator: Optional[str] = None
    # NGRPO advantage calibration (SPEC §2): K virtual samples of reward R_max, std epsilon.
    virtual_samples: int = 1
    max_reward: float = 1.0
    adv_eps: float = 1e-6
    # PSR-NSR / W-REINFORCE weight of positive samples (Zhu et al. 2025, arXiv 2506.01347).
    w_reinforce_lambda: float = 0.1
    # "cpu" applies the CPU runtime patches in every worker; "cuda" applies none of them.
    device: str = "cuda"
    # Where the trainer writes metrics.jsonl and its progress lines; None: no extra logging.
    run_dir: Optional[str] = None
    # Stop cleanly after this many training steps (None: run the whole schedule).
    max_steps: Optional[int] = None
    # The global step the run starts from (the checkpoint's step when resuming).
    start_step: int = 0
    # Seed of each worker's torch RNG (see install.worker_setup); None leaves it unseeded.
    seed: Optional[int] = None
    # How the reward extracts the final answer (pipelines.grading.EXTRACTIONS).
    answer_extraction: str = "boxed"

    def to_env(self) -> dict:
        return {ENV_VAR: json.dumps(dataclasses.asdict(self))}

    @classmethod
    def from_env(cls, environ=os.environ) -> Optional["PatchConfig"]:
        raw = environ.get(ENV_VAR)
        if not raw:
            return None
        return cls(**json.loads(raw))
