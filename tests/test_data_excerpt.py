"""The benchmark excerpt in tests/fixtures/data, and `make test` on a clone without ../shared.

The excerpt must be exactly what tests/fixtures/make_data_excerpt.py takes from the full data
(when that is here), and the tests that need the full files must skip, in one line each, where it
is absent, while the rest pass: a nested pytest run with NGRPO_SHARED_DATA pointing nowhere shows it.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_EXCERPT = REPO_ROOT / "tests" / "fixtures" / "data"  # as conftest.py's data_layout_dir

sys.path.insert(0, str(DATA_EXCERPT.parent))
import make_data_excerpt  # noqa: E402


def test_the_excerpt_is_small_and_has_every_benchmark_file():
    files = sorted(str(p.relative_to(DATA_EXCERPT)) for p in DATA_EXCERPT.rglob("*") if p.is_file())
    assert files == sorted(make_data_excerpt.ROWS)
    assert sum(p.stat().st_size for p in DATA_EXCERPT.rglob("*") if p.is_file()) <= 200_000


def test_the_excerpt_is_the_first_rows_of_the_full_data(shared_data_dir, tmp_path):
    make_data_excerpt.write(shared_data_dir, tmp_path)
    for rel in make_data_excerpt.ROWS:
        if rel.endswith(".jsonl"):
            assert (DATA_EXCERPT / rel).read_bytes() == (tmp_path / rel).read_bytes(), rel
        else:
            assert pq.read_table(DATA_EXCERPT / rel).to_pylist() == pq.read_table(tmp_path / rel).to_pylist(), rel
    overlap = pq.read_table(DATA_EXCERPT / "math/test.parquet").to_pylist()
    m500 = (DATA_EXCERPT / "math500/test.jsonl").read_text()
    assert any(r["reward_model"]["ground_truth"]["question"].strip()[:60] in m500 for r in overlap)


# the modules whose tests use the full data, run without it (their quick tests only)
NO_DATA_MODULES = ["tests/test_prepare_data.py", "tests/test_fidelity.py", "tests/test_reward.py",
                   "tests/test_data_excerpt.py"]


@pytest.mark.slow
def test_tests_pass_without_the_full_data(tmp_path):
    env = {**os.environ, "NGRPO_SHARED_DATA": str(tmp_path / "no-data-here")}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-m",
                           "not pipeline and not slow and not real_model", *NO_DATA_MODULES],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1200)
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:]
    summary = out.strip().splitlines()[-1]
    skipped = int(re.search(r"(\d+) skipped", summary).group(1))
    assert int(re.search(r"(\d+) passed", summary).group(1)) > 0 and skipped > 0
    reasons = [line for line in out.splitlines() if line.startswith("SKIPPED")]
    expected = f"needs the full benchmark data, not found at {tmp_path / 'no-data-here'} (set NGRPO_SHARED_DATA)"
    assert sum(int(re.match(r"SKIPPED \[(\d+)\]", r).group(1)) for r in reasons if expected in r) == skipped
    assert "error" not in summary
