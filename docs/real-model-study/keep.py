"""Keep the study's results in the repository, and put them back into a study folder.

    python docs/real-model-study/keep.py save OUT_DIR      OUT_DIR -> docs/real-model-study/results/
    python docs/real-model-study/keep.py restore OUT_DIR   docs/real-model-study/results/ -> OUT_DIR

The study takes longer than one working session on 2 cores, and a machine that is handed back keeps
only what git holds. `save` copies what the study's tables and figures are made of (study.json, the
data, each evaluation's summary and per-question samples, each finished run's manifest, step metrics
and per-prompt records, study.md and the figures); it leaves out models, checkpoints and logs, and
runs that are not finished (the study trains those again from the start). `restore` copies the kept
files into OUT_DIR where they are missing, so that `command.sh OUT_DIR` skips the finished runs.
OUT_DIR must be the same path on both sides: study.json records the data's absolute paths.
"""
import json
import shutil
import sys
from pathlib import Path

KEPT = Path(__file__).resolve().parent / "results"
HEAVY = {"final_model", "checkpoints", "logs"}  # folder names never kept


def _finished_runs(regime_dir: Path) -> set:
    state = json.loads((regime_dir / "study.json").read_text())
    return {name for name, entry in state["runs"].items() if entry["status"] == "finished"}


def _kept_files(out: Path):
    """(path relative to OUT_DIR) of every file worth keeping."""
    yield from (p.relative_to(out) for p in sorted((out / "data").glob("*.jsonl")))
    for regime_dir in sorted(p.parent for p in out.glob("*/study.json")):
        finished = _finished_runs(regime_dir)
        for path in sorted(regime_dir.rglob("*")):
            rel = path.relative_to(regime_dir)
            if not path.is_file() or HEAVY & set(rel.parts) or ".tmp-" in path.name or path.name.startswith(".lock"):
                continue
            if rel.parts[0] == "runs" and rel.parts[1] not in finished:
                continue
            yield path.relative_to(out)


def save(out: Path) -> None:
    files = list(_kept_files(out))
    shutil.rmtree(KEPT, ignore_errors=True)
    for rel in files:
        (KEPT / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(out / rel, KEPT / rel)
    size = sum((KEPT / rel).stat().st_size for rel in files)
    print(f"kept {len(files)} files ({size / 1e6:.1f} MB) in {KEPT}")


def restore(out: Path) -> None:
    if not KEPT.is_dir():
        sys.exit(f"nothing kept in {KEPT}")
    copied = 0
    for path in sorted(KEPT.rglob("*")):
        target = out / path.relative_to(KEPT)
        if path.is_file() and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
            copied += 1
    print(f"restored {copied} files into {out}")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("save", "restore"):
        sys.exit(__doc__)
    {"save": save, "restore": restore}[sys.argv[1]](Path(sys.argv[2]).resolve())
