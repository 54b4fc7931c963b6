"""A run that fills its disk ends in one line, a true status and a checkpoint to resume from.

A full disk shows up wherever the run happened to write: as OSError ENOSPC (EDQUOT for a quota),
or, in the middle of a checkpoint, as torch.save's zip writer's RuntimeError ("basic_ios::clear:
iostream error", "unexpected pos N vs M"), which carries no errno at all. `diagnose` reads the
failure's whole exception chain (Ray's wrappers included) and the free space on the filesystem:
it returns a DiskFull, naming the file being written (the error's own path, else the newest file
of the run directory) and the space left, or None for any other failure.

`clean_up` then leaves the run as a resume wants it: the checkpoint folders the failed save left
unfinished go (only tags newer than the role's `latest`, which DeepSpeed writes after every file
of a tag: the previous complete checkpoint is never touched), and so do the temporary files of
ngrpo's atomic writes (`*.tmp-PID`) in the run directory and data/. The manifest itself is
written first, through rundir.write_manifest, which has room kept for it on a full disk.
"""
import dataclasses
import errno
import os
import re
import shutil
from pathlib import Path
from typing import Iterator, List, Optional

from pipelines.launch import rundir

NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
NO_SPACE_TEXT = ("No space left on device", "Disk quota exceeded", "[Errno 28]", "[Errno 122]")
# torch.save's writer on a full disk: no errno, only these (trusted with little space left only)
WRITE_FAILED_TEXT = ("iostream error", "PytorchStreamWriter failed writing", "file write failed", "unexpected pos ")
LOW_FREE_BYTES = 64 * 1024 ** 2
# "[Errno 28] No space left on device: '/path'" in the text of an error raised in another process
_ERRNO_PATH = re.compile(r"\[Errno (?:28|122)\] [^:\n]*: '([^'\n]+)'")
_TAG = re.compile(r"global_step(\d+)(_hf)?")


@dataclasses.dataclass
class DiskFull:
    path: Optional[Path]       # the file being written when the disk ran out, where it is known
    free: int                  # bytes free on that file's filesystem (else the run directory's) then
    unfinished: List[Path]     # checkpoint folders the failed save left unfinished
    resume_step: int           # the step a resume starts from (the newest complete checkpoint)

    def message(self, run_dir) -> str:
        where = f"writing {self.path} ({human_bytes(self.free)} free on that filesystem)" if self.path else \
            f"({human_bytes(self.free)} free on the run directory's filesystem)"
        removed = ""
        if self.unfinished:
            names = ", ".join(sorted({p.name for p in self.unfinished}))
            removed = f"; the unfinished checkpoint ({names}) is removed and the run resumes from step {self.resume_step}"
        return f"no space left on device {where}{removed}; free space and resume with `ngrpo train --resume {run_dir}`"


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _exceptions(err: BaseException) -> Iterator[BaseException]:
    """ERR and every exception it was raised from or while handling, Ray's `cause` included."""
    seen, todo = set(), [err]
    while todo and len(seen) < 64:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]


def _free_bytes(path: Path) -> int:
    for candidate in (path, *path.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return 0


def _newest_file(run_dir: Path) -> Optional[Path]:
    """The file of RUN_DIR written last (the launch logs, the manifest, its spare and the lock aside)."""
    skip = {rundir.MANIFEST, rundir.MANIFEST_SPARE, rundir.LOCK}
    newest, when = None, -1
    for top, dirs, files in os.walk(run_dir):
        if Path(top) == run_dir:
            dirs[:] = [d for d in dirs if d != rundir.LOGS]
        for name in files:
            path = Path(top, name)
            if name in skip and path.parent == run_dir:
                continue
            try:
                mtime = path.stat().st_mtime_ns
            except OSError:
                continue
            if mtime > when:
                newest, when = path, mtime
    return newest


def unfinished_checkpoints(run_dir) -> List[Path]:
    """Checkpoint tag folders newer than their role's `latest` (a save that did not finish); none
    for a role whose `latest` cannot be read (nothing is removed on a guess)."""
    ckpt = Path(run_dir) / rundir.CHECKPOINTS
    out = []
    for role in ("_actor", "_critic"):
        folder = ckpt / role
        if not folder.is_dir():
            continue
        latest = folder / "latest"
        if latest.exists():
            match = _TAG.fullmatch(latest.read_text().strip())
            if match is None or match.group(2):
                continue
            done = int(match.group(1))
        else:
            done = 0  # DeepSpeed writes `latest` after the files of the first tag
        out += [p for p in folder.iterdir() if p.is_dir() and (m := _TAG.fullmatch(p.name)) and not m.group(2)
                and int(m.group(1)) > done]
    if (ckpt / "_actor").is_dir():  # OpenRLHF's --ckpt.save_hf: checkpoints/global_stepN_hf beside the roles
        done = rundir.checkpoint_step(run_dir) if (ckpt / "_actor" / "latest").exists() else 0
        out += [p for p in ckpt.iterdir() if p.is_dir() and (m := _TAG.fullmatch(p.name)) and m.group(2)
                and int(m.group(1)) > done]
    return out


def temporary_files(run_dir) -> List[Path]:
    """What ngrpo's atomic writes leave when they fail (`NAME.tmp-PID`, `.NAME.tmp-PID`)."""
    run_dir = Path(run_dir)
    return [p for folder in (run_dir, run_dir / "data") if folder.is_dir()
            for p in folder.iterdir() if ".tmp-" in p.name and p.is_file()]


def diagnose(err: BaseException, run_dir) -> Optional[DiskFull]:
    """A DiskFull when ERR (a failed launch of RUN_DIR) comes from a full disk, else None."""
    run_dir = Path(run_dir)
    chain = list(_exceptions(err))
    text = "\n".join(f"{type(e).__name__}: {e}" for e in chain)
    path = next((Path(e.filename) for e in chain
                 if isinstance(e, OSError) and e.errno in NO_SPACE_ERRNOS and e.filename), None)
    if path is None and (match := _ERRNO_PATH.search(text)):
        path = Path(match.group(1))
    no_space = path is not None or any(isinstance(e, OSError) and e.errno in NO_SPACE_ERRNOS for e in chain) \
        or any(marker in text for marker in NO_SPACE_TEXT)
    run_free = _free_bytes(run_dir)
    if not no_space and not (any(marker in text for marker in WRITE_FAILED_TEXT) and run_free < LOW_FREE_BYTES):
        return None
    if path is None and run_free < LOW_FREE_BYTES:
        path = _newest_file(run_dir)  # the run's own disk is the full one: what it wrote last
    free = _free_bytes(path) if path is not None else run_free
    try:
        unfinished = unfinished_checkpoints(run_dir)
        resume_step = rundir.checkpoint_step(run_dir)
    except (OSError, rundir.RunDirError):
        unfinished, resume_step = [], 0
    return DiskFull(path=path, free=free, unfinished=unfinished, resume_step=resume_step)


def clean_up(full: DiskFull, run_dir) -> None:
    """Remove the unfinished checkpoint folders and the temporary files (see the module's text)."""
    for folder in full.unfinished:
        shutil.rmtree(folder, ignore_errors=True)
    for path in temporary_files(run_dir):
        try:
            path.unlink()
        except OSError:
            pass
