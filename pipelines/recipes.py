"""Training recipes: SPEC §5 (the NGRPO paper's settings) for every algorithm, as data.

A recipe is a flat set of named settings; `ngrpo train` turns it into OpenRLHF flags
(pipelines/training.py). Every field can be overridden by a CLI flag or a YAML `--config`.
"""
from typing import Optional

ALGOS = ("ngrpo", "grpo", "dapo", "w_reinforce", "psr", "nsr", "ppo", "dr_grpo", "rloo")

# name: (default, help). The help text is what `ngrpo train --help` shows for the flag.
FIELDS = {
    # -- advantage estimation
    "estimator": (None, "Advantage estimator: ngrpo|w_reinforce|psr|nsr (ngrpo's core, patched into OpenRLHF) or an OpenRLHF one (group_norm = GRPO, dr_grpo, rloo, gae = PPO)."),
    "virtual_samples": (1, "NGRPO: K virtual samples of reward R_max appended to each group before mean/std (NGRPO paper §3, K=1)."),
    "max_reward": (1.0, "NGRPO: R_max, the largest reward the task can give (not the batch maximum)."),
    "w_reinforce_lambda": (0.1, "W-REINFORCE: weight of correct samples, +lambda vs -1 for wrong ones (Zhu et al. 2025, arXiv 2506.01347)."),
    "gamma": (1.0, "GAE discount (PPO only)."),
    "gae_lambda": (1.0, "GAE lambda (PPO only)."),
    # -- policy loss
    "eps_clip_low": (0.2, "Lower clip range: ratio >= 1-eps_low for A<0 (NGRPO 0.16; SPEC §3)."),
    "eps_clip_high": (0.2, "Upper clip range: ratio <= 1+eps_high for A>0 (NGRPO 0.24, DAPO clip-higher 0.28)."),
    "loss_agg": ("token-mean", "Loss aggregation: token-mean (DAPO token-level loss) or seq-mean-token-mean."),
    "entropy_coef": (0.001, "Entropy bonus coefficient (0 logs entropy only)."),
    "kl_mode": ("none", "KL regularisation: none, loss (GRPO's KL loss term) or reward (PPO's KL penalty in the reward)."),
    "kl_coef": (0.0, "KL coefficient (GRPO 0.001 as loss, PPO 0.001 in reward)."),
    "kl_estimator": ("k1", "KL estimator: k1, k2 or k3 (GRPO uses k3)."),
    # -- sampling and filtering
    "group_filter": ("none", "Group filter: none, drop_all_correct (NGRPO), drop_all_correct_and_all_wrong (DAPO dynamic sampling). Filtered prompts are replaced until the batch is full."),
    "overlong_buffer": (None, "DAPO overlong reward shaping: soft penalty over the last N tokens of the response budget (DAPO: 1024)."),
    "prompts_per_step": (1024, "Prompts per rollout / training step."),
    "samples_per_prompt": (8, "Responses sampled per prompt (the group size G)."),
    "mini_batch_prompts": (256, "Prompts per PPO mini-batch (one optimizer step); 1024/256 = 4 optimizer steps per rollout."),
    "ppo_epochs": (1, "Passes over each rollout."),
    "episodes": (20, "Passes over the training prompts."),
    "temperature": (1.0, "Rollout sampling temperature."),
    "top_p": (1.0, "Rollout nucleus sampling top_p."),
    "max_prompt_len": (1024, "Longest prompt in tokens."),
    "max_response_len": (3072, "Longest response in tokens."),
    # -- optimisation
    "lr": (1e-6, "Actor learning rate (constant)."),
    "critic_lr": (1e-5, "Critic learning rate (PPO only)."),
    "lr_warmup_ratio": (0.0, "Share of steps of linear warm-up."),
    "weight_decay": (0.01, "AdamW weight decay."),
    "max_grad_norm": (1.0, "Gradient clipping norm."),
    "micro_train_batch_size": (4, "Samples per forward/backward micro-batch on each GPU."),
    "micro_rollout_batch_size": (8, "Samples per micro-batch when computing log-probs for experiences."),
    "zero_stage": (2, "DeepSpeed ZeRO stage (0-3)."),
    "seed": (42, "Random seed (data order, sampling)."),
    # -- reward
    "answer_extraction": ("boxed", "How the reward finds a response's final answer: boxed (the last \\boxed{}, SPEC §6) or authors (the NGRPO authors' reward: last boxed, else the text after 'the answer is', else the last number)."),
}

PAPER = {name: default for name, (default, _) in FIELDS.items()}

# SPEC §5 table: what each algorithm changes from the shared settings.
ALGO_SETTINGS = {
    "ngrpo": dict(estimator="ngrpo", eps_clip_low=0.16, eps_clip_high=0.24, group_filter="drop_all_correct"),
    "grpo": dict(estimator="group_norm", kl_mode="loss", kl_coef=0.001, kl_estimator="k3"),
    "dapo": dict(estimator="group_norm", eps_clip_high=0.28, group_filter="drop_all_correct_and_all_wrong",
                 overlong_buffer=1024),
    "w_reinforce": dict(estimator="w_reinforce"),
    "psr": dict(estimator="psr"),
    "nsr": dict(estimator="nsr"),
    "ppo": dict(estimator="gae", kl_mode="reward", kl_coef=0.001, kl_estimator="k1"),
    "dr_grpo": dict(estimator="dr_grpo"),
    "rloo": dict(estimator="rloo"),
}

# Small enough for a 2-core CPU and a tiny model: a few seconds of generation per step.
CPU_TINY = dict(
    prompts_per_step=4, samples_per_prompt=4, mini_batch_prompts=4, episodes=1, max_prompt_len=128,
    max_response_len=32, micro_train_batch_size=4, micro_rollout_batch_size=4, lr=1e-4,
)
PRESETS = {"paper": {}, "cpu-tiny": CPU_TINY}


def build_recipe(algo: str, preset: str = "paper", overrides: Optional[dict] = None) -> dict:
    """Shared settings < preset < algorithm < user overrides (later wins)."""
    if algo not in ALGO_SETTINGS:
        raise ValueError(f"unknown algorithm {algo!r}; choose one of {', '.join(ALGOS)}")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    recipe = dict(PAPER)
    recipe.update(PRESETS[preset])
    recipe.update(ALGO_SETTINGS[algo])
    for key, value in (overrides or {}).items():
        if key not in FIELDS:
            raise ValueError(f"unknown recipe setting {key!r}; valid settings: {', '.join(FIELDS)}")
        if value is not None:
            recipe[key] = value
    recipe["algo"] = algo
    return recipe
