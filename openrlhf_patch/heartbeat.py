"""Patch 7, heartbeat (wherever a step's work runs): RUN_DIR/heartbeat.json names the stage a step is
in and moves with each response, micro-batch and weight sync, for the driver's stall watchdog
(pipelines/launch/watchdog.py).
"""
import contextlib
import functools
import json
import os
import threading
import time

from openrlhf_patch.config import active


HEARTBEAT = "heartbeat.json"  # read by the driver's stall watchdog (pipelines/launch/watchdog.py)


HEARTBEAT_EVERY_S = 1.0


_last_beat = {"stage": None, "time": 0.0}


def heartbeat(stage: str) -> None:
    """RUN_DIR/heartbeat.json: the stage of the step this process works on (generation, experience,
    training, weight sync, step end) and that it moved, for the driver's stall watchdog. Written
    when the stage changes, else at most once a second; a failed write (a full disk) is left to
    the run's own writes to report."""
    cfg = active()
    now = time.time()
    if not cfg.run_dir or (stage == _last_beat["stage"] and now - _last_beat["time"] < HEARTBEAT_EVERY_S):
        return
    _last_beat.update(stage=stage, time=now)
    path = os.path.join(cfg.run_dir, HEARTBEAT)
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    try:
        with open(tmp, "w") as f:
            json.dump({"stage": stage, "pid": os.getpid(), "time": now}, f)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def wrap_with_heartbeat(upstream, stage: str, after: str = None):
    """UPSTREAM with a heartbeat of STAGE as it starts (and of AFTER once it returned)."""
    @functools.wraps(upstream)
    def with_heartbeat(*args, **kwargs):
        heartbeat(stage)
        result = upstream(*args, **kwargs)
        if after:
            heartbeat(after)
        return result

    return with_heartbeat
