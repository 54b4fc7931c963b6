"""The GPU check kit: skipped as a whole where torch has no CUDA device (see README.md here)."""
import pytest


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if _cuda():
        return
    skip = pytest.mark.skip(reason="GPU kit: no CUDA device here (run it on a GPU machine, tests/gpu/README.md)")
    for item in items:
        if "/tests/gpu/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def openrlhf_models():
    """openrlhf.models with ngrpo's flash_attn import stub where flash-attn is missing."""
    from openrlhf_patch.cpu.cpu_mode import ensure_flash_attn_importable

    ensure_flash_attn_importable()
    import openrlhf.models

    return openrlhf.models
