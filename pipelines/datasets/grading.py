"""Grading: answer extraction, cheap checks and math-verify in a pool of worker processes (SPEC §6).

A response is correct when its final answer (the last ``\\boxed{}``/``\\fbox{}``, see
`extract_answer`) is equivalent to the reference answer under math-verify. The NGRPO training
reward (pipelines/reward.py, OpenRLHF's reward file) and the evaluation both grade through here.

Threading and hard time bounds
------------------------------
math-verify's own timeouts use ``signal.alarm`` and only work in a main thread, and some inputs
(``9^{9^{9^9}}``) would run for hours or eat all memory. So math-verify never runs in the calling
process but in a pebble ``ProcessPool`` of grader processes, with its signal timeouts disabled.
Each answer is one pool task with a wall-clock timeout; pebble kills a worker past it and starts
a new one, and the answer scores 0 and counts as a timeout. A worker that dies (segfault, out of
memory; workers run under an address-space limit) counts the same way. Workers are started with
``spawn`` (fork+exec): callers are threaded processes (Ray actors running vLLM), where a plain
fork is unsafe. Any number of threads may grade at once; they share one pool per process, and a
forked child makes its own. As with any spawned pool, each worker imports the main module, so a
script that grades must keep its work under ``if __name__ == "__main__":``.

Cheap checks run first in the caller and never reach a worker: no answer (0), an answer longer
than the length limit (0), normalised string equality (1), two plain integers (compared exactly),
and a per-process LRU cache of earlier verdicts.

Settings (environment, read at import; `configure` changes the first two at run time):

* ``NGRPO_GRADER_TIMEOUT``: wall-clock seconds math-verify may spend on one answer (default 5).
* ``NGRPO_GRADER_WORKERS``: grader processes per calling process (default min(4, CPUs)).
* ``NGRPO_GRADER_MAX_ANSWER_CHARS``: longer answers score 0 unread (default 1000, or 4x the
  reference answer's length when that is more).
* ``NGRPO_GRADER_MAX_MEMORY_MB``: address-space limit of a grader process (default 4096; 0: none).
"""
from __future__ import annotations

import atexit
import concurrent.futures
import functools
import logging
import math
import multiprocessing
import os
import re
import resource
import signal
import sys
import threading
from collections import OrderedDict
from concurrent.futures.process import BrokenProcessPool
from typing import NamedTuple, Optional, Sequence

from pebble import ProcessExpired, ProcessPool

__all__ = [
    "GradeResult",
    "EXTRACTIONS",
    "extract_boxed",
    "extract_boxed_answer",
    "unclosed_brace",
    "extract_answer",
    "split_response",
    "clean_answer",
    "grade",
    "grade_many",
    "answers_equivalent",
    "answers_equivalent_many",
    "gold_answers_parse",
    "configure",
    "shutdown",
    "pool_stats",
]


def _env_float(name, default):
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return float(default)


# Real answers verify in well under a second; one still running after this is a hang (a 0).
DEFAULT_TIMEOUT = _env_float("NGRPO_GRADER_TIMEOUT", 5.0)
# Enough to keep up with rollouts without taking the CPUs that vLLM and training need.
DEFAULT_WORKERS = max(1, int(_env_float("NGRPO_GRADER_WORKERS", min(4, os.cpu_count() or 1))))
# Final answers are short; a longer "answer" is a boxed derivation, slow to parse and never right.
MAX_ANSWER_CHARS = int(_env_float("NGRPO_GRADER_MAX_ANSWER_CHARS", 1000))
# sympy can blow up on an odd expression; past this a worker gets MemoryError (a 0), not the machine.
WORKER_MAX_MEMORY_MB = int(_env_float("NGRPO_GRADER_MAX_MEMORY_MB", 4096))

# A long reference answer (a matrix, a list of roots) may be matched by an answer this many times
# its length even when that exceeds MAX_ANSWER_CHARS.
ANSWER_LENGTH_FACTOR = 4
# Verdicts the caller remembers: a few training steps' worth of distinct (gold, answer) pairs.
ANSWER_CACHE_SIZE = 100_000
# Longer (gold, answer) pairs are rare and not worth the memory: they are never cached.
CACHE_MAX_KEY_CHARS = 600
# gold_answers_parse's verdicts: more than any data set's distinct reference answers.
GOLD_CACHE_SIZE = 200_000
# Reference answers math-verify surely parses (integers, decimals, a fraction of two integers).
_PLAIN_GOLD_RE = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$|^[+-]?\\[dt]?frac\{\d+\}\{\d+\}$")
# split_response looks for this much of the end of the prompt when the prefix does not match.
PROMPT_TAIL_CHARS = 200
# How often a waiting caller checks that its pool is still alive (a dead pool never finishes
# the tasks it had queued).
POOL_CHECK_INTERVAL_S = 1.0


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


def _scan_braces(text: str) -> tuple:
    """({index of '{': index of its matching '}'}, [indices of '{' never closed]) in one linear pass.

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
    return matches, stack


def _match_braces(text: str) -> dict:
    """{index of '{': index of its matching '}'} (see _scan_braces)."""
    return _scan_braces(text)[0]


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


def _unwrap(text: str, start: int, end: int, matches: dict) -> Optional[str]:
    """The content text[start:end] of a box, stripped, with ``\\boxed{\\boxed{x}}`` unwrapped to x."""
    while True:
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


def extract_boxed(text: str) -> Optional[str]:
    """The content of the last complete, non-empty ``\\boxed{...}`` / ``\\fbox{...}`` in `text`.

    Nested braces are matched properly (``\\{``/``\\}`` are not grouping braces); ``\\boxed 5``
    (no braces) is read up to the next space or ``$``. Among overlapping boxes the one that ends
    last (the outermost) wins and ``\\boxed{\\boxed{x}}`` gives ``x``. A box whose braces never
    close (e.g. a truncated response) is ignored. None when there is no such box. Linear time.
    This is how a response's answer is read (SPEC §6); a label's is `extract_boxed_answer`.
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
    return _unwrap(text, best[0], best[1], matches)


# What may stand between two boxes of one answer (`extract_boxed_answer`): blanks, math delimiters,
# "," ";" "and" "or" (also in \text{}), spacing commands, and a short left-hand side ("x =", "a_1 =",
# "g(x) ="). Anything else (a word, a formula, a full stop) ends the answer at the box after it.
# Each alternative starts differently, so matching a gap takes linear time; longer gaps are never
# separators only.
BOX_GAP_MAX_CHARS = 200
_BOX_GAP_RE = re.compile(r"""(?:
    \s | \$ | \\[()\[\]] | [,;] | (?<![A-Za-z])(?:and|or)(?![A-Za-z])
  | \\q?quad(?![A-Za-z]) | \\[,;:!\ ] | ~
  | \\(?:text|textrm|textnormal|mbox|mathrm)\s*\{\s*(?:and|or|,)?\s*\}
  | (?<![A-Za-z\\])[A-Za-z](?:_\{?[A-Za-z0-9]+\}?)?(?:\s*\(\s*[A-Za-z]\s*\))?\s*=
)*""", re.X)


# MATH's way to say that the boxes before are alternatives: "$\\boxed{(-5, 7)}$ and $\\boxed{(-5, 1)}.$
# (Either point is an acceptable answer.)". The last box alone is then the label.
_EITHER_RE = re.compile(r"[\s$.,;)\\\]]{0,12}\(?\s*Either\s+(?:\w+\s+is|one|of)\b")


def _box_spans(text: str, matches: dict) -> list:
    """(command start, content start, content end, end of the box) of each complete, non-empty box
    of TEXT that is not inside another one, in order."""
    spans = []
    for m in _BOX_RE.finditer(text):
        if spans and m.start() < spans[-1][3]:
            continue  # inside the box before it
        span = _box_argument(text, m.end(), matches)
        if span is None or not _NONSPACE_RE.search(text, span[0], span[1]):
            continue
        braced = span[0] > 0 and text[span[0] - 1] == "{" and matches.get(span[0] - 1) == span[1]
        spans.append((m.start(), span[0], span[1], span[1] + 1 if braced else span[1]))
    return spans


def extract_boxed_answer(text: str) -> Optional[str]:
    """The final answer of a reference solution or label: its last box together with the boxes just
    before it that only separators keep apart (blanks, ``$``, ``,`` ``;`` "and" "or", ``\\quad``,
    ``\\text{and}``, a short left-hand side such as ``x =``), joined with ", ". So
    ``\\boxed{2}, \\boxed{3}, \\boxed{5}`` gives "2, 3, 5" and ``$\\boxed{(-2,18)}$ and
    $\\boxed{(8,38)}$`` "(-2,18), (8,38)", as math-verify reads such a gold answer, while a solution
    that boxes its answer once per method (``... = \\boxed{17}. - OR - ... is \\boxed{17}``) gives
    "17". When the text right after the last box says "(Either ..." (MATH's "Either point is an
    acceptable answer"), the boxes are alternatives and the last one alone is the answer. Repeated
    parts are kept once. Boxes whose braces never close are ignored (the data check
    refuses such labels: `unclosed_brace`). None when there is no box.
    """
    if not text or ("boxed" not in text and "fbox" not in text):
        return None
    matches = _match_braces(text)
    spans = _box_spans(text, matches)
    if not spans:
        return None
    group = [spans[-1]]
    if _EITHER_RE.match(text, spans[-1][3]):
        return _unwrap(text, spans[-1][1], spans[-1][2], matches)
    for prev in reversed(spans[:-1]):
        if group[0][0] - prev[3] > BOX_GAP_MAX_CHARS or not _BOX_GAP_RE.fullmatch(text, prev[3], group[0][0]):
            break
        group.insert(0, prev)
    parts = []
    for _, start, end, _ in group:
        part = _unwrap(text, start, end, matches)
        if part is not None and part not in parts:
            parts.append(part)
    return ", ".join(parts) or None


def unclosed_brace(text: str, boxes_only: bool = False) -> Optional[str]:
    """Why TEXT cannot be a label, or None: the first ``{`` (with BOXES_ONLY, the first box's ``{``)
    that is never closed, e.g. "the \\boxed{ at character 1 is never closed". Such a label could
    never be matched: its box is ignored, or math-verify parses a part of it."""
    if not text or "{" not in text:
        return None
    _, unclosed = _scan_braces(text)
    if not unclosed:
        return None
    for m in _BOX_RE.finditer(text):
        k = m.end()
        while k < len(text) and text[k] == " ":
            k += 1
        if k in unclosed:
            return f"the {text[m.start():k + 1]} at character {m.start() + 1} is never closed"
    if boxes_only:
        return None
    return f"the {{ at character {unclosed[0] + 1} is never closed"


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
_ASSISTANT_HEADER = "<|im_start|>assistant"


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
        pos = query.rfind(_ASSISTANT_HEADER)
        if pos >= 0 and query.rfind(_ASSISTANT_HEADER, 0, pos) < 0 and prompt.count(_ASSISTANT_HEADER) <= 1:
            return query[pos + len(_ASSISTANT_HEADER) :].lstrip("\n")
        tail = p2[-PROMPT_TAIL_CHARS:].strip()
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
    """A reference answer as graded: the boxed part if it has one (all its adjacent boxes:
    `extract_boxed_answer`), stripped of surrounding
    whitespace/``$`` and of trailing sentence punctuation (``30^\\circ.`` -> ``30^\\circ``)."""
    answer = "" if answer is None else str(answer)
    if "boxed" in answer or "fbox" in answer:
        boxed = extract_boxed_answer(answer)
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
    """A thread-safe least-recently-used map of (gold, answer) -> verdict."""

    def __init__(self, size):
        self.size, self.data, self.lock = size, OrderedDict(), threading.Lock()

    def get(self, key):
        with self.lock:
            v = self.data.get(key)
            if v is not None:
                self.data.move_to_end(key)
            return v

    def put(self, key, value):
        if len(key[0]) + len(key[1]) > CACHE_MAX_KEY_CHARS:
            return
        with self.lock:
            self.data[key] = value
            if len(self.data) > self.size:
                self.data.popitem(last=False)


_CACHE = _LRU(ANSWER_CACHE_SIZE)


# --------------------------------------------------------------------------------------------
# The grader process pool (caller side)
# --------------------------------------------------------------------------------------------
# A worker's CPU-time budget per answer, in case it outlives its parent (see _limit_cpu_time):
# timeout * factor + slack, far above what any answer graded within its timeout uses.
CPU_BUDGET_FACTOR = 3
CPU_BUDGET_SLACK_S = 30

_POOL: Optional[ProcessPool] = None
_POOL_PID: Optional[int] = None  # the process that made _POOL: a forked child must not use it
_POOL_LOCK = threading.Lock()
_SETTINGS = {"workers": DEFAULT_WORKERS, "timeout": DEFAULT_TIMEOUT}
_STATS = {"timeouts": 0, "restarts": 0}
_STATS_LOCK = threading.Lock()


def _count(timeouts: int = 0, restarts: int = 0) -> None:
    with _STATS_LOCK:
        _STATS["timeouts"] += timeouts
        _STATS["restarts"] += restarts


def _own_pool() -> Optional[ProcessPool]:
    """This process's pool, if it has made one (a pool inherited through fork belongs to the parent)."""
    return _POOL if _POOL_PID == os.getpid() else None


def _live_pool() -> ProcessPool:
    """This process's running pool, made on first use; call with _POOL_LOCK held.

    A pool that broke down (pebble gives up on a pool when a worker dies between tasks or
    workers cannot start) is stopped and replaced.
    """
    global _POOL, _POOL_PID
    pool = _own_pool()
    if pool is not None and not pool.active:
        pool.stop()
        pool.join()
        _count(restarts=_SETTINGS["workers"])
        pool = None
    if pool is None:
        pool = ProcessPool(max_workers=_SETTINGS["workers"], initializer=_init_worker,
                           initargs=(WORKER_MAX_MEMORY_MB,), context=multiprocessing.get_context("spawn"))
        _POOL, _POOL_PID = pool, os.getpid()
    return pool


def _retire(pool: ProcessPool) -> None:
    """Let `pool` finish the tasks it has (other threads may be waiting on them), then stop it."""
    pool.close()
    threading.Thread(target=pool.join, name="ngrpo-grader-pool-retire", daemon=True).start()


def _attempt(tasks: Sequence[tuple], timeout: float) -> list:
    """One try of `tasks` on this process's pool: (value, failed) per task, None where lost."""
    cpu_budget = math.ceil(timeout * CPU_BUDGET_FACTOR) + CPU_BUDGET_SLACK_S
    with _POOL_LOCK:  # so that configure() cannot retire the pool halfway through
        pool = _live_pool()
        futures = [pool.schedule(_check_in_worker, args=(*task, cpu_budget), timeout=timeout) for task in tasks]
    pending = futures
    while pending:
        _, pending = concurrent.futures.wait(pending, timeout=POOL_CHECK_INTERVAL_S)
        if pending and not pool.active:  # stopped or broken down: its queued tasks will never run
            break
    return [_outcome(f) for f in futures]


def _outcome(future) -> Optional[tuple]:
    """(value, failed) of one task; failed: it timed out or its worker died. None: lost with its pool."""
    if not future.done():
        return None
    try:
        return future.result(), False
    except (concurrent.futures.TimeoutError, ProcessExpired):
        _count(timeouts=1, restarts=1)  # pebble has replaced the worker
        return False, True
    except BrokenProcessPool:
        return None


def _run(tasks: Sequence[tuple], timeout: Optional[float] = None) -> list:
    """Run (op, gold, pred) tasks on the pool: one (value, failed) each, in order.

    Tasks lost with a pool that broke down are tried once more on a fresh pool; a second loss
    means the workers cannot run at all.
    """
    if not tasks:
        return []
    timeout = _SETTINGS["timeout"] if timeout is None else float(timeout)
    results = _attempt(tasks, timeout)
    lost = [k for k, r in enumerate(results) if r is None]
    if lost:
        for k, r in zip(lost, _attempt([tasks[k] for k in lost], timeout)):
            if r is None:
                raise RuntimeError(
                    "ngrpo grading: the grader worker processes keep dying (their errors are on stderr). "
                    f"Does `{sys.executable} -c 'import math_verify'` work? Is NGRPO_GRADER_MAX_MEMORY_MB too "
                    "low? Does the main script keep its work under `if __name__ == '__main__':`?"
                )
            results[k] = r
    return results


def configure(workers: Optional[int] = None, timeout: Optional[float] = None) -> None:
    """Set the number of grader processes and the default per-answer timeout (seconds).

    A new size starts a new pool on the next call; grading under way finishes on the old one.
    """
    global _POOL
    with _POOL_LOCK:
        if timeout is not None:
            _SETTINGS["timeout"] = float(timeout)
        if workers is not None and max(1, int(workers)) != _SETTINGS["workers"]:
            _SETTINGS["workers"] = max(1, int(workers))
            if _own_pool() is not None:
                _retire(_POOL)
            _POOL = None


def shutdown() -> None:
    """Stop the grader processes now (also done at interpreter exit); the next call starts new ones."""
    global _POOL
    with _POOL_LOCK:
        pool, _POOL = _own_pool(), None
        if pool is not None:
            pool.stop()
            pool.join()


atexit.register(shutdown)


def pool_stats() -> dict:
    """Answers that timed out or crashed their worker, and workers replaced, in this process so far."""
    with _STATS_LOCK:
        return dict(_STATS)


# --------------------------------------------------------------------------------------------
# Public grading API
# --------------------------------------------------------------------------------------------
def answers_equivalent_many(pairs: Sequence[tuple], timeout: Optional[float] = None, quick: bool = True) -> list:
    """[(equivalent, timed_out)] for (gold, pred) answer strings (already extracted, no \\boxed).

    quick=False skips the cheap checks and the cache (every pair goes through math-verify)."""
    out = [None] * len(pairs)
    tasks, where = [], []
    for k, (gold, pred) in enumerate(pairs):
        gold, pred = clean_answer(gold), (pred or "").strip()
        if not gold or not pred or len(pred) > max(MAX_ANSWER_CHARS, ANSWER_LENGTH_FACTOR * len(gold)):
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
    for k, task, (value, failed) in zip(where, tasks, _run(tasks, timeout)):
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


_GOLD_OK: dict = {}


def gold_answers_parse(golds: Sequence[str], timeout: Optional[float] = None) -> list:
    """For each gold answer: True if math-verify parses it into a math object, False if not,
    None if parsing timed out. Plain integers/decimals/fractions skip the worker."""
    out = [None] * len(golds)
    tasks, where = [], []
    for k, g in enumerate(golds):
        g = clean_answer(g)
        if not g:
            out[k] = False
        elif _PLAIN_GOLD_RE.match(_normalise(g)):
            out[k] = True
        elif g in _GOLD_OK:
            out[k] = _GOLD_OK[g]
        else:
            where.append(k)
            tasks.append(("gold", g, ""))
    for k, task, (value, failed) in zip(where, tasks, _run(tasks, timeout)):
        out[k] = None if failed else value
        if not failed and len(_GOLD_OK) < GOLD_CACHE_SIZE:
            _GOLD_OK[task[1]] = value
    return out


# --------------------------------------------------------------------------------------------
# Inside a grader worker process
# --------------------------------------------------------------------------------------------
# sympy recurses once per nesting level of an expression; Python's default 1000 is too low.
WORKER_RECURSION_LIMIT = 10_000
# Parsed reference answers a worker keeps: the samples of a group share one reference answer.
WORKER_GOLD_CACHE_SIZE = 4096
# Graded once at start-up so that the first real answer does not pay for the LaTeX parser's set-up.
_WARMUP_PAIR = ("\\frac{1}{2}", "0.5")
# One grading task per process: native thread pools would only compete with the other workers.
_SINGLE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
# 10,\!000 / 10{,}000 / 10\,000 / 10,\ 000: thousands separators that math-verify does not drop.
_THOUSANDS_RE = re.compile(r"(\d)\s*(?:,\s*\\!|\{,\}|\\,|,\\ )\s*(?=\d{3}(?!\d))")

_MV: dict = {}  # math-verify's parse, verify and extraction config, loaded by _init_worker


def _init_worker(max_memory_mb: int) -> None:
    """The pool's initializer: bound the worker, then load and warm up math-verify."""
    # pebble's SIGTERM handler is Python code, which waits while the worker is in a C call that does
    # not check for signals; pebble then waits 3 s before SIGKILL, and no worker can take a task
    # meanwhile. With the default action a timed-out worker dies at once.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _limit_address_space(max_memory_mb)
    sys.setrecursionlimit(WORKER_RECURSION_LIMIT)
    os.environ.update(_SINGLE_THREAD_ENV)
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    _MV.update(parse=parse, verify=verify,
               config=[LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()])
    # math-verify logs every answer it cannot parse; silenced after the import so that a failing
    # import still shows its traceback (pebble logs initializer errors).
    logging.disable(logging.CRITICAL)
    _equal(*_WARMUP_PAIR)


def _limit_address_space(max_memory_mb: int) -> None:
    """A sympy blow-up then raises MemoryError in the worker (a 0) instead of swapping the machine."""
    if max_memory_mb <= 0:
        return
    limit = max_memory_mb << 20
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard == resource.RLIM_INFINITY or limit < hard:
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _limit_cpu_time(budget_s: int) -> None:
    """Orphan guard: if the parent dies, nobody enforces the timeout any more, and a worker stuck
    in C code would spin forever; the kernel kills it after `budget_s` more CPU seconds."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    soft = math.ceil(usage.ru_utime + usage.ru_stime) + budget_s
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


def _check_in_worker(op: str, gold: str, pred: str, cpu_budget_s: int) -> bool:
    """One pool task. op "eq": are gold and pred equivalent; op "gold": does math-verify parse gold."""
    _limit_cpu_time(cpu_budget_s)
    try:
        return _gold_ok(gold) if op == "gold" else _equal(gold, pred)
    except Exception:  # noqa: BLE001 - odd input may raise anywhere in sympy: it grades as 0
        return False


def _variants(answer: str):
    yield answer
    plain = _THOUSANDS_RE.sub(r"\1", answer)
    if plain != answer:
        yield plain
    if any(ch.isspace() for ch in plain) and "\\text" not in plain and "\\mbox" not in plain:
        yield "".join(plain.split())


def _parse_answer(answer: str, fallback: bool = True) -> list:
    """math-verify's parse of a bare answer (math-verify's signal timeouts off).

    Retried with thousands separators removed and without spaces (math-verify's unit stripping
    eats a letter after a space: `a + b + c` -> `a +`); `fallback` keeps the raw string when
    nothing parses.
    """
    parse, config = _MV["parse"], _MV["config"]
    for v in _variants(answer):
        res = parse("\\boxed{" + v + "}", config, parsing_timeout=None, fallback_mode="no_fallback")
        if res:
            return res
    if fallback:
        return parse("\\boxed{" + answer + "}", config, parsing_timeout=None)
    return []


@functools.lru_cache(maxsize=WORKER_GOLD_CACHE_SIZE)
def _parse_gold(gold: str) -> list:
    return _parse_answer(gold)


def _equal(gold: str, pred: str) -> bool:
    gold_parsed = _parse_gold(gold)
    if not gold_parsed:
        return False
    pred_parsed = _parse_answer(pred)
    if not pred_parsed:
        return False
    return bool(_MV["verify"](gold_parsed, pred_parsed, timeout_seconds=None))


def _gold_ok(gold: str) -> bool:
    return bool(_parse_answer(gold, fallback=False))
