"""RUN_DIR/groups.jsonl: one line per prompt group per training step, kept or dropped by the
group filter (written by sampling.wrap_generate_samples, in the PPOTrainer process).

    {"step": 3, "prompt_id": "17", "id_from": "row", "correct": 2, "n": 4, "mean_reward": 0.5,
     "kept": true, "tokens": 311}

`prompt_id` is the training row's `id` (RUN_DIR/data/train.jsonl) when the prompt text names
exactly one row there (`id_from: "row"`); OpenRLHF hands the workers only the prompt text and
its label, so otherwise it is a stable hash of the prompt text (`id_from: "hash"`,
`sha256:` + 16 hex digits). `correct` counts responses with reward >= max_reward. Pure stdlib.
"""
import hashlib
import json
import os
from typing import Dict, Iterable, List, Optional

GROUPS_FILE = "groups.jsonl"
TRAIN_DATA = os.path.join("data", "train.jsonl")  # pipelines.launch.rundir.TRAIN_DATA


def prompt_hash(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def row_ids(run_dir: Optional[str]) -> Dict[str, str]:
    """{prompt text: row id} of RUN_DIR/data/train.jsonl; a prompt text of several rows is left out."""
    path = os.path.join(run_dir or "", TRAIN_DATA)
    ids, ambiguous = {}, set()
    if not run_dir or not os.path.exists(path):
        return ids
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            prompt, rid = row.get("prompt"), row.get("id")
            if not isinstance(prompt, str) or rid is None:
                continue
            if prompt in ids and ids[prompt] != str(rid):
                ambiguous.add(prompt)
            ids[prompt] = str(rid)
    return {p: i for p, i in ids.items() if p not in ambiguous}


def group_record(step: int, prompt: str, rewards: List[float], max_reward: float, kept: bool, tokens: int,
                 ids: Dict[str, str]) -> dict:
    rid = ids.get(prompt)
    n = len(rewards)
    return {"step": step, "prompt_id": rid if rid is not None else prompt_hash(prompt),
            "id_from": "row" if rid is not None else "hash",
            "correct": sum(1 for r in rewards if r >= max_reward), "n": n,
            "mean_reward": sum(rewards) / n if n else 0.0, "kept": bool(kept), "tokens": int(tokens)}


def append_records(run_dir: Optional[str], records: Iterable[dict]) -> None:
    lines = "".join(json.dumps(r) + "\n" for r in records)
    if run_dir and lines:
        with open(os.path.join(run_dir, GROUPS_FILE), "a") as f:
            f.write(lines)
