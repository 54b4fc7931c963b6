"""Shared fixtures. Expensive artefacts (tiny model, training runs) are session-scoped."""
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The read-only benchmark data beside the checkout (../shared/data); never copied into the repo."""
    path = Path(os.environ.get("NGRPO_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
    if not (path / "math500" / "test.jsonl").exists():
        pytest.fail(f"benchmark data not found at {path} (set NGRPO_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random-init Qwen2 model + tokenizer saved with save_pretrained (built once per session)."""
    from pipelines.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_model") / "model", seed=0)
