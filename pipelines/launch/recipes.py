"""Training recipes: the NGRPO paper's settings (docs/ALGORITHM.md §5) for every algorithm, typed.

A `Recipe` is a flat dataclass; each field carries its type, default and help (as TRL's
GRPOConfig does). `ngrpo train` makes one flag per field (ngrpo_cli/train_cmd.py) and
pipelines/launch/training.py turns a recipe into OpenRLHF flags. Precedence, later wins:
the paper's shared settings < preset < algorithm < YAML --config < flags.
"""
import dataclasses
from typing import Optional, Tuple

from openrlhf_patch.algorithms import ESTIMATOR_OPTIONS, ESTIMATORS, GROUP_FILTERS
from openrlhf_patch.old_log_probs import MODES as OLD_LOG_PROBS_MODES
from pipelines.datasets.arith import WORKED_SOLUTION_TOKENS

# Estimators OpenRLHF computes itself. A recipe that names one trains exactly as OpenRLHF trains
# it: ngrpo's patch only reads the advantages for its diagnostics (tests/test_upstream_parity.py).
# The baselines grpo, dapo, dr_grpo, rloo and ppo use these. ngrpo's core (algorithms.ESTIMATORS)
# also has dr_grpo and rloo, as checked references; the name runs OpenRLHF's.
UPSTREAM_ESTIMATORS = {
    "group_norm": "GRPO's (r - mean) / (std + 1e-9) within the group, OpenRLHF's own",
    "dr_grpo": "Dr. GRPO's r - mean within the group, OpenRLHF's own",
    "rloo": "RLOO's leave-one-out baseline, OpenRLHF's own",
    "gae": "PPO's GAE with a critic, OpenRLHF's own",
    "reinforce": "REINFORCE++'s return normalised over the whole batch (no group baseline), OpenRLHF's own",
    "reinforce_baseline": "REINFORCE++-baseline's r - group mean, then normalised over the whole batch, OpenRLHF's own",
}
ESTIMATOR_CHOICES = tuple(e for e in ESTIMATORS if e not in UPSTREAM_ESTIMATORS) + tuple(UPSTREAM_ESTIMATORS)
# The estimators that work on groups of responses to the same prompt (all but PPO's GAE and
# REINFORCE++'s, which normalise over the batch).
GROUP_ESTIMATORS = frozenset(ESTIMATOR_CHOICES) - {"gae", "reinforce"}
# What happens to responses without learning signal (advantage exactly 0; docs/ALGORITHM.md §9).
UNIFORM_GROUPS = ("keep", "mask-aux", "skip")


class RecipeError(ValueError):
    """A recipe setting out of range; the message names the flag and what to change."""


def setting(default, help_text: str, choices: Optional[tuple] = None):
    return dataclasses.field(default=default, metadata={"help": help_text, "choices": choices})


def _option(name: str):
    default, help_text = ESTIMATOR_OPTIONS[name]
    return setting(default, help_text)


@dataclasses.dataclass
class Recipe:
    # -- advantage estimation (the estimators and their options come from openrlhf_patch.algorithms)
    estimator: str = setting("group_norm", "Advantage estimator. ngrpo's: " + " ".join(
        f"{e.name}: {e.summary.rstrip('.')}." for e in ESTIMATORS.values() if e.name not in UPSTREAM_ESTIMATORS)
        + " OpenRLHF's: " + " ".join(f"{k}: {v}." for k, v in UPSTREAM_ESTIMATORS.items()), ESTIMATOR_CHOICES)
    virtual_samples: int = _option("virtual_samples")
    max_reward: float = _option("max_reward")
    adv_eps: float = _option("adv_eps")
    w_reinforce_lambda: float = _option("w_reinforce_lambda")
    # -- abstention (UCPO, docs/ALGORITHM.md §8); they reach the reward through the estimator options
    uncertain_reward: Optional[float] = _option("uncertain_reward")
    ucpo_suppression_weight: float = _option("ucpo_suppression_weight")
    abstention_phrases: str = _option("abstention_phrases")
    # -- SGPO's step judge (docs/ALGORITHM.md §10): graded rewards for the responses of all-wrong groups
    graded_negatives: bool = setting(False, "SGPO: send each response of an all-wrong group to the step judge "
                                            "(--judge-url) and give it min(0.999 R_max, R_max sigmoid(beta (RTS - "
                                            "gamma))), RTS the share of the response before its first wrong step. "
                                            "Needs a 'solution' in every training row.")
    judge_url: Optional[str] = setting(None, "SGPO: base URL of an OpenAI-compatible chat endpoint, e.g. "
                                             "http://host:8000/v1 (vllm serve); POST {url}/chat/completions.")
    judge_model: Optional[str] = setting(None, "SGPO: the judge's model name, as the endpoint serves it; without "
                                               "--judge-url, a model (folder, built-in name, cached Hub id) that "
                                               "ngrpo serves itself with vLLM on 127.0.0.1 for the launch.")
    judge_prompt: Optional[str] = setting(None, "SGPO: the judge prompt template file (placeholders {problem} "
                                                "{solution} {steps} {n_steps}; the answer must end with "
                                                "FIRST_WRONG_STEP: k or none). Default: the one shipped, "
                                                "openrlhf_patch/sgpo_judge_prompt.txt (not the paper's).")
    judge_timeout: float = setting(60.0, "SGPO: seconds a judge request may take (each is retried once).")
    judge_workers: int = setting(8, "SGPO: concurrent judge requests.")
    judge_max_fail_share: float = setting(0.5, "SGPO: stop the run when the judge fails (error, timeout, "
                                               "unparsable answer) on more than this share of a step's responses.")
    sgpo_beta: float = setting(5.0, "SGPO: beta, the logistic's slope (not confirmed from the paper).")
    sgpo_gamma: float = setting(0.5, "SGPO: gamma, the RTS at which the graded reward is R_max / 2 (not confirmed).")
    rts_unit: str = setting("chars", "SGPO: what RTS counts, characters or steps of the response.", ("chars", "steps"))
    gamma: float = setting(1.0, "GAE discount (PPO only).")
    gae_lambda: float = setting(1.0, "GAE lambda (PPO only).")
    # -- policy loss
    eps_clip_low: float = setting(0.2, "Lower clip range, in (0, 1): ratio >= 1 - eps_low binds for A < 0 "
                                       "(docs/ALGORITHM.md §3).")
    eps_clip_high: float = setting(0.2, "Upper clip range, in (0, 1): ratio <= 1 + eps_high binds for A > 0 "
                                        "(DAPO's clip-higher raises it).")
    loss_agg: str = setting("token-mean", "Loss aggregation: token-mean (DAPO's token-level loss) or "
                                          "seq-mean-token-mean.", ("token-mean", "seq-mean-token-mean"))
    entropy_coef: float = setting(0.001, "Entropy bonus coefficient (0 logs the entropy only).")
    kl_mode: str = setting("none", "KL regularisation: none, loss (GRPO's KL loss term) or reward (PPO's "
                                   "penalty in the reward).", ("none", "loss", "reward"))
    kl_coef: float = setting(0.0, "KL coefficient.")
    kl_estimator: str = setting("k1", "KL estimator (GRPO uses k3).", ("k1", "k2", "k3"))
    uniform_groups: str = setting("keep", "Responses whose advantage is exactly 0 (e.g. GRPO's all-wrong and "
                                          "all-correct groups; docs/ALGORITHM.md §9). keep: train on them as OpenRLHF "
                                          "does (the entropy bonus and KL loss still act on them). mask-aux: leave "
                                          "their tokens out of the entropy and KL terms and their token counts. skip: "
                                          "no optimizer step for a mini-batch whose advantages are all 0.",
                                  UNIFORM_GROUPS)
    # -- sampling and filtering
    group_filter: str = setting("none", "Group filter, by the correctness of the responses: none, "
                                        "drop_all_correct (NGRPO), drop_all_correct_and_all_wrong (DAPO's dynamic "
                                        "sampling), drop_all_wrong, drop_non_ternary (UCPO: keep only groups with a "
                                        "correct and a wrong response). Dropped prompts are replaced until the batch "
                                        "is full.", GROUP_FILTERS)
    overlong_buffer: Optional[int] = setting(None, "DAPO's overlong reward shaping: a soft penalty over the last N "
                                                   "tokens of the response budget.")
    prompts_per_step: int = setting(1024, "Prompts per rollout (one training step).")
    samples_per_prompt: int = setting(8, "Responses sampled per prompt (the group size G).")
    mini_batch_prompts: int = setting(256, "Prompts per optimizer step; prompts_per_step / mini_batch_prompts "
                                           "optimizer steps per rollout (paper: 4).")
    ppo_epochs: int = setting(1, "Passes over each rollout.")
    episodes: int = setting(20, "Passes over the training prompts.")
    temperature: float = setting(1.0, "Rollout sampling temperature.")
    top_p: float = setting(1.0, "Rollout nucleus sampling top_p.")
    max_prompt_len: int = setting(1024, "Longest prompt in tokens.")
    max_response_len: int = setting(3072, "Longest response in tokens.")
    answer_extraction: str = setting("boxed", "How the reward finds the final answer: boxed (the last \\boxed{}, "
                                              "docs/ALGORITHM.md §6) or authors (the NGRPO authors' reward: last "
                                              "boxed, else the text after 'the answer is', else the last number).",
                                     ("boxed", "authors"))
    # -- optimisation
    lr: float = setting(1e-6, "Actor learning rate (constant after the warm-up).")
    lr_warmup_ratio: float = setting(0.0, "Share of steps of linear learning-rate warm-up.")
    weight_decay: float = setting(0.01, "AdamW weight decay of the actor.")
    adam_betas: Tuple[float, float] = setting((0.9, 0.999), "AdamW betas of the actor and critic (the authors'; "
                                                            "OpenRLHF's default is 0.9 0.95).")
    max_grad_norm: float = setting(1.0, "Gradient clipping norm.")
    critic_lr: float = setting(1e-5, "Critic learning rate, constant, no warm-up (PPO only).")
    critic_weight_decay: float = setting(0.01, "AdamW weight decay of the critic (PPO only).")
    # -- memory and speed knobs (they do not change the algorithm)
    micro_train_batch_size: int = setting(4, "Samples per forward/backward micro-batch on each GPU.")
    micro_rollout_batch_size: int = setting(8, "Samples per micro-batch when computing log-probs for experiences.")
    old_log_probs: str = setting("reuse-on-policy", "PPO's old log-probs. reuse-on-policy: when a rollout trains in "
                                                    "exactly one optimizer step, the training forward's own, detached "
                                                    "(the ratio is 1, as TRL's num_iterations=1), saving a policy "
                                                    "forward per step; otherwise a separate forward. forward: always "
                                                    "OpenRLHF's separate forward.", OLD_LOG_PROBS_MODES)
    zero_stage: int = setting(2, "DeepSpeed ZeRO stage.", (0, 1, 2, 3))
    gradient_checkpointing: bool = setting(False, "Recompute activations in the backward pass (less memory).")
    packing: Optional[bool] = setting(None, "Pack samples without padding, with dynamic batching by "
                                            "--max-tokens-per-gpu (needs flash-attn). Default: on GPU when a "
                                            "flash-attn matching the installed torch is present and "
                                            "--uniform-groups is keep, else off.")
    max_tokens_per_gpu: Optional[int] = setting(None, "With packing: tokens per GPU in a micro-batch (default 16384, "
                                                      "as OpenRLHF's 7B examples).")
    seed: int = setting(42, "Random seed (data order, sampling).")
    reproducible_rollouts: bool = setting(False, "The same rollouts in every launch with the same --seed: each "
                                                 "sample gets its own vLLM seed (from --seed, the prompt and the "
                                                 "sample's index) and a step's groups keep their dispatch order. "
                                                 "Off: OpenRLHF's sampling (one generator per engine, shared by the "
                                                 "running batch) and groups in the order they finish.")

    @classmethod
    def flag(cls, name: str) -> str:
        return "--" + name.replace("_", "-")

    def validate(self) -> "Recipe":
        """RecipeError naming the first flag out of range."""
        def fail(name, why):
            raise RecipeError(f"{self.flag(name)} {getattr(self, name)!r}: {why}")

        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                fail(f.name, f"choose one of {', '.join(map(str, choices))}")
        for name in ("eps_clip_low", "eps_clip_high"):
            if not 0.0 < getattr(self, name) < 1.0:
                fail(name, "must be in (0, 1): the clipped ratio range is [1 - eps_low, 1 + eps_high]")
        for name in ("prompts_per_step", "samples_per_prompt", "mini_batch_prompts", "ppo_epochs", "episodes",
                     "max_prompt_len", "max_response_len", "micro_train_batch_size", "micro_rollout_batch_size"):
            if getattr(self, name) < 1:
                fail(name, "must be >= 1")
        for name in ("lr", "critic_lr", "temperature", "max_grad_norm", "adv_eps"):
            if not getattr(self, name) > 0:
                fail(name, "must be > 0")
        for name in ("entropy_coef", "kl_coef", "weight_decay", "critic_weight_decay", "virtual_samples"):
            if getattr(self, name) < 0:
                fail(name, "must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            fail("top_p", "must be in (0, 1]")
        if not 0.0 <= self.lr_warmup_ratio < 1.0:
            fail("lr_warmup_ratio", "must be in [0, 1)")
        if self.estimator in GROUP_ESTIMATORS and self.samples_per_prompt < 2:
            fail("samples_per_prompt", f"the {self.estimator} estimator works on groups of responses to the same "
                                       "prompt: use at least 2 (the paper uses 8)")
        self._validate_abstention(fail)
        self._validate_sgpo(fail)
        if self.overlong_buffer and not 0 < self.overlong_buffer < self.max_response_len:
            fail("overlong_buffer", f"must be in [1, --max-response-len {self.max_response_len}): the penalty "
                                    "covers the last N tokens of the budget (0 turns it off)")
        if self.uniform_groups != "keep" and self.packing:
            fail("uniform_groups", "needs fixed micro-batches: OpenRLHF 0.11.2's dynamic batching (--packing) "
                                   "normalises each optimizer step by token counts it precomputes, which ngrpo does "
                                   "not recompute; leave --packing off or use --uniform-groups keep")
        if self.prompts_per_step % self.mini_batch_prompts:
            fail("mini_batch_prompts", f"must divide --prompts-per-step {self.prompts_per_step}")
        if self.max_tokens_per_gpu is not None and self.max_tokens_per_gpu < self.max_prompt_len + self.max_response_len:
            fail("max_tokens_per_gpu", f"must hold one whole sequence (>= {self.max_prompt_len + self.max_response_len})")
        return self

    def _validate_sgpo(self, fail) -> None:
        """SGPO's step judge (docs/ALGORITHM.md §10)."""
        if not self.graded_negatives:
            return
        # a missing --judge-url / --judge-model is refused by `ngrpo train` (a recipe without them is
        # still one to list, parse and size)
        if self.judge_url is not None and not str(self.judge_url).startswith(("http://", "https://")):
            fail("judge_url", "must be an http:// or https:// URL")
        if not self.judge_timeout > 0:
            fail("judge_timeout", "must be > 0")
        if self.judge_workers < 1:
            fail("judge_workers", "must be >= 1")
        if not 0.0 <= self.judge_max_fail_share <= 1.0:
            fail("judge_max_fail_share", "must be in [0, 1]")
        if self.group_filter in ("drop_all_wrong", "drop_all_correct_and_all_wrong", "drop_non_ternary"):
            fail("group_filter", "drops the all-wrong groups SGPO grades: use none or drop_all_correct")

    def _validate_abstention(self, fail) -> None:
        """Abstention and UCPO (docs/ALGORITHM.md §8)."""
        if self.uncertain_reward is not None and not 0.0 < self.uncertain_reward < self.max_reward:
            fail("uncertain_reward", f"must lie strictly between 0 (a wrong answer) and --max-reward {self.max_reward}, "
                                     "so that an uncertain response can be told from a correct and a wrong one")
        if self.ucpo_suppression_weight < 0:
            fail("ucpo_suppression_weight", "must be >= 0")
        if not any(p.strip() for p in str(self.abstention_phrases).split("|")):
            fail("abstention_phrases", "give at least one phrase (phrases are separated by |)")
        if self.estimator != "ucpo":
            return
        if self.uncertain_reward is None:
            fail("uncertain_reward", "the ucpo estimator recognises uncertain responses by this reward: set it, "
                                     "e.g. --uncertain-reward 0.2 (the ucpo recipe's value)")
        if self.samples_per_prompt < 3:
            fail("samples_per_prompt", "the ucpo estimator needs at least 3 responses per prompt (a correct, a wrong "
                                       "and an uncertain one); the UCPO paper uses 8")
        if self.overlong_buffer:
            fail("overlong_buffer", "the ucpo estimator classifies each response by its reward (correct, wrong, "
                                    "uncertain), and overlong shaping changes the reward before the estimator "
                                    "sees it: pass --overlong-buffer 0")


SETTINGS = tuple(f.name for f in dataclasses.fields(Recipe))

# DAPO's overlong buffer as the authors set it: 1024 tokens of a 3072-token budget, so the penalty
# starts at 2048. A third of the budget keeps that shape when the budget changes (a fixed 1024
# cannot even fit in a CPU run's 96 tokens); an explicit --overlong-buffer wins.
OVERLONG_THIRD = "a third of --max-response-len"

# docs/ALGORITHM.md §5: what each algorithm changes from the shared settings.
ALGO_SETTINGS = {
    "ngrpo": dict(estimator="ngrpo", eps_clip_low=0.16, eps_clip_high=0.24, group_filter="drop_all_correct"),
    "grpo": dict(estimator="group_norm", kl_mode="loss", kl_coef=0.001, kl_estimator="k3"),
    "dapo": dict(estimator="group_norm", eps_clip_high=0.28, group_filter="drop_all_correct_and_all_wrong",
                 overlong_buffer=OVERLONG_THIRD),
    "w_reinforce": dict(estimator="w_reinforce"),
    "psr": dict(estimator="psr"),
    "nsr": dict(estimator="nsr"),
    "ppo": dict(estimator="gae", kl_mode="reward", kl_coef=0.001, kl_estimator="k1"),
    "dr_grpo": dict(estimator="dr_grpo"),
    "rloo": dict(estimator="rloo"),
    # REINFORCE++ (Hu et al., arXiv 2501.03262; docs/ALGORITHM.md §5): OpenRLHF's estimators unchanged.
    # REINFORCE++ takes a token-level KL penalty in the reward; REINFORCE++-baseline a k2 KL loss.
    "reinforce_pp": dict(estimator="reinforce", kl_mode="reward", kl_coef=0.001, kl_estimator="k1"),
    "reinforce_pp_baseline": dict(estimator="reinforce_baseline", kl_mode="loss", kl_coef=0.001, kl_estimator="k2"),
    # UCPO (docs/ALGORITHM.md §8) and its baseline GRPO-UC: GRPO's settings (the UCPO paper's clip
    # and KL settings are not confirmed) with abstention offered. grpo_uc is GRPO (OpenRLHF's
    # group_norm) on rewards that give an abstention a fixed 0.2; ucpo uses the same reward only to
    # recognise uncertain responses, and drops groups without a correct and a wrong response.
    "grpo_uc": dict(estimator="group_norm", kl_mode="loss", kl_coef=0.001, kl_estimator="k3", uncertain_reward=0.2),
    "ucpo": dict(estimator="ucpo", kl_mode="loss", kl_coef=0.001, kl_estimator="k3", uncertain_reward=0.2,
                 group_filter="drop_non_ternary"),
    # SGPO (docs/ALGORITHM.md §10): GRPO's settings with graded rewards for all-wrong groups, on
    # ngrpo's grpo estimator (exactly 0 for a uniform group of any reward; OpenRLHF's group_norm
    # divides float noise by std + 1e-9 when a group's graded rewards are all equal).
    "sgpo": dict(estimator="grpo", kl_mode="loss", kl_coef=0.001, kl_estimator="k3", graded_negatives=True),
}
ALGOS = tuple(ALGO_SETTINGS)

# Small enough for a 2-core CPU and a tiny model: a few seconds of generation per step; the
# response budget holds the warm-up's longest worked solution.
CPU_TINY = dict(
    prompts_per_step=4, samples_per_prompt=4, mini_batch_prompts=4, episodes=1, max_prompt_len=128,
    max_response_len=WORKED_SOLUTION_TOKENS, micro_train_batch_size=4, micro_rollout_batch_size=4, lr=1e-4,
)
# The paper's algorithm as OpenRLHF runs 7B models on GPUs: ZeRO-3 and gradient checkpointing
# (packing and dynamic batching follow where flash-attn allows, pipelines/launch/gpu_run.py); micro-batch
# sizes are memory knobs, nothing of the algorithm changes.
PAPER = dict(zero_stage=3, gradient_checkpointing=True)
# The paper preset's shape at a tiny model's size, to run a GPU run's structure on a CPU
# (tests/test_paper_shape.py): only the sizes differ. 8 / 2 prompts are 4 optimizer steps per
# rollout, as 1024 / 256; ZeRO-3, gradient checkpointing, micro-batches, epochs, and each
# algorithm's clip, KL, entropy and filter settings are paper's. Validation is not a recipe
# setting: give a small set with --eval-data FILE --eval-every N.
PAPER_CPU = dict(PAPER, prompts_per_step=8, mini_batch_prompts=2, samples_per_prompt=4, max_prompt_len=128,
                 max_response_len=WORKED_SOLUTION_TOKENS, lr=1e-4)
PRESETS = {"paper": PAPER, "cpu-tiny": CPU_TINY, "paper-cpu": PAPER_CPU}


def build_recipe(algo: str, preset: str = "paper", overrides: Optional[dict] = None) -> Recipe:
    """Shared settings < preset < algorithm < OVERRIDES (None values are ignored), validated."""
    if algo not in ALGO_SETTINGS:
        raise RecipeError(f"unknown algorithm {algo!r}; choose one of {', '.join(ALGOS)}")
    if preset not in PRESETS:
        raise RecipeError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    values = {**PRESETS[preset], **ALGO_SETTINGS[algo]}
    for key, value in (overrides or {}).items():
        if key not in SETTINGS:
            raise RecipeError(f"unknown recipe setting {key!r}; valid settings: {', '.join(SETTINGS)}")
        if value is not None:
            values[key] = value
    if values.get("overlong_buffer") == OVERLONG_THIRD:
        values["overlong_buffer"] = values.get("max_response_len", Recipe.max_response_len) // 3
    if isinstance(values.get("adam_betas"), list):
        values["adam_betas"] = tuple(values["adam_betas"])
    return Recipe(**values).validate()


def algo_defaults(name: str) -> dict:
    """{algorithm: its default} for a setting whose default differs between algorithms (for --help)."""
    base = Recipe()
    return {algo: s[name] for algo, s in ALGO_SETTINGS.items() if name in s and s[name] != getattr(base, name)}
