"""The NGRPO training reward as an OpenRLHF 0.11.2 reward file (SPEC §6); grading is pipelines/grading.py.

Reward: 1.0 when the response's final answer (its last ``\\boxed{}``) is equivalent to the label
under math-verify, else 0.0. No format reward. Use it as::

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

``NGRPO_ANSWER_EXTRACTION`` (set by ``ngrpo train``) picks how the answer is found: "boxed"
(default) or "authors" (see pipelines.grading.extract_answer).
"""
import os

import torch

from pipelines.grading import grade_many, split_response


def reward_func(queries, prompts, labels, **kwargs):
    """OpenRLHF custom reward: 1.0 if the response's answer is equivalent to the label, else 0.0."""
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
