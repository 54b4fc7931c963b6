"""The reward file OpenRLHF 0.11.2 loads for every ngrpo run (docs/ALGORITHM.md §6); grading is pipelines/datasets/grading.py.

Default reward: 1.0 when the response's final answer (its last ``\\boxed{}``) is equivalent to the
label under math-verify, else 0.0. No format reward. With abstention (a run whose recipe sets
``uncertain_reward``, UCPO and GRPO-UC, docs/ALGORITHM.md §8) a response whose final boxed answer is
an abstention phrase (pipelines/datasets/abstention.py) gets ``uncertain_reward`` instead, decided
before math-verify runs, and is not graded. With ``ngrpo train --reward-file FILE`` the
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
     # with abstention also "uncertain_frac": 1 for an abstention

OpenRLHF logs each extra_logs value per sample and averages it, so the per-sample 0/1 indicators
become the share of responses without an answer and the share whose grading timed out.

Environment (set by ``ngrpo train``): ``NGRPO_ANSWER_EXTRACTION`` "boxed" (default) or "authors"
(pipelines.datasets.grading.extract_answer); ``NGRPO_USER_REWARD_FILE`` the user's reward file (and
``NGRPO_USER_REWARD_COPY`` its copy in Ray's working_dir, for nodes without the original);
``NGRPO_RUN_DIR`` where a failure of the user's function is written (logs/reward_error.txt);
``NGRPO_PATCH_CONFIG`` (openrlhf_patch/config.py, in every Ray worker) whose estimator options
``uncertain_reward`` and ``abstention_phrases`` turn abstention on.

A failing user function is logged once per process with its traceback (a deep one cut to its
first and last frames); the same error again is only counted, in a line at the 10th, 100th, ...
time. A reward_func that calls ngrpo's entry (this module's reward_func), which calls it again,
is stopped at once with an error that says so: before, every level of that recursion printed
its traceback, 600 MB of run log and 430 MB of Ray logs in under two minutes.
"""
import functools
import importlib.util
import json
import os
import sys
import threading
import traceback
from pathlib import Path

import torch

from openrlhf_patch.reward_checks import REWARD_ERROR_FILE
from pipelines.datasets.abstention import abstentions
from pipelines.datasets.grading import grade_many, split_response

USER_REWARD_ENV = "NGRPO_USER_REWARD_FILE"
USER_REWARD_COPY_ENV = "NGRPO_USER_REWARD_COPY"
RUN_DIR_ENV = "NGRPO_RUN_DIR"
ERROR_FILE = Path(REWARD_ERROR_FILE)
_error_lock = threading.Lock()


def reward_func(queries, prompts, labels, **kwargs):
    """OpenRLHF's entry: the user's reward function when there is one, else ngrpo's math-verify reward."""
    user_file = os.environ.get(USER_REWARD_ENV)
    if user_file:
        if not os.path.exists(user_file):  # another node of a cluster: the copy shipped in Ray's working_dir
            user_file = os.path.abspath(os.environ.get(USER_REWARD_COPY_ENV, user_file))
        return _call_user_reward(user_file, queries, prompts, labels, **kwargs)
    return math_verify_reward(queries, prompts, labels)


def abstention_settings(environ=os.environ):
    """(uncertain_reward, abstention_phrases) of this run's estimator options (NGRPO_PATCH_CONFIG),
    or None when the run has no abstention (no uncertain_reward, or no patch config at all)."""
    from openrlhf_patch.config import ENV_VAR

    raw = environ.get(ENV_VAR)
    options = (json.loads(raw).get("estimator_options") or {}) if raw else {}
    if options.get("uncertain_reward") is None:
        return None
    from openrlhf_patch.algorithms import ESTIMATOR_OPTIONS

    return float(options["uncertain_reward"]), options.get("abstention_phrases",
                                                           ESTIMATOR_OPTIONS["abstention_phrases"][0])


def math_verify_reward(queries, prompts, labels, abstention=None):
    """1.0 if the response's answer is equivalent to the label, else 0.0. With ABSTENTION
    (uncertain_reward, phrases), default `abstention_settings()`, a response whose final boxed
    answer is an abstention phrase gets uncertain_reward and is not graded."""
    queries = list(queries)
    prompts = list(prompts) if prompts is not None else [None] * len(queries)
    labels = list(labels) if labels is not None else [None] * len(queries)
    if not (len(queries) == len(prompts) == len(labels)):
        raise ValueError(f"reward_func: {len(queries)} queries, {len(prompts)} prompts, {len(labels)} labels")
    responses = [split_response(q, p) for q, p in zip(queries, prompts)]
    golds = ["" if label is None else str(label) for label in labels]
    abstention = abstention_settings() if abstention is None else abstention
    # Abstentions first: they are never graded (their gold could even be "unknown").
    uncertain = abstentions(responses, abstention[1]) if abstention else [False] * len(responses)
    graded = [i for i, u in enumerate(uncertain) if not u]
    results = dict(zip(graded, grade_many([responses[i] for i in graded], [golds[i] for i in graded],
                                          extraction=os.environ.get("NGRPO_ANSWER_EXTRACTION", "boxed"))))
    values = [abstention[0] if u else (1.0 if results[i].correct else 0.0) for i, u in enumerate(uncertain)]
    rewards = torch.tensor(values, dtype=torch.float32)
    extra_logs = {
        "no_boxed_frac": _floats([not u and results[i].extracted is None for i, u in enumerate(uncertain)]),
        "grader_timeouts": _floats([not u and results[i].timed_out for i, u in enumerate(uncertain)]),
    }
    if abstention:
        extra_logs["uncertain_frac"] = _floats(uncertain)
    return {"rewards": rewards, "scores": rewards.clone(), "extra_logs": extra_logs}


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


_calls = threading.local()  # is this thread inside the user's reward_func (its re-entry is endless recursion)
_seen = {}                  # (exception type, where it was raised) -> times this process saw it
TRACEBACK_HEAD, TRACEBACK_TAIL = 8, 4  # frames kept of a longer traceback


def _call_user_reward(path, queries, prompts, labels, **kwargs):
    if getattr(_calls, "inside", False):
        raise RecursionError(
            f"reward_func in {path} calls ngrpo's reward entry (pipelines.reward.reward_func), which calls it "
            "again: endless recursion. For ngrpo's own reward, call pipelines.reward.math_verify_reward")
    _calls.inside = True
    try:
        out = _load_user_reward(path)(queries, prompts, labels, **kwargs)
        _check_output(out, len(queries))
        return out
    except Exception:
        record_error(path)
        raise
    finally:
        _calls.inside = False


def format_error(exc: BaseException, head: int = TRACEBACK_HEAD, tail: int = TRACEBACK_TAIL) -> str:
    """EXC's traceback as Python prints it, each stack of more than HEAD + TAIL frames cut to its
    first HEAD and last TAIL (a recursion has ~1,000)."""
    out, frames = [], []

    def flush():
        if len(frames) > head + tail + 1:
            frames[head:len(frames) - tail] = [f"  ... {len(frames) - head - tail} frames left out ...\n"]
        out.extend(frames)
        frames.clear()

    for chunk in traceback.TracebackException.from_exception(exc).format():
        if chunk.startswith(("  File ", "  [Previous line repeated")):
            frames.append(chunk)
        else:
            flush()
            out.append(chunk)
    flush()
    return "".join(out)


def _where(exc: BaseException) -> tuple:
    """The exception's type and the places of its traceback: what makes two failures the same."""
    frames = traceback.extract_tb(exc.__traceback__)
    return (type(exc).__qualname__, tuple((f.filename, f.lineno) for f in frames[:TRACEBACK_HEAD]),
            tuple((f.filename, f.lineno) for f in frames[-TRACEBACK_TAIL:]))


def record_error(path) -> None:
    """Write the user's traceback to RUN_DIR/logs/reward_error.txt (first failure only) and stderr:
    the trainer puts it into the run's error, which the CLI shows first. The same error again (same
    type, raised at the same place) is counted, not printed: a line at its 10th, 100th, ... time."""
    exc = sys.exc_info()[1]
    key = _where(exc)
    with _error_lock:
        seen = _seen[key] = _seen.get(key, 0) + 1
    if seen > 1:
        if seen in (10, 100, 1000) or seen % 10_000 == 0:
            print(f"[ngrpo] the reward function in {path} failed again the same way ({type(exc).__name__}): "
                  f"{seen} times so far in this process", file=sys.stderr, flush=True)
        return
    text = f"the reward function in {path} failed:\n{format_error(exc)}"
    print(text, file=sys.stderr, flush=True)
    run_dir = os.environ.get(RUN_DIR_ENV)
    if run_dir:
        target = Path(run_dir) / ERROR_FILE
        with _error_lock:
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(text)
