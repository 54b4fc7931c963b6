"""Shared fixtures. Expensive artefacts (tiny model, training runs) are session-scoped.

The Hugging Face Hub is never reachable from tests: HF_HUB_OFFLINE=1, and HF_HUB_CACHE points
at a session folder, set here before anything imports huggingface_hub (it reads both once).
`hub_model` puts the tiny model into that cache under a real Hub id.
"""
import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
if "HF_HUB_CACHE" not in os.environ:
    os.environ["HF_HUB_CACHE"] = tempfile.mkdtemp(prefix="ngrpo-test-hf-cache-")
    atexit.register(shutil.rmtree, os.environ["HF_HUB_CACHE"], ignore_errors=True)  # the session's, not /tmp's

REPO_ROOT = Path(__file__).resolve().parents[1]
HUB_ID = "Qwen/Qwen2.5-Math-7B"  # the used-by command's model, here a tiny stand-in in the local cache


SHARED_DATA = Path(os.environ.get("NGRPO_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
# A few rows of each benchmark file in its own layout (tests/fixtures/make_data_excerpt.py).
DATA_EXCERPT = REPO_ROOT / "tests" / "fixtures" / "data"


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The full read-only benchmark data beside the checkout (../shared/data; never copied into the
    repo), for tests of the full files. Absent (a fresh clone), those tests skip; CI has it."""
    if not (SHARED_DATA / "math500" / "test.jsonl").exists():
        pytest.skip(f"needs the full benchmark data, not found at {SHARED_DATA} (set NGRPO_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def data_layout_dir() -> Path:
    """The committed excerpt of every benchmark file (first rows, same layout): for tests that only
    need the files' layout, so they pass on a clone without ../shared."""
    return DATA_EXCERPT


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random-init Qwen2 model + tokenizer saved with save_pretrained (built once per session)."""
    from pipelines.launch.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_model") / "model", seed=0)


def put_in_hub_cache(model_dir: Path, repo_id: str, cache: Path, revision: str = "0" * 40) -> Path:
    """MODEL_DIR's files as snapshot REVISION of REPO_ID in a Hugging Face cache laid out as
    huggingface_hub writes it (models--OWNER--NAME/refs/main -> snapshots/REVISION/)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    if snapshot.exists():
        shutil.rmtree(snapshot)
    shutil.copytree(model_dir, snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


@pytest.fixture(scope="session")
def hub_model(tiny_model_dir) -> str:
    """HUB_ID, resolvable offline from the test session's Hugging Face cache."""
    put_in_hub_cache(tiny_model_dir, HUB_ID, Path(os.environ["HF_HUB_CACHE"]))
    return HUB_ID


@pytest.fixture
def layout_args():
    """The parts of OpenRLHF's parsed arguments that `training.ray_init_kwargs` reads: one actor
    GPU, one vLLM engine, no reference model or critic, 4 prompts x 8 samples a rollout."""
    from types import SimpleNamespace

    return SimpleNamespace(actor=SimpleNamespace(num_nodes=1, num_gpus_per_node=1),
                           vllm=SimpleNamespace(num_engines=1, tensor_parallel_size=1),
                           algo=SimpleNamespace(kl=SimpleNamespace(init_coef=0)),
                           critic=SimpleNamespace(model_name_or_path=None),
                           rollout=SimpleNamespace(batch_size=4, n_samples_per_prompt=8))


@pytest.fixture
def problems(tmp_path) -> Path:
    """Eight one-line sums as a problems JSONL (id, problem, answer): a small valid --data / --benchmarks file."""
    path = tmp_path / "problems.jsonl"
    path.write_text("".join(json.dumps({"id": str(i), "problem": f"What is {i}+1?", "answer": str(i + 1)}) + "\n"
                            for i in range(8)))
    return path
