"""The NGRPO training reward and the evaluation grader (SPEC §6), built on math-verify.

Reward: 1.0 when the last ``\\boxed{}`` (or ``\\fbox{}``) answer of the response is equivalent
to the reference answer under math-verify, else 0.0. No format reward.

This file is usable directly as OpenRLHF 0.11.2's ``--reward.remote_url``::

    --reward.remote_url /path/to/pipelines/reward.py

OpenRLHF imports it with ``importlib`` (as a module called ``reward_func``, outside any package)
and calls ``reward_func(queries, prompts, labels)`` from ``asyncio.to_thread`` threads inside its
vLLM Ray actors, one query per call. ``queries`` are prompt + response decoded with
``skip_special_tokens=False``. The return value is a dict of float32 tensors, one value per query::

    {"rewards": tensor([...]), "scores": tensor([...]),
     "extra_logs": {"no_boxed_frac": tensor([...]), "grader_timeouts": tensor([...])}}

OpenRLHF logs each extra_logs value per sample and averages it, so the per-sample 0/1 indicators
become the share of responses without a boxed answer and the share whose grading timed out.

Threading and hard time bounds
------------------------------
math-verify's own timeouts use ``signal.alarm`` and only work in a main thread, and some inputs
(``9^{9^{9^9}}``) hang inside C code where no signal handler runs. So math-verify never runs in
the calling process: a small persistent pool of grader *processes* (started with ``subprocess``,
i.e. fork+exec, safe from threaded parents; ``NGRPO_GRADER_WORKERS``, default min(4, CPUs)) does
it, with math-verify's signal timeouts disabled. The caller sends one item at a time to each
worker over a pipe and waits with a wall-clock deadline (``NGRPO_GRADER_TIMEOUT`` seconds,
default 5); a worker past its deadline is SIGKILLed and replaced, and the item counts as 0 and as a
timeout. A worker that crashes (segfault, out of memory; workers run under an address-space limit)
is treated the same way. Any number of threads can call concurrently: each call borrows idle
workers from the shared pool. A worker whose parent dies exits on stdin EOF; one stuck in C code
is killed by the kernel through a per-item RLIMIT_CPU.

Cheap checks run first in the caller and never touch a worker: no boxed answer (0), an answer
longer than ``NGRPO_GRADER_MAX_ANSWER_CHARS`` (default 1000; 0), normalised string equality (1),
two plain integers (compared exactly), and a per-process LRU cache of earlier verdicts.
"""
from __future__ import annotations

import json
import math
import os
import re
import selectors
import subprocess
import sys
import threading
import time
from collections import OrderedDict, deque
from typing import NamedTuple, Optional, Sequence

__all__ = [
    "GradeResult",
    "extract_boxed",
    "split_response",
    "grade",
    "grade_many",
    "answers_equivalent",
    "answers_equivalent_many",
    "gold_answers_parse",
    "clean_answer",
    "reward_func",
    "configure",
    "shutdown",
]

_WORKER_RUN_NAME = "__ngrpo_grader_worker__"


def _env_float(name, default):
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return float(default)


DEFAULT_TIMEOUT = _env_float("NGRPO_GRADER_TIMEOUT", 5.0)
DEFAULT_WORKERS = int(_env_float("NGRPO_GRADER_WORKERS", min(4, os.cpu_count() or 1)))
MAX_ANSWER_CHARS = int(_env_float("NGRPO_GRADER_MAX_ANSWER_CHARS", 1000))
STARTUP_TIMEOUT = _env_float("NGRPO_GRADER_STARTUP_TIMEOUT", 120.0)
WORKER_MAX_MEMORY_MB = int(_env_float("NGRPO_GRADER_MAX_MEMORY_MB", 4096))


class GradeResult(NamedTuple):
    """Outcome of grading one response: `timed_out` also covers a grader process that crashed."""

    correct: bool
    extracted: Optional[str]
    timed_out: bool


# --------------------------------------------------------------------------------------------
# Answer extraction
# --------------------------------------------------------------------------------------------
_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")
_BRACE_TOKEN_RE = re.compile(r"[{}\\]")


def _match_braces(text: str) -> dict:
    """{index of '{': index of its matching '}'} in one linear pass.

    A backslash escapes the next character, so ``\\{`` / ``\\}`` (set braces) are not grouping
    braces and ``\\\\`` (a LaTeX line break) does not escape what follows it.
    """
    matches = {}
    stack = []
    skip_until = -1
    for m in _BRACE_TOKEN_RE.finditer(text):
        j = m.start()
        if j < skip_until:
            continue
        c = text[j]
        if c == "\\":
            skip_until = j + 2
        elif c == "{":
            stack.append(j)
        elif stack:
            matches[stack.pop()] = j
    return matches


_NONSPACE_RE = re.compile(r"\S")


def _box_argument(text: str, pos: int, matches: dict):
    """(start, end) of the argument of the box command ending at `pos`, or None. text[start:end]."""
    k = pos
    n = len(text)
    while k < n and text[k] == " ":
        k += 1
    if k < n and text[k] == "{":
        close = matches.get(k)
        return None if close is None else (k + 1, close)
    if k > pos:  # "\boxed 5": up to the next space or $
        stop = k
        while stop < n and not text[stop].isspace() and text[stop] != "$":
            stop += 1
        return (k, stop) if stop > k else None
    return None


def extract_boxed(text: str) -> Optional[str]:
    """The content of the last complete, non-empty ``\\boxed{...}`` / ``\\fbox{...}`` in `text`.

    Nested braces are matched properly (``\\{``/``\\}`` are not grouping braces); ``\\boxed 5``
    (no braces) is read up to the next space or ``$``. Among overlapping boxes the one that ends
    last (the outermost) wins and ``\\boxed{\\boxed{x}}`` gives ``x``. A box whose braces never
    close (e.g. a truncated response) is ignored. None when there is no such box. Linear time.
    """
    if not text or ("boxed" not in text and "fbox" not in text):
        return None
    matches = _match_braces(text)
    best = None
    for m in _BOX_RE.finditer(text):
        span = _box_argument(text, m.end(), matches)
        if span is None or not _NONSPACE_RE.search(text, span[0], span[1]):
            continue
        if best is None or span[1] > best[1]:
            best = span
    if best is None:
        return None
    start, end = best
    while True:  # unwrap \boxed{\boxed{x}}
        m = _NONSPACE_RE.search(text, start, end)
        if m is None:
            return None
        inner = _BOX_RE.match(text, m.start(), end)
        if inner is None:
            break
        span = _box_argument(text, inner.end(), matches)
        if span is None or span[1] >= end or text[span[1] + 1 : end].strip():
            break
        start, end = span
    content = text[start:end].strip()
    return content or None


EXTRACTIONS = ("boxed", "authors")
_ANSWER_IS_RE = re.compile(r"[Tt]he answer is")
_NUMBER_RE = re.compile(r"-?\d*\.?\d+")


def extract_answer(text: str, mode: str = "boxed") -> Optional[str]:
    """The final answer of a response under an extraction rule.

    * "boxed" (SPEC §6, the default): the last ``\\boxed{}``, else None.
    * "authors": the NGRPO authors' training reward (``extract_answer_math`` in their verl fork):
      the last boxed answer, else the text after the last "the answer is" (its first line, a
      leading ":" and a trailing "." or "/" removed), else the last number of the response.
    """
    if mode not in EXTRACTIONS:
        raise ValueError(f"unknown answer extraction {mode!r}; choose one of {', '.join(EXTRACTIONS)}")
    boxed = extract_boxed(text or "")
    if boxed is not None or mode == "boxed" or not text:
        return boxed
    parts = _ANSWER_IS_RE.split(text)
    if len(parts) > 1:
        answer = parts[-1].strip()
    else:
        numbers = _NUMBER_RE.findall(text.replace(",", ""))
        answer = numbers[-1] if numbers else ""
    answer = answer.split("\n")[0].strip()
    if answer.startswith(":"):
        answer = answer[1:].strip()
    while answer and answer[-1] in "./":
        answer = answer[:-1].rstrip()
    return answer or None


_SPECIAL_TOKEN_RE = re.compile(r"<\|[^|<>\s]{1,40}\|>|</?s>")


def split_response(query: str, prompt: Optional[str]) -> str:
    """The response part of `query` (= prompt + response as decoded text).

    Strips the prompt prefix; copes with special tokens removed by the decoder and with a
    prompt that was truncated from the left. Falls back to the text after the last assistant
    header, then to the whole query.
    """
    query = query or ""
    if prompt:
        if query.startswith(prompt):
            return query[len(prompt) :]
        q2, p2 = _SPECIAL_TOKEN_RE.sub("", query), _SPECIAL_TOKEN_RE.sub("", prompt)
        if p2 and q2.startswith(p2):
            return q2[len(p2) :]
        marker = "<|im_start|>assistant"
        pos = query.rfind(marker)
        if pos >= 0 and query.rfind(marker, 0, pos) < 0 and prompt.count(marker) <= 1:
            return query[pos + len(marker) :].lstrip("\n")
        tail = p2[-200:].strip()
        if tail:
            pos = q2.find(tail)
            if pos >= 0:
                return q2[pos + len(tail) :]
    return query


# --------------------------------------------------------------------------------------------
# Cheap checks
# --------------------------------------------------------------------------------------------
_INT_RE = re.compile(r"^[+-]?\d+$")
_DOLLAR_RE = re.compile(r"^\$+(.*?)\$+$", re.S)
_LEFT_RIGHT_RE = re.compile(r"\\(?:left|right|big|Big|bigg|Bigg)(?![a-zA-Z])")
_THIN_SPACE_RE = re.compile(r"\\[,;:! ]")
_TEXTLIKE_RE = re.compile(r"\\(?:text|mbox|mathrm|textbf|operatorname)")


def _normalise(ans: str) -> str:
    """A conservative normal form: strings equal after it are certainly equivalent."""
    s = ans.strip()
    m = _DOLLAR_RE.match(s)
    if m:
        s = m.group(1).strip()
    if s.startswith("\\(") and s.endswith("\\)") or s.startswith("\\[") and s.endswith("\\]"):
        s = s[2:-2].strip()
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _LEFT_RIGHT_RE.sub("", s)
    s = _THIN_SPACE_RE.sub(" ", s)
    if _TEXTLIKE_RE.search(s):
        s = " ".join(s.split())
    else:
        s = "".join(s.split())
    return s.rstrip(".").strip()


def clean_answer(answer) -> str:
    """A reference answer as graded: the boxed part if it has one, stripped of surrounding
    whitespace/``$`` and of trailing sentence punctuation (``30^\\circ.`` -> ``30^\\circ``)."""
    answer = "" if answer is None else str(answer)
    if "boxed" in answer or "fbox" in answer:
        boxed = extract_boxed(answer)
        if boxed is not None:
            answer = boxed
    def strip_punct(a):
        a = a.strip()
        while a and a[-1] in ".,;" and not a.endswith("\\" + a[-1]):
            a = a[:-1].rstrip()
        return a

    answer = strip_punct(answer)
    m = _DOLLAR_RE.match(answer)
    if m:
        answer = strip_punct(m.group(1))
    return answer


_gold_text = clean_answer


def _quick_verdict(gold: str, pred: str) -> Optional[bool]:
    """True/False when decidable without math-verify, else None."""
    g, p = _normalise(gold), _normalise(pred)
    if g == p and g:
        return True
    if _INT_RE.match(g) and _INT_RE.match(p):
        gs, ps = g.lstrip("+"), p.lstrip("+")
        gneg, pneg = gs.startswith("-"), ps.startswith("-")
        gd, pd = gs.lstrip("-").lstrip("0") or "0", ps.lstrip("-").lstrip("0") or "0"
        if gd == "0" and pd == "0":
            return True
        return gd == pd and gneg == pneg
    return None


class _LRU:
    def __init__(self, size=100_000):
        self.size, self.data, self.lock = size, OrderedDict(), threading.Lock()

    def get(self, key):
        with self.lock:
            v = self.data.get(key)
            if v is not None:
                self.data.move_to_end(key)
            return v

    def put(self, key, value):
        if len(key[0]) + len(key[1]) > 600:
            return
        with self.lock:
            self.data[key] = value
            if len(self.data) > self.size:
                self.data.popitem(last=False)


_CACHE = _LRU()


# --------------------------------------------------------------------------------------------
# The grader process pool
# --------------------------------------------------------------------------------------------
class _Worker:
    __slots__ = ("proc", "fd", "buf", "ready", "started", "item", "deadline")

    def __init__(self, timeout: float):
        here = os.path.abspath(__file__)
        code = (
            "import sys; sys.path = [p for p in sys.path if p not in ('', '.')]; import runpy; "
            f"runpy.run_path({here!r}, run_name={_WORKER_RUN_NAME!r})"
        )
        env = dict(os.environ)
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        env["NGRPO_GRADER_MAX_MEMORY_MB"] = str(WORKER_MAX_MEMORY_MB)
        env["NGRPO_GRADER_TIMEOUT"] = str(timeout)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,
            env=env,
            start_new_session=True,  # Ctrl-C in a terminal must not hit a worker mid-item
            close_fds=True,
        )
        self.fd = self.proc.stdout.fileno()
        os.set_blocking(self.fd, False)
        self.buf = b""
        self.ready = False
        self.started = time.monotonic()
        self.item = None
        self.deadline = None

    def alive(self):
        return self.proc.poll() is None

    def kill(self):
        try:
            self.proc.kill()
        except OSError:
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=5)
        except Exception:
            pass

    def send(self, payload: bytes):
        self.proc.stdin.write(payload)
        self.proc.stdin.flush()

    def read_lines(self):
        """New complete lines; None on EOF."""
        try:
            data = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return []
        except OSError:
            return None
        if not data:
            return None
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        return lines


class _Pool:
    def __init__(self, size: int, timeout: float):
        import queue

        self.size = max(1, int(size))
        self.timeout = float(timeout)
        self.pid = os.getpid()
        self.idle = queue.Queue()
        self.lock = threading.Lock()
        self.start_failures = 0
        self.closed = False
        self.n_timeouts = 0
        self.n_restarts = 0
        for _ in range(self.size):
            self.idle.put(_Worker(self.timeout))

    def close(self):
        self.closed = True
        while True:
            try:
                w = self.idle.get_nowait()
            except Exception:
                break
            w.kill()

    def _replace(self, w: _Worker) -> _Worker:
        w.kill()
        self.n_restarts += 1
        return _Worker(self.timeout)

    def run(self, tasks: Sequence[tuple], timeout: Optional[float] = None) -> list:
        """Run `tasks` ((op, gold, pred) tuples) on borrowed workers.

        Returns one (value, failed) per task: value is the worker's bool answer, failed is True
        when the item timed out or crashed its worker (value is then False).
        """
        timeout = self.timeout if timeout is None else float(timeout)
        results = [None] * len(tasks)
        if not tasks:
            return results
        import queue

        while True:
            if self.closed:  # reconfigured while we waited: use the current pool
                return _pool().run(tasks, timeout)
            try:
                workers = [self.idle.get(timeout=1.0)]
                break
            except queue.Empty:
                continue
        while len(workers) < min(len(tasks), self.size):
            try:
                workers.append(self.idle.get_nowait())
            except queue.Empty:
                break
        pending = deque(range(len(tasks)))
        retries = {}
        sel = selectors.DefaultSelector()
        try:
            for w in workers:
                w.item, w.deadline = None, None
                sel.register(w.fd, selectors.EVENT_READ, w)
            remaining = len(tasks)
            while remaining:
                now = time.monotonic()
                # dispatch to idle ready workers
                for idx, w in enumerate(workers):
                    if w.ready and w.item is None and pending:
                        i = pending.popleft()
                        op, gold, pred = tasks[i]
                        line = json.dumps({"i": i, "op": op, "g": gold, "p": pred}).encode() + b"\n"
                        try:
                            w.send(line)
                            w.item, w.deadline = i, time.monotonic() + timeout
                        except (BrokenPipeError, OSError, ValueError):
                            retries[i] = retries.get(i, 0) + 1
                            if retries[i] <= 1:
                                pending.appendleft(i)
                            else:
                                results[i] = (False, True)
                                remaining -= 1
                            workers[idx] = self._swap(sel, w)
                if not remaining:
                    break
                # wait for replies or the nearest deadline
                deadlines = [w.deadline if w.item is not None else (w.started + STARTUP_TIMEOUT)
                             for w in workers if w.item is not None or not w.ready]
                wait = max(0.0, min(deadlines) - time.monotonic()) if deadlines else 1.0
                events = sel.select(timeout=min(wait, 5.0) + 0.001)
                for key, _ in events:
                    w = key.data
                    lines = w.read_lines()
                    if lines is None:  # EOF: the worker died
                        idx = workers.index(w)
                        if w.item is not None:
                            results[w.item] = (False, True)
                            remaining -= 1
                            self.n_timeouts += 1
                        elif not w.ready:
                            self._note_start_failure(w)
                        workers[idx] = self._swap(sel, w)
                        continue
                    for raw in lines:
                        try:
                            msg = json.loads(raw)
                        except ValueError:
                            continue
                        if msg.get("ready"):
                            w.ready = True
                            self.start_failures = 0
                        elif "i" in msg and msg["i"] == w.item:
                            results[w.item] = (bool(msg.get("r")), False)
                            remaining -= 1
                            w.item, w.deadline = None, None
                now = time.monotonic()
                for idx, w in enumerate(workers):
                    if w.item is not None and now > w.deadline:
                        results[w.item] = (False, True)
                        remaining -= 1
                        self.n_timeouts += 1
                        workers[idx] = self._swap(sel, w)
                    elif w.item is None and not w.ready and now > w.started + STARTUP_TIMEOUT:
                        self._note_start_failure(w)
                        workers[idx] = self._swap(sel, w)
        except BaseException:
            # a worker's pipe state is unknown after an interruption: replace the busy ones
            workers = [self._replace(w) if w.item is not None else w for w in workers]
            raise
        finally:
            sel.close()
            for w in workers:
                w.item, w.deadline = None, None
                if self.closed:  # the pool was reconfigured or shut down meanwhile
                    w.kill()
                else:
                    self.idle.put(w)
        return results

    def _swap(self, sel, w):
        try:
            sel.unregister(w.fd)
        except (KeyError, ValueError):
            pass
        new = self._replace(w)
        sel.register(new.fd, selectors.EVENT_READ, new)
        return new

    def _note_start_failure(self, w):
        self.start_failures += 1
        if self.start_failures >= 3 * self.size:
            raise RuntimeError(
                f"ngrpo reward: grader worker processes keep failing to start (exit code {w.proc.poll()}); "
                f"is math-verify installed for {sys.executable}? Run `{sys.executable} -c 'import math_verify'`."
            )


_POOL: Optional[_Pool] = None
_POOL_LOCK = threading.Lock()
_SETTINGS = {"workers": DEFAULT_WORKERS, "timeout": DEFAULT_TIMEOUT}


def _pool() -> _Pool:
    global _POOL
    pool = _POOL
    if pool is not None and pool.pid == os.getpid():
        return pool
    with _POOL_LOCK:
        if _POOL is None or _POOL.pid != os.getpid():
            _POOL = _Pool(_SETTINGS["workers"], _SETTINGS["timeout"])
        return _POOL


def configure(workers: Optional[int] = None, timeout: Optional[float] = None) -> None:
    """Change the pool size / per-item wall-clock timeout (seconds); restarts the pool lazily."""
    global _POOL
    with _POOL_LOCK:
        if workers is not None:
            _SETTINGS["workers"] = max(1, int(workers))
        if timeout is not None:
            _SETTINGS["timeout"] = float(timeout)
        if _POOL is not None and _POOL.pid == os.getpid():
            _POOL.close()
        _POOL = None


def shutdown() -> None:
    """Stop the grader processes (they are also stopped at interpreter exit)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is not None and _POOL.pid == os.getpid():
            _POOL.close()
        _POOL = None


import atexit  # noqa: E402

atexit.register(shutdown)


def pool_stats() -> dict:
    p = _POOL
    return {"timeouts": p.n_timeouts, "restarts": p.n_restarts} if p else {"timeouts": 0, "restarts": 0}


# --------------------------------------------------------------------------------------------
# Public grading API
# --------------------------------------------------------------------------------------------
def answers_equivalent_many(pairs: Sequence[tuple], timeout: Optional[float] = None, quick: bool = True) -> list:
    """[(equivalent, timed_out)] for (gold, pred) answer strings (already extracted, no \\boxed).

    quick=False skips the cheap checks and the cache (every pair goes through math-verify)."""
    out = [None] * len(pairs)
    tasks, where = [], []
    for k, (gold, pred) in enumerate(pairs):
        gold, pred = _gold_text(gold), (pred or "").strip()
        if not gold or not pred or len(pred) > max(MAX_ANSWER_CHARS, 4 * len(gold)):
            out[k] = (False, False)
            continue
        verdict = _quick_verdict(gold, pred) if quick else None
        if verdict is not None:
            out[k] = (verdict, False)
            continue
        cached = _CACHE.get((gold, pred)) if quick else None
        if cached is not None:
            out[k] = (cached, False)
            continue
        where.append(k)
        tasks.append(("eq", gold, pred))
    if tasks:
        for k, task, (value, failed) in zip(where, tasks, _pool().run(tasks, timeout)):
            out[k] = (value, failed)
            if not failed:
                _CACHE.put((task[1], task[2]), value)
    return out


def answers_equivalent(gold: str, pred: str, timeout: Optional[float] = None) -> bool:
    return answers_equivalent_many([(gold, pred)], timeout)[0][0]


def grade_many(responses: Sequence[str], golds: Sequence[str], timeout: Optional[float] = None,
               quick: bool = True, extraction: str = "boxed") -> list:
    """Grade many responses at once (the worker pool runs them in parallel).

    quick=False sends every extracted answer through math-verify (no string/integer shortcuts, no
    cache). extraction: "boxed" or "authors" (see extract_answer)."""
    if len(responses) != len(golds):
        raise ValueError(f"grade_many: {len(responses)} responses but {len(golds)} gold answers")
    extracted = [extract_answer(r or "", extraction) for r in responses]
    idx = [k for k, e in enumerate(extracted) if e is not None]
    verdicts = answers_equivalent_many([(golds[k], extracted[k]) for k in idx], timeout, quick)
    out = [GradeResult(False, e, False) for e in extracted]
    for k, (ok, failed) in zip(idx, verdicts):
        out[k] = GradeResult(bool(ok), extracted[k], bool(failed))
    return out


def grade(response: str, gold: str, timeout: Optional[float] = None) -> GradeResult:
    """Grade one response: correct iff its last boxed answer is math-verify-equivalent to `gold`."""
    return grade_many([response], [gold], timeout)[0]


def gold_answers_parse(golds: Sequence[str], timeout: Optional[float] = None) -> list:
    """For each gold answer: True if math-verify parses it into a math object, False if not,
    None if parsing timed out. Plain integers/decimals/fractions skip the worker."""
    out = [None] * len(golds)
    tasks, where = [], []
    simple = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$|^[+-]?\\[dt]?frac\{\d+\}\{\d+\}$")
    for k, g in enumerate(golds):
        g = _gold_text(g)
        if not g:
            out[k] = False
        elif simple.match(_normalise(g)):
            out[k] = True
        elif g in _GOLD_OK:
            out[k] = _GOLD_OK[g]
        else:
            where.append(k)
            tasks.append(("gold", g, ""))
    if tasks:
        for k, task, (value, failed) in zip(where, tasks, _pool().run(tasks, timeout)):
            out[k] = None if failed else value
            if not failed and len(_GOLD_OK) < 200_000:
                _GOLD_OK[task[1]] = value
    return out


_GOLD_OK: dict = {}


def reward_func(queries, prompts, labels, **kwargs):
    """OpenRLHF custom reward: 1.0 if the last boxed answer is equivalent to the label, else 0.0."""
    import torch

    queries = list(queries)
    prompts = list(prompts) if prompts is not None else [None] * len(queries)
    labels = list(labels) if labels is not None else [None] * len(queries)
    if not (len(queries) == len(prompts) == len(labels)):
        raise ValueError(f"reward_func: {len(queries)} queries, {len(prompts)} prompts, {len(labels)} labels")
    responses = [split_response(q, p) for q, p in zip(queries, prompts)]
    extraction = os.environ.get("NGRPO_ANSWER_EXTRACTION", "boxed")
    results = grade_many(responses, ["" if lab is None else str(lab) for lab in labels], extraction=extraction)
    rewards = torch.tensor([1.0 if r.correct else 0.0 for r in results], dtype=torch.float32)
    return {
        "rewards": rewards,
        "scores": rewards.clone(),
        "extra_logs": {
            "no_boxed_frac": torch.tensor([1.0 if r.extracted is None else 0.0 for r in results], dtype=torch.float32),
            "grader_timeouts": torch.tensor([1.0 if r.timed_out else 0.0 for r in results], dtype=torch.float32),
        },
    }


# --------------------------------------------------------------------------------------------
# The worker process (runs this file with run_name == _WORKER_RUN_NAME)
# --------------------------------------------------------------------------------------------
def _worker_main():  # pragma: no cover - runs in the grader subprocesses
    import functools
    import logging
    import resource

    logging.disable(logging.CRITICAL)
    mem = int(os.environ.get("NGRPO_GRADER_MAX_MEMORY_MB", "4096"))
    if mem > 0:
        try:
            soft, hard = resource.getrlimit(resource.RLIMIT_AS)
            limit = mem << 20
            if hard == resource.RLIM_INFINITY or limit < hard:
                resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
        except (ValueError, OSError):
            pass
    sys.setrecursionlimit(10_000)
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    cfg = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]

    thousands = re.compile(r"(\d)\s*(?:,\s*\\!|\{,\}|\\,|,\\ )\s*(?=\d{3}(?!\d))")

    def variants(a):
        yield a
        b = thousands.sub(r"\1", a)  # 10,\!000 / 10{,}000 / 10\,000 -> 10000
        if b != a:
            yield b
        if any(ch.isspace() for ch in b) and "\\text" not in b and "\\mbox" not in b:
            yield "".join(b.split())

    def parse_answer(a, fallback=True):
        """math-verify parse of a bare answer. Retried with thousands separators removed and
        without spaces (math-verify's unit stripping eats a letter after a space:
        `a + b + c` -> `a +`)."""
        for v in variants(a):
            res = parse("\\boxed{" + v + "}", cfg, parsing_timeout=None, fallback_mode="no_fallback")
            if res:
                return res
        if fallback:
            return parse("\\boxed{" + a + "}", cfg, parsing_timeout=None)
        return []

    parse_gold = functools.lru_cache(maxsize=4096)(parse_answer)

    def equal(g, p):
        gp = parse_gold(g)
        if not gp:
            return False
        pp = parse_answer(p)
        if not pp:
            return False
        return bool(verify(gp, pp, timeout_seconds=None))

    def gold_ok(g):
        return bool(parse_answer(g, fallback=False))

    equal("\\frac{1}{2}", "0.5")  # warm up the LaTeX parser before saying ready
    out = sys.stdout.buffer
    out.write(b'{"ready": 1}\n')
    out.flush()
    stdin = sys.stdin.buffer
    cpu_hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    budget = int(float(os.environ.get("NGRPO_GRADER_TIMEOUT", "5")) * 3) + 30
    while True:
        line = stdin.readline()
        if not line:
            return
        try:
            req = json.loads(line)
        except ValueError:
            continue
        # orphan guard: an item stuck in C code past its CPU budget is killed by the kernel
        try:
            ru = resource.getrusage(resource.RUSAGE_SELF)
            soft = int(math.ceil(ru.ru_utime + ru.ru_stime)) + budget
            if cpu_hard == resource.RLIM_INFINITY or soft < cpu_hard:
                resource.setrlimit(resource.RLIMIT_CPU, (soft, cpu_hard))
        except (ValueError, OSError):
            pass
        try:
            if req.get("op") == "gold":
                r = gold_ok(req["g"])
            else:
                r = equal(req["g"], req["p"])
            err = None
        except BaseException as e:  # noqa: BLE001 - a grading error is a 0, never a crash
            r, err = False, type(e).__name__
        out.write(json.dumps({"i": req.get("i"), "r": bool(r), "e": err}).encode() + b"\n")
        out.flush()


if __name__ == _WORKER_RUN_NAME:
    _worker_main()
