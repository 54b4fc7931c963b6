"""The run directory of `ngrpo train`: its layout, its manifest, and how its logs are read.

    ngrpo_run.json      manifest: model, algorithm, resolved recipe, OpenRLHF argv, patch config, status
    .ngrpo_run.json.spare  64 KiB kept free for the manifest's last word on a full disk (write_manifest)
    data/train.jsonl    the training prompts, with the full chat prompt the model sees, and answers
    data/eval.jsonl     the in-training validation prompts (with --eval-data)
    checkpoints/        DeepSpeed checkpoints (OpenRLHF's ckpt.path; `_actor/global_stepN`, `latest`)
    final_model/        the trained policy as a Hugging Face folder (OpenRLHF's ckpt.output_dir)
    metrics.jsonl       one JSON line of metrics per logged training step
    eval_metrics.jsonl  one JSON line per in-training validation
    progress.json       the training steps completed so far (written by the trainer actor)
    heartbeat.json      the stage a step is in, rewritten as it moves (the stall watchdog's, pipelines/launch/watchdog.py)
    logs/               the full Ray, vLLM and DeepSpeed output of each launch
    reward_file.py      the copy of a user's --reward-file made at launch (what a resume runs)
    eval/               `ngrpo eval` of the final model (its default output folder)

Every reader of these files lives here, with one policy for damaged JSON lines (read_jsonl).
"""
import contextlib
import dataclasses
import errno
import json
import os
import time
from pathlib import Path
from typing import List, Optional, Tuple

MANIFEST = "ngrpo_run.json"
TRAIN_DATA = Path("data") / "train.jsonl"
EVAL_DATA = Path("data") / "eval.jsonl"
CHECKPOINTS = "checkpoints"
FINAL_MODEL = "final_model"
METRICS = "metrics.jsonl"
EVAL_METRICS = "eval_metrics.jsonl"
PROGRESS = "progress.json"
GROUPS = "groups.jsonl"     # one line per prompt group per step (openrlhf_patch/group_log.py)
LOGS = "logs"
EVAL_DIR = "eval"
REWARD_COPY = "reward_file.py"
# Paths inside the run directory are stored in the manifest with this prefix, so that a copied
# or moved run directory resumes into itself (pipelines.launch.training substitutes it at launch).
RUN_DIR_TOKEN = "${RUN_DIR}"


class RunDirError(Exception):
    """A run directory that cannot be read; the message names the file."""


def is_run_dir(path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def find_run_dir(path, levels: int = 3) -> Optional[Path]:
    """The run directory PATH belongs to: PATH itself, or the run whose final_model/ or
    checkpoints/ (or a folder in them) PATH is."""
    path = Path(path)
    if is_run_dir(path):
        return path
    for candidate in list(path.parents)[:levels]:
        if is_run_dir(candidate):
            first = path.relative_to(candidate).parts[0]
            return candidate if first in (FINAL_MODEL, CHECKPOINTS) else None
    return None


def read_manifest(run_dir) -> dict:
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        raise RunDirError(f"{run_dir} is not an ngrpo run directory: {path} is missing")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as err:
        raise RunDirError(f"{path} is not a readable run manifest: {err}") from None
    if not isinstance(manifest, dict):
        raise RunDirError(f"{path} is not a readable run manifest: expected a JSON object")
    return manifest


MANIFEST_SPARE = f".{MANIFEST}.spare"
SPARE_BYTES = 64 * 1024
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def write_manifest(run_dir, manifest: dict) -> None:
    """Atomically (a reader never sees half a manifest), and on a full disk too, where the status
    it records matters most. Each run keeps a spare file of SPARE_BYTES beside its manifest
    (MANIFEST_SPARE, made again by any later write that has room); when the disk has no room for
    the new manifest the spare is given up for it. Where even that fails (no spare, or another
    process took the room first) the new text overwrites the old manifest in place if it fits in
    the blocks the old one already holds, which needs no new block; else the error is raised.
    No temporary file is left behind."""
    run_dir = Path(run_dir)
    path = run_dir / MANIFEST
    text = json.dumps(manifest, indent=2, default=str)
    try:
        _replace(path, text)
    except OSError as err:
        if err.errno not in NO_SPACE:
            raise
        spare = run_dir / MANIFEST_SPARE
        try:
            if spare.exists():
                spare.unlink()
                _replace(path, text)
                return
        except OSError as again:
            if again.errno not in NO_SPACE:
                raise
        if not _overwrite_in_place(path, text.encode()):
            raise
    else:
        _keep_spare(run_dir / MANIFEST_SPARE)


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _overwrite_in_place(path: Path, data: bytes) -> bool:
    """DATA over PATH's bytes where it fits in the blocks PATH holds (no block to allocate)."""
    try:
        if len(data) > os.stat(path).st_blocks * 512:
            return False
        with open(path, "r+b") as f:
            f.write(data)
            f.truncate(len(data))
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        return False
    return True


def _keep_spare(spare: Path) -> None:
    try:
        if spare.stat().st_size >= SPARE_BYTES:
            return
    except FileNotFoundError:
        pass
    except OSError:
        return
    try:
        with open(spare, "wb") as f:
            # written bytes hold real blocks (a sparse or compressed file would free nothing)
            f.write(os.urandom(SPARE_BYTES))
    except OSError:
        with contextlib.suppress(OSError):
            spare.unlink()


class BadLine(ValueError):
    """A JSON-lines line that is not a JSON value; its message says why. `torn` marks a last line
    without its newline: a write cut off by a kill, or still in progress."""

    def __init__(self, message: str, torn: bool = False):
        super().__init__(message)
        self.torn = torn


def iter_jsonl(path):
    """(1-based line number, value or BadLine) for each non-blank line of a JSON-lines file.

    The reader of the JSON lines ngrpo writes (users' data files go through pipelines.datasets.data's
    `_iter_jsonl_bytes`, which follows the same line rules and adds UTF-8, depth and byte-order-mark
    checks; folding the two into one is left to do). A last line
    without its newline counts when it parses (files often lack a final newline); otherwise it is
    a torn BadLine, which readers of ngrpo's own logs skip quietly and readers of user data
    report. Every other line that does not parse is a BadLine, and nothing after it is lost."""
    lines = Path(path).read_bytes().split(b"\n")
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            yield number, json.loads(raw)
        except ValueError as err:
            torn = number == len(lines)
            why = "line cut off (no newline after it)" if torn else f"invalid JSON ({getattr(err, 'msg', err)})"
            yield number, BadLine(why, torn=torn)


@dataclasses.dataclass
class JsonlRows:
    rows: List[dict]
    bad_lines: List[Tuple[int, str]]  # (1-based line number, why)

    def describe_bad(self, path) -> str:
        shown = ", ".join(f"line {n}: {why}" for n, why in self.bad_lines[:3])
        more = f" and {len(self.bad_lines) - 3} more" if len(self.bad_lines) > 3 else ""
        return f"{path}: skipped {len(self.bad_lines)} unreadable line(s) ({shown}{more})"


def read_jsonl(path) -> JsonlRows:
    """The JSON objects of a JSON-lines file ngrpo writes (iter_jsonl; a torn last line is skipped
    quietly, other bad lines are listed in bad_lines). A missing file reads as empty."""
    rows, bad = [], []
    if Path(path).exists():
        for number, value in iter_jsonl(path):
            if isinstance(value, dict):
                rows.append(value)
            elif not (isinstance(value, BadLine) and value.torn):
                bad.append((number, str(value) if isinstance(value, BadLine) else "not a JSON object"))
    return JsonlRows(rows, bad)


def read_step_log(path) -> JsonlRows:
    """metrics.jsonl / eval_metrics.jsonl as rows sorted by step; for a repeated step (a resumed
    run logs again from its checkpoint) the last row wins. Rows without a step are bad lines."""
    read = read_jsonl(path)
    by_step, bad = {}, list(read.bad_lines)
    for row in read.rows:
        if isinstance(row.get("step"), int):
            by_step[row["step"]] = row
        else:
            bad.append((0, "no integer \"step\""))
    return JsonlRows([by_step[s] for s in sorted(by_step)], bad)


def checkpoint_step(run_dir) -> int:
    """The step of the DeepSpeed checkpoint OpenRLHF resumes from (its `latest` tag), 0 if none."""
    latest = Path(run_dir) / CHECKPOINTS / "_actor" / "latest"
    if not latest.exists():
        return 0
    tag = latest.read_text().strip()
    if not tag.startswith("global_step") or not tag[len("global_step"):].isdigit():
        raise RunDirError(f"{latest}: unexpected checkpoint tag {tag!r} (expected global_stepN)")
    return int(tag[len("global_step"):])


def truncate_step_log(path, step: int) -> None:
    """Forget logged steps after STEP (a resumed run repeats them from its checkpoint)."""
    path = Path(path)
    if path.exists():
        kept = [r for r in read_jsonl(path).rows if isinstance(r.get("step"), int) and r["step"] <= step]
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, path)


def completed_steps(run_dir) -> int:
    """Training steps completed: the trainer's progress.json, else the last logged step."""
    progress = Path(run_dir) / PROGRESS
    try:
        return int(json.loads(progress.read_text())["completed_steps"])
    except (OSError, ValueError, KeyError, TypeError):
        rows = read_step_log(Path(run_dir) / METRICS).rows
        return rows[-1]["step"] if rows else 0


# ---------------------------------------------------------------------------------------------
# Ownership: one live `ngrpo train` per run directory
# ---------------------------------------------------------------------------------------------
LOCK = ".lock"


class RunDirBusy(RunDirError):
    """Another live process owns the run directory."""


class RunLock:
    """An exclusive fcntl lock on RUN_DIR/.lock, held for a launch, with the owner's pid and host.

    The kernel drops the lock when its process dies, even by SIGKILL, so a lock that can be taken
    means that no launch is alive: a manifest still saying "running" then belongs to a killed
    launch. Taking the lock is atomic, so of two launches into the same folder one is refused."""

    def __init__(self, run_dir):
        self.path = Path(run_dir) / LOCK
        self.fd = None

    def acquire(self) -> "RunLock":
        import fcntl
        import socket

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunDirBusy(f"{self.path.parent} is in use by {owner}; wait for it to finish or stop it first") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"ngrpo pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                 .encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()

    @staticmethod
    def held(run_dir) -> bool:
        """True when a live process holds RUN_DIR's lock (a probe that takes and drops it)."""
        import fcntl

        path = Path(run_dir) / LOCK
        if not path.exists():
            return False
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)


def effective_status(run_dir, manifest: Optional[dict] = None) -> str:
    """The manifest's status, except that "running" without a live owner is "killed"."""
    manifest = manifest if manifest is not None else read_manifest(run_dir)
    status = manifest.get("status", "created")
    if status == "running" and not RunLock.held(run_dir):
        return "killed"
    return status
