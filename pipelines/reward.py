"""The reward file OpenRLHF 0.11.2 loads for every ngrpo run (docs/ALGORITHM.md §6); grading is pipelines/grading.py.

Default reward: 1.0 when the response's final answer (its last ``\\boxed{}``) is equivalent to the
label under math-verify, else 0.0. No format reward. With ``ngrpo train --reward-file FILE`` the
user's ``reward_func`` in FILE is called instead, through this file, so that its errors and bad
outputs reach the user (OpenRLHF itself logs a reward function's exception at INFO level and
trains on without a reward). It can also be used directly::

    --reward.remote_url /path/to/pipelines/reward.py

Contract with OpenRLHF 0.11.2: it imports this file by path with ``importlib``, as a module called
``reward_func`` outside any package (so imports here are absolute; ``pipelines`` is importable in
every Ray worker), and calls ``reward_func(queries, prompts, labels)`` from ``asyncio.to_thread``
threads inside its vLLM Ray actors, one query per call. ``queries`` are prompt + response decoded
with ``skip_special_tokens=False``. The return value is a dict of float32 tensors, one value per
query::

    {"rewards": tensor([...]), "scores": tensor([...]),
     "extra_logs": {"no_boxed_frac": tensor([...]), "grader_timeouts": tensor([...])}}

OpenRLHF logs each extra_logs value per sample and averages it, so the per-sample 0/1 indicators
become the share of responses without an answer and the share whose grading timed out.

Environment (set by ``ngrpo train``): ``NGRPO_ANSWER_EXTRACTION`` "boxed" (default) or "authors"
(pipelines.grading.extract_answer); ``NGRPO_USER_REWARD_FILE`` the user's reward file (and
``NGRPO_USER_REWARD_COPY`` its copy in Ray's working_dir, for nodes without the original);
``NGRPO_RUN_DIR`` where a failure of the user's function is written (logs/reward_error.txt).
"""
import functools
import importlib.util
import os
import sys
import threading
import traceback
from pathlib import Path

import torch

from pipelines.grading import grade_many, split_response

USER_REWARD_ENV = "NGRPO_USER_REWARD_FILE"
USER_REWARD_COPY_ENV = "NGRPO_USER_REWARD_COPY"
RUN_DIR_ENV = "NGRPO_RUN_DIR"
ERROR_FILE = Path("logs") / "reward_error.txt"
_error_lock = threading.Lock()


def reward_func(queries, prompts, labels, **kwargs):
    """OpenRLHF's entry: the user's reward function when there is one, else ngrpo's math-verify reward."""
    user_file = os.environ.get(USER_REWARD_ENV)
    if user_file:
        if not os.path.exists(user_file):  # another node of a cluster: the copy shipped in Ray's working_dir
            user_file = os.path.abspath(os.environ.get(USER_REWARD_COPY_ENV, user_file))
        return _call_user_reward(user_file, queries, prompts, labels, **kwargs)
    return math_verify_reward(queries, prompts, labels)


def math_verify_reward(queries, prompts, labels):
    """1.0 if the response's answer is equivalent to the label, else 0.0."""
    queries = list(queries)
    prompts = list(prompts) if prompts is not None else [None] * len(queries)
    labels = list(labels) if labels is not None else [None] * len(queries)
    if not (len(queries) == len(prompts) == len(labels)):
        raise ValueError(f"reward_func: {len(queries)} queries, {len(prompts)} prompts, {len(labels)} labels")
    responses = [split_response(q, p) for q, p in zip(queries, prompts)]
    golds = ["" if label is None else str(label) for label in labels]
    results = grade_many(responses, golds, extraction=os.environ.get("NGRPO_ANSWER_EXTRACTION", "boxed"))
    rewards = _floats([r.correct for r in results])
    return {
        "rewards": rewards,
        "scores": rewards.clone(),
        "extra_logs": {
            "no_boxed_frac": _floats([r.extracted is None for r in results]),
            "grader_timeouts": _floats([r.timed_out for r in results]),
        },
    }


def _floats(flags):
    return torch.tensor([1.0 if f else 0.0 for f in flags], dtype=torch.float32)


@functools.lru_cache(maxsize=None)
def _load_user_reward(path: str):
    spec = importlib.util.spec_from_file_location("ngrpo_user_reward", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "reward_func", None)):
        raise AttributeError(f"{path} defines no function reward_func(queries, prompts, labels)")
    return module.reward_func


def _check_output(out, n: int) -> None:
    """The user's return value as OpenRLHF needs it: {"rewards": n numbers, ...}."""
    if not isinstance(out, dict) or "rewards" not in out:
        raise TypeError(f"reward_func returned {type(out).__name__}, expected a dict with a 'rewards' tensor")
    size = len(out["rewards"]) if hasattr(out["rewards"], "__len__") else None
    if size != n:
        raise ValueError(f"reward_func returned {size} rewards for {n} queries")


def _call_user_reward(path, queries, prompts, labels, **kwargs):
    try:
        out = _load_user_reward(path)(queries, prompts, labels, **kwargs)
        _check_output(out, len(queries))
        return out
    except Exception:
        record_error(path)
        raise


def record_error(path) -> None:
    """Write the user's traceback to RUN_DIR/logs/reward_error.txt (first failure only) and stderr:
    the trainer puts it into the run's error, which the CLI shows first."""
    text = f"the reward function in {path} failed:\n{traceback.format_exc()}"
    print(text, file=sys.stderr, flush=True)
    run_dir = os.environ.get(RUN_DIR_ENV)
    if run_dir:
        target = Path(run_dir) / ERROR_FILE
        with _error_lock:
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(text)


def recorded_error(run_dir) -> str:
    """The first failure of the user's reward function in RUN_DIR's launch, or ''."""
    path = Path(run_dir or "") / ERROR_FILE
    return path.read_text() if run_dir and path.exists() else ""
