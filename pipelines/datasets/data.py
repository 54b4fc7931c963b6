"""Data preparation: benchmark names, local files, Hub datasets and synthetic problems -> one JSONL.

Every source is normalised to records::

    {"id": "math500/test/precalculus/807.json", "problem": "...", "answer": "\\left( 3, \\frac{\\pi}{2} \\right)",
     "source": "math500", "metadata": {"level": 2, "subject": "Precalculus", ...}}

which `ngrpo train` and `ngrpo eval` read back with :func:`load_problems`. Ids are prefixed with the
source name so that several sources can share one file.

Benchmark names
---------------
By default a benchmark name is loaded from the Hugging Face Hub with ``datasets.load_dataset``; with
``data_dir`` (``--data-dir``, or the environment variable ``NGRPO_DATA_DIR``) it is read from a local
folder laid out like the project's shared data folder.

============  ==============================================  =======  ==========================
name          Hub dataset (config)                            split    local file under data_dir
============  ==============================================  =======  ==========================
math500       HuggingFaceH4/MATH-500                          test     math500/test.jsonl
aime2025      math-ai/aime25                                  test     aime2025/test.parquet
amc23         math-ai/amc23                                   test     amc23/test.parquet
aime24        HuggingFaceH4/aime_2024                         train    aime24/test.jsonl
math-train    DigitalLearningGmbH/MATH-lighteval (default)    train    math/train.parquet
math-test     DigitalLearningGmbH/MATH-lighteval (default)    test     math/test.parquet
============  ==============================================  =======  ==========================

(The NGRPO authors' verl-layout copies are TianHongZXY/MATH, TianHongZXY/AIME2025 and
TianHongZXY/amc23; pass such an id as a SOURCE to use them.) MATH-500 is a subset of MATH test.

Row layouts
-----------
* plain: ``problem`` (or ``question``) and ``answer``; when the answer is missing, the final
  boxed answer of ``solution`` is used: its last ``\\boxed{}`` together with the boxes just before
  it that only separators keep apart (``$\\boxed{1}$ and $\\boxed{9}$`` -> "1, 9"; see
  grading.extract_boxed_answer).
* verl RL layout: ``prompt`` (chat list; the last user message is the problem unless
  ``reward_model.ground_truth.question`` exists) and ``reward_model.ground_truth.target``. When the
  ground truth also carries the original ``solution``, its final boxed answer is used and the
  verl ``target`` is kept in ``metadata["target"]``: verl's targets are normalised strings that are
  lossy for math-verify (matrix rows ``\\\\`` collapsed to ``\\``, ``\\text{}`` removed, ...).

Validation: the row rules are one function, :func:`check_row`, which `ngrpo train` applies too
(:func:`load_problems`). A row is refused when it nests deeper than ``MAX_NESTING`` levels or
holds a lone surrogate (``"\\ud800"`` is valid JSON but no Unicode); when its problem is missing,
empty or not a string; when its answer is missing or empty, a boolean, NaN, an infinity or an
object/list (a JSON number is an answer as written in the file: ``42`` -> "42", ``1.50`` ->
"1.50"); when the answer, or the solution it comes from, has a ``\\boxed{`` that is never closed
(``\\boxed{5``: no response could match it); when math-verify cannot
parse the gold answer; or when its id repeats another. Each is an
error of one line naming the file, the 1-based row (line for JSONL), the field and why; nothing is
written unless ``skip_invalid``. A file that is not valid UTF-8 JSON is refused the same way (per
line for JSONL), and a path that is not a regular file (a FIFO, a device, a directory with a data
file suffix) is refused before it is opened.
"""
from __future__ import annotations

import json
import math
import os
import random
import re
import stat
import sys
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional
from urllib.parse import parse_qsl

try:  # a DataError is also a click error, so the CLI prints it cleanly and exits 1
    from click import ClickException as _ErrorBase
except ImportError:  # pragma: no cover
    _ErrorBase = Exception


class DataError(_ErrorBase, ValueError):
    """Bad input data; the message names file, row and field."""

    def __init__(self, message: str, issues: Optional[list] = None):
        super().__init__(message)
        self.issues = issues or []

    def __str__(self):
        return self.message if hasattr(self, "message") else super().__str__()


@dataclass(frozen=True)
class Benchmark:
    name: str
    hub_id: str
    config: Optional[str]
    split: str
    local: str  # path under data_dir


BENCHMARKS = {
    b.name: b
    for b in [
        Benchmark("math500", "HuggingFaceH4/MATH-500", None, "test", "math500/test.jsonl"),
        Benchmark("aime2025", "math-ai/aime25", None, "test", "aime2025/test.parquet"),
        Benchmark("amc23", "math-ai/amc23", None, "test", "amc23/test.parquet"),
        Benchmark("aime24", "HuggingFaceH4/aime_2024", None, "train", "aime24/test.jsonl"),
        Benchmark("math-train", "DigitalLearningGmbH/MATH-lighteval", "default", "train", "math/train.parquet"),
        Benchmark("math-test", "DigitalLearningGmbH/MATH-lighteval", "default", "test", "math/test.parquet"),
    ]
}
EVAL_BENCHMARKS = ("math500", "aime2025", "amc23", "aime24")
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
_HUB_RE = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?::(?P<config>[\w.-]+))?(?:@(?P<split>[\w.\[\]:%+-]+))?$")
_GENERIC_STEMS = {"test", "train", "validation", "val", "dev", "raw", "data", "problems"}

PROBLEM_KEYS = ("problem", "question", "Problem", "Question", "query", "input")
ANSWER_KEYS = ("answer", "final_answer", "Answer", "target", "ground_truth", "gt", "label", "expected_answer")
MAX_METADATA_CHARS = 2000  # a nested field longer than this as JSON is left out of the metadata
_SKIP_META = set(PROBLEM_KEYS) | set(ANSWER_KEYS) | {"prompt", "reward_model", "solution", "messages", "id"}


def default_data_dir() -> Optional[str]:
    return os.environ.get("NGRPO_DATA_DIR") or None


# --------------------------------------------------------------------------------------------
# Raw rows: (row number, dict) from every kind of source
# --------------------------------------------------------------------------------------------
@dataclass
class RawSource:
    name: str  # the `source` field and the id prefix
    label: str  # what error messages call it (a path, hf:..., synthetic:...)
    unit: str  # "line" for JSONL, else "row"
    rows: Iterable  # (1-based number, dict | Exception)
    total: Optional[int] = None
    extra_meta: dict = field(default_factory=dict)


def _to_python(value):
    """numpy/pyarrow scalars and arrays -> plain Python (for JSON and isinstance checks)."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, dict):
        return {k: _to_python(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_python(v) for v in value]
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return _to_python(tolist())
    item = getattr(value, "item", None)
    if callable(item):
        return item()
    return value


MAX_NESTING = 100  # a row nested deeper than this (objects and lists) is refused


class _JsonFloat(float):
    """A JSON number with a fraction or exponent that keeps its text, so that an answer written
    as 1.50 stays "1.50" (a float would print 1.5)."""

    __slots__ = ("text",)

    def __new__(cls, text):
        obj = super().__new__(cls, text)
        obj.text = text
        return obj

    def __reduce__(self):
        return _JsonFloat, (self.text,)


class _TooDeep(ValueError):
    pass


def _json_loads(text: str):
    """json.loads of user data; a value nested too deeply for the parser is a ValueError too."""
    try:
        return json.loads(text, parse_float=_JsonFloat)
    except RecursionError:
        raise _TooDeep(f"nested deeper than {MAX_NESTING} levels") from None


_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _not_regular(mode: int) -> Optional[str]:
    if stat.S_ISREG(mode):
        return None
    return next((what for test, what in _FILE_KINDS if test(mode)), "not a regular file")


def read_user_file(path) -> bytes:
    """The bytes of a user's data file. Anything but a regular file (a FIFO would block forever, a
    device never end) is refused before it is opened, and again after (it may have been swapped)."""
    path = Path(path)
    try:
        kind = _not_regular(os.stat(path).st_mode)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read: {err.strerror or err}") from None
    if kind:
        raise DataError(f"{path}: not a regular file ({kind}); give a data file")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(fd, "rb") as f:
            kind = _not_regular(os.fstat(f.fileno()).st_mode)
            if kind:
                raise DataError(f"{path}: not a regular file ({kind}); give a data file")
            return f.read()
    except OSError as err:
        raise DataError(f"{path}: cannot read: {err.strerror or err}") from None


def _utf8_error(err: UnicodeDecodeError, data: bytes) -> str:
    line = data.count(b"\n", 0, err.start) + 1
    column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
    return f"invalid UTF-8 (byte 0x{data[err.start]:02x} at line {line} column {column})"


def _iter_jsonl_bytes(data: bytes):
    """(line number, value or BadLine) for each non-blank line of a user's JSON-lines file; each
    line that is not UTF-8 JSON (or nests too deeply) becomes a BadLine saying why. As
    rundir.iter_jsonl, a last line without its newline counts when it parses, else it is torn."""
    from pipelines.launch.rundir import BadLine

    lines = data.split(b"\n")
    for number, raw in enumerate(lines, 1):
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark
            raw = raw[3:]
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            yield number, BadLine(f"invalid UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1})")
            continue
        try:
            yield number, _json_loads(text)
        except _TooDeep as err:
            yield number, BadLine(str(err))
        except ValueError as err:
            torn = number == len(lines)
            why = "line cut off (no newline after it)" if torn else f"invalid JSON ({getattr(err, 'msg', err)})"
            yield number, BadLine(why, torn=torn)


def _read_jsonl(path: Path):
    """(line number, row or rundir.BadLine) of a user's JSON-lines file; every bad line, a torn
    last one too, becomes an error naming its line. The file itself is read at once."""
    return _iter_jsonl_bytes(read_user_file(path))


def _read_json(path: Path):
    data = read_user_file(path)
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark
        data = data[3:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: {_utf8_error(err, data)}") from None
    try:
        value = _json_loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # one JSON value per line (JSON lines) in a .json file
            return list(_iter_jsonl_bytes(data))
        raise DataError(f"{path}: invalid JSON ({err.msg} at line {err.lineno})") from None
    except ValueError as err:
        raise DataError(f"{path}: {err}") from None
    if isinstance(value, dict):
        for key in ("data", "rows", "problems", "examples", "test", "train"):
            if isinstance(value.get(key), list):
                value = value[key]
                break
    if not isinstance(value, list):
        raise DataError(f"{path}: expected a JSON list of objects (or JSONL)")
    return list(enumerate(value, 1))


def _read_parquet(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = read_user_file(path)
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError, ValueError) as err:
        raise DataError(f"{path}: not a readable Parquet file ({' '.join(str(err).split())})") from None
    return [(n, _to_python(row)) for n, row in enumerate(table.to_pylist(), 1)]


def _source_name_for_file(path: Path) -> str:
    stem = path.stem
    if stem.lower() in _GENERIC_STEMS and path.parent.name:
        return f"{path.parent.name}-{stem}"
    return stem


def read_file_source(path, name: Optional[str] = None) -> RawSource:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    name = name or _source_name_for_file(path)
    if suffix == ".jsonl":
        data = read_user_file(path)
        total = sum(1 for line in data.split(b"\n") if line.strip())
        return RawSource(name, str(path), "line", _iter_jsonl_bytes(data), total)
    if suffix == ".json":
        rows = _read_json(path)
        # a .json file can also hold JSON lines
        return RawSource(name, str(path), "row", rows, len(rows))
    if suffix == ".parquet":
        rows = _read_parquet(path)
        return RawSource(name, str(path), "row", rows, len(rows))
    raise DataError(f"{path}: unsupported file type {suffix!r} (use .jsonl, .json or .parquet)")


def load_hub_rows(repo: str, config: Optional[str] = None, split: Optional[str] = None):
    """Rows of a Hugging Face dataset via ``datasets.load_dataset`` (a Hub id or a local dataset folder)."""
    try:
        import datasets
    except ImportError as err:  # pragma: no cover
        raise DataError(f"hf:{repo}: the `datasets` package is needed to load Hub datasets ({err})") from None
    label = f"hf:{repo}" + (f":{config}" if config else "") + (f"@{split}" if split else "")
    try:
        if split is None:
            dsd = datasets.load_dataset(repo, config)
            splits = list(dsd.keys())
            if len(splits) != 1:
                raise DataError(f"{label}: the dataset has splits {splits}; choose one with {repo}@SPLIT")
            ds = dsd[splits[0]]
        else:
            ds = datasets.load_dataset(repo, config, split=split)
    except DataError:
        raise
    except Exception as err:  # network, missing dataset, bad split...
        raise DataError(f"{label}: could not load with datasets.load_dataset: {type(err).__name__}: {err}") from None
    return label, [(n, _to_python(row)) for n, row in enumerate(ds, 1)]


def read_hub_source(spec: str, name: Optional[str] = None) -> RawSource:
    m = _HUB_RE.match(spec)
    if not m:
        raise DataError(f"{spec}: not a file, a benchmark name ({', '.join(BENCHMARKS)}), "
                        "synthetic:arith or a Hugging Face dataset id (owner/name[:config][@split])")
    label, rows = load_hub_rows(m.group("repo"), m.group("config"), m.group("split"))
    return RawSource(name or m.group("repo").split("/")[-1], label, "row", rows, len(rows))


# --------------------------------------------------------------------------------------------
# Synthetic arithmetic problems (pipelines/datasets/arith.py)
# --------------------------------------------------------------------------------------------
SYNTHETIC_OPTIONS = {"n": "1000", "level": None, "mix": None, "split": "train", "seed": "0"}


def read_synthetic_source(spec: str) -> RawSource:
    """synthetic:arith?n=N&level=L|mix=NAME&split=train|warmup|test&seed=S (default: level 1, train)."""
    from pipelines.datasets import arith

    body = spec[len("synthetic:"):]
    kind, _, query = body.partition("?")
    if kind != "arith":
        raise DataError(f"{spec}: unknown synthetic generator {kind!r} (available: arith)")
    opts = dict(SYNTHETIC_OPTIONS)
    for key, value in parse_qsl(query.replace(",", "&"), keep_blank_values=True):
        if key not in opts:
            raise DataError(f"{spec}: unknown option {key!r} (options: {', '.join(SYNTHETIC_OPTIONS)})")
        opts[key] = value
    try:
        n, seed = int(opts["n"]), int(opts["seed"])
        level = int(opts["level"]) if opts["level"] is not None else None
    except ValueError:
        raise DataError(f"{spec}: n, level and seed must be integers") from None
    if level is None and opts["mix"] is None:
        level = 1
    try:
        rows = arith.problems(n, level=level, mix=opts["mix"], split=opts["split"], seed=seed)
    except ValueError as err:
        raise DataError(f"{spec}: {err}") from None
    name = f"arith-{f'L{level}' if level is not None else opts['mix']}-{opts['split']}-s{seed}"
    return RawSource(name, spec, "row", list(enumerate(rows, 1)), len(rows),
                     {"generator": "synthetic:arith", "split": opts["split"]})


# --------------------------------------------------------------------------------------------
# Resolving a SOURCE
# --------------------------------------------------------------------------------------------
def benchmark_path(name: str, data_dir) -> Path:
    return Path(data_dir) / BENCHMARKS[name].local


def open_source(spec: str, data_dir=None) -> RawSource:
    """A SOURCE string -> its raw rows: benchmark name, local file, synthetic:..., a Hub id
    (owner/name[:config][@split]) or a local dataset folder (DIR[@split]) read like a Hub dataset."""
    spec = str(spec).strip()
    if spec.startswith("synthetic:"):
        return read_synthetic_source(spec)
    if spec in BENCHMARKS:
        b = BENCHMARKS[spec]
        if data_dir:
            path = benchmark_path(spec, data_dir)
            if not path.exists():
                raise DataError(f"{spec}: {path} not found (--data-dir {data_dir} should hold {b.local})")
            return read_file_source(path, name=spec)
        label, rows = load_hub_rows(b.hub_id, b.config, b.split)
        return RawSource(spec, label, "row", rows, len(rows))
    path = Path(spec).expanduser()
    base, _, split = spec.partition("@")
    if path.suffix.lower() in FILE_SUFFIXES and path.is_dir():  # data.jsonl/ is no dataset folder
        return read_file_source(path)
    if Path(base).expanduser().is_dir():
        # a local dataset folder, read the way a Hub dataset is: datasets.load_dataset(DIR, split=...)
        label, rows = load_hub_rows(str(Path(base).expanduser()), None, split or None)
        return RawSource(Path(base).name, label, "row", rows, len(rows))
    if path.exists() or path.suffix.lower() in FILE_SUFFIXES:
        return read_file_source(path)
    return read_hub_source(spec)


# --------------------------------------------------------------------------------------------
# Normalising rows
# --------------------------------------------------------------------------------------------
def _last_user_message(prompt) -> Optional[str]:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        for msg in reversed(prompt):
            if isinstance(msg, dict) and msg.get("role", "user") == "user":
                return msg.get("content")
    return None


def _level(value):
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(?:level\s*)?(\d+)\s*", value, re.I)
        if m:
            return int(m.group(1))
    return value


def _is_empty(value) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _verl_fields(row: dict, meta: dict):
    """(problem, its field, answer, its field) of a verl RL row. The answer is the boxed answer
    of the ground truth's solution when it has one (`_solution_answer`; verl's normalised targets
    are lossy for math-verify; the target is kept in META), else the target."""
    rm = row.get("reward_model")
    gt = rm.get("ground_truth") if isinstance(rm, dict) else None
    gt = gt if isinstance(gt, dict) else {}
    problem = gt.get("question")
    if _is_empty(problem):
        problem = _last_user_message(row.get("prompt"))
    target = gt.get("target") if "target" in gt else (rm.get("ground_truth") if isinstance(rm, dict) else None)
    solution = gt.get("solution")
    boxed = _solution_answer(solution)
    if boxed is not None:
        if not _is_empty(target):
            meta["target"] = target
        return problem, "prompt", boxed, "reward_model.ground_truth.solution"
    return problem, "prompt", target if not isinstance(target, dict) else None, "reward_model.ground_truth.target"


class _Malformed(str):
    """An answer taken from a solution that cannot be a label; `answer_text` refuses it with WHY."""

    def __new__(cls, why):
        obj = super().__new__(cls, why)
        obj.why = why
        return obj


def _solution_answer(solution):
    """The label a solution gives: its final boxed answer (grading.extract_boxed_answer: the last
    box with the boxes just before it that only separators keep apart, so ``$\\boxed{(-2,18)}$ and
    $\\boxed{(8,38)}$`` gives both points); None when it has none; a _Malformed when a box of it
    is never closed (which box the solution meant to answer with is then unknown)."""
    from pipelines.datasets.grading import extract_boxed_answer, unclosed_brace

    if not isinstance(solution, str):
        return None
    why = unclosed_brace(solution, boxes_only=True)
    if why:
        return _Malformed(f"malformed solution: {why}, so its boxed answer is unknown")
    return extract_boxed_answer(solution)


def _plain_fields(row: dict):
    """(problem, its field, answer, its field) of a plain row: the first non-empty of the usual
    keys, else the boxed answer of `solution` (`_solution_answer`)."""
    problem, problem_field = None, "problem"
    for key in PROBLEM_KEYS:
        if key in row:
            problem, problem_field = row[key], key
            if not _is_empty(problem):
                break
    answer, answer_field, nested = None, "answer", None
    for key in ANSWER_KEYS:
        if key in row and isinstance(row[key], (dict, list)):
            nested = nested or key  # refused below unless another key (or solution) has the answer
        elif key in row:
            answer, answer_field = row[key], key
            if not _is_empty(answer):
                break
    if _is_empty(answer) and isinstance(row.get("solution"), str):
        boxed = _solution_answer(row["solution"])
        if boxed is not None:
            answer, answer_field = boxed, "solution"
        elif answer is None and nested is None:
            answer_field = "answer (or a \\boxed{} answer in solution)"
    if answer is None and nested is not None:
        answer, answer_field = row[nested], nested
    return problem, problem_field, answer, answer_field


def _row_id_and_metadata(row: dict, meta: dict):
    """The row's own id (None if it has none) and its remaining fields as metadata."""
    raw_id = row.get("id", row.get("unique_id"))
    if _is_empty(raw_id):
        extra = row.get("extra_info")
        if isinstance(extra, dict) and extra.get("index") is not None:
            raw_id = extra["index"]
    for key, value in row.items():
        if value is None or key in _SKIP_META or (
                key == "extra_info" and isinstance(value, dict) and set(value) <= {"index", "split"}):
            continue
        if key in ("type", "subject"):
            meta["subject"] = value
        elif key == "level":
            meta["level"] = _level(value)
        elif isinstance(value, (str, int, float, bool)):
            meta[key] = value
        elif isinstance(value, (dict, list)) and len(json.dumps(value, default=str)) < MAX_METADATA_CHARS:
            meta[key] = value
    return None if _is_empty(raw_id) else raw_id, meta


def _json_type(value) -> str:
    if isinstance(value, bool):
        return "a boolean"
    return {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number",
            type(None): "null"}.get(type(value), type(value).__name__)


def _field_name(path) -> str:
    """a.b[0].c, printable whatever the keys hold."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            part = str(part).encode("utf-8", "backslashreplace").decode("utf-8")
            out += f".{part}" if out else part
    return out or "row"


def _unusable_values(row) -> Optional[tuple]:
    """(field, why) for the first value of ROW that no command can use: nesting deeper than
    MAX_NESTING, or a string (or key) holding a lone surrogate, which is no Unicode character
    (JSON can write one, as \\ud800, but UTF-8 cannot). None when all are usable."""
    stack = [(row, (), 1)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, str):
            if not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError as err:
                    return _field_name(path), (f"holds a lone surrogate (\\u{ord(value[err.start]):04x} at "
                                               f"character {err.start + 1}), which is not valid Unicode")
            continue
        if isinstance(value, (dict, list)):
            if depth > MAX_NESTING:
                return _field_name(path[:1]), f"nested deeper than {MAX_NESTING} levels"
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in reversed(list(items)):
                if isinstance(key, str) and not key.isascii():
                    try:
                        key.encode("utf-8")
                    except UnicodeEncodeError:
                        return _field_name(path + (key,)), "the key holds a lone surrogate, which is not valid Unicode"
                stack.append((item, path + (key,), depth + 1))
    return None


def _short(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def answer_text(value) -> tuple:
    """A gold answer as text -> (text, None), or (None, why it is unusable). Strings are cleaned
    as graded (grading.clean_answer); an integer or a finite number is taken as written in the file
    (42 -> "42", 1.50 -> "1.50"); a boolean, NaN or an infinity is no answer, nor a string with a
    ``\\boxed{`` that is never closed (grading.unclosed_brace)."""
    from pipelines.datasets.grading import clean_answer, unclosed_brace

    if isinstance(value, bool):
        return None, f"{str(value).lower()} (a JSON boolean) is not an answer; write the answer as a string"
    if isinstance(value, int):
        return str(value), None
    if isinstance(value, float):
        if math.isnan(value):
            return None, "NaN is not an answer; write the answer as a string"
        if math.isinf(value):
            text = getattr(value, "text", None) or ("Infinity" if value > 0 else "-Infinity")  # JSON's spelling
            return None, f"{text} is not a finite number; write the answer as a string"
        return getattr(value, "text", None) or repr(value), None
    if isinstance(value, _Malformed):
        return None, value.why
    if value is not None and not isinstance(value, str):
        return None, f"expected a string or a number, got {_json_type(value)}"
    why = unclosed_brace(value, boxes_only=True) if value is not None else None
    if why:
        return None, f"malformed answer {_short(value)}: {why}, so no response could match it"
    text = clean_answer(value) if value is not None else ""
    if not text:
        return None, "missing or empty answer"
    return text, None


def check_row(row, problem, problem_field: str, answer, answer_field: str) -> tuple:
    """The row rules of `ngrpo prepare-data` and `ngrpo train` alike: (problem, answer, None, None)
    for a usable row, else (None, None, field, why). A usable row nests at most MAX_NESTING levels,
    holds only valid Unicode, has a non-empty problem string and an answer by `answer_text` (that
    math-verify can parse it is checked after, for all rows at once: `unparseable_answers`)."""
    bad = _unusable_values(row)
    if bad:
        return None, None, bad[0], bad[1]
    if _is_empty(problem):
        return None, None, problem_field, "missing or empty problem"
    if not isinstance(problem, str):
        return None, None, problem_field, f"expected a string, got {_json_type(problem)}"
    answer, why = answer_text(answer)
    if why:
        return None, None, answer_field, why
    return problem.strip(), answer, None, None


def unparseable_answers(answers, progress: Optional[bool] = None) -> dict:
    """{answer: why} for the gold answers among ANSWERS that math-verify cannot parse into a math
    object (grading.gold_answers_parse, as the reward parses them), or times out parsing."""
    from pipelines.datasets.grading import gold_answers_parse

    unique = sorted(set(answers))
    show = progress if progress is not None else len(unique) >= 500
    bad, chunk = {}, 256
    bar = _progress(range(0, len(unique), chunk), (len(unique) + chunk - 1) // chunk,
                    f"checking {len(unique)} answers with math-verify", show)
    for start in bar:
        part = unique[start:start + chunk]
        for answer, ok in zip(part, gold_answers_parse(part)):
            if not ok:
                why = "math-verify timed out parsing" if ok is None else "math-verify cannot parse"
                bad[answer] = f"{why} the gold answer {answer!r}"
    return bad


def normalise_row(row: dict, source_name: str, extra_meta: Optional[dict] = None):
    """-> (record, field_of_error, message). record is None on error."""
    if not isinstance(row, dict):
        return None, "row", f"expected an object, got {_json_type(row)}"
    meta = dict(extra_meta or {})
    rm = row.get("reward_model")
    verl = (isinstance(rm, dict) and isinstance(rm.get("ground_truth"), dict)) or \
        ("prompt" in row and not isinstance(row["prompt"], str))
    problem, problem_field, answer, answer_field = _verl_fields(row, meta) if verl else _plain_fields(row)
    problem, answer, bad_field, why = check_row(row, problem, problem_field, answer, answer_field)
    if why:
        return None, bad_field, why
    raw_id, meta = _row_id_and_metadata(row, meta)
    record = {"id": None if raw_id is None else f"{source_name}/{raw_id}", "problem": problem,
              "answer": answer, "source": source_name, "metadata": meta}
    solution = row.get("solution")
    if verl and isinstance(rm, dict) and isinstance(rm.get("ground_truth"), dict):
        solution = rm["ground_truth"].get("solution")
    if isinstance(solution, str) and solution.strip():
        record["solution"] = solution  # SGPO's judge reads it (openrlhf_patch/judge.py)
    return record, answer_field, None


@dataclass
class Issue:
    label: str
    unit: str
    number: int
    field: str
    message: str

    def __str__(self):
        return f"{self.label}: {self.unit} {self.number}: field '{self.field}': {self.message}"


def _progress(iterable, total, desc, enabled):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="row", leave=False, file=sys.stderr)


def collect(sources, data_dir=None, check_answers: bool = True, progress: Optional[bool] = None,
            log: Callable[[str], None] = lambda s: None):
    """Read and validate SOURCEs -> (records, issues). Records with issues are left out."""
    records, issues, seen = [], [], {}
    located = []  # (record, raw source, unit, number, answer field)
    for spec in sources:
        src = spec if isinstance(spec, RawSource) else open_source(spec, data_dir)
        show = progress if progress is not None else (src.total or 0) >= 2000
        start, n_rows = len(located), 0
        for number, row in _progress(src.rows, src.total, f"reading {src.label}", show):
            n_rows += 1
            if isinstance(row, Exception):
                issues.append(Issue(src.label, src.unit, number, "json", str(row)))
                continue
            rec, fld, err = normalise_row(row, src.name, src.extra_meta)
            if err:
                issues.append(Issue(src.label, src.unit, number, fld, err))
                continue
            if rec["id"] is None:
                rec["id"] = f"{src.name}/{number - 1}"
            located.append((rec, src, number, fld))
        bad = n_rows - (len(located) - start)
        log(f"{src.label}: {n_rows} rows read" + (f" ({bad} without a usable problem/answer)" if bad else ""))
    # duplicate ids
    for rec, src, number, fld in located:
        if rec["id"] in seen:
            first = seen[rec["id"]]
            issues.append(Issue(src.label, src.unit, number, "id",
                                f"duplicate id {rec['id']!r} (first at {first[0]} {first[1]} {first[2]})"))
            rec["_bad"] = True
        else:
            seen[rec["id"]] = (src.label, src.unit, number)
    # gold answers math-verify cannot parse
    if check_answers:
        bad = unparseable_answers([rec["answer"] for rec, *_ in located], progress)
        for rec, src, number, fld in located:
            if rec["answer"] in bad:
                issues.append(Issue(src.label, src.unit, number, fld, bad[rec["answer"]]))
                rec["_bad"] = True
    for rec, src, number, fld in located:
        if not rec.pop("_bad", False):
            records.append(rec)
    issues.sort(key=lambda i: (i.label, i.number))
    return records, issues


# --------------------------------------------------------------------------------------------
# Overlap (contamination) check
# --------------------------------------------------------------------------------------------
_WS_RE = re.compile(r"\s+")


def normalise_text(text: str) -> str:
    """Problem text for overlap checks: NFKC, lower case, no whitespace or $."""
    text = unicodedata.normalize("NFKC", text or "").lower().replace("$", "")
    return _WS_RE.sub("", text).rstrip(".")


def find_overlap(records, reference) -> list:
    """Records whose normalised problem also occurs in `reference` (records): [(record, ref_id)]."""
    index = {}
    for r in reference:
        index.setdefault(normalise_text(r["problem"]), r["id"])
    return [(rec, index[k]) for rec in records if (k := normalise_text(rec["problem"])) in index]


# --------------------------------------------------------------------------------------------
# Writing and reading the normalised JSONL
# --------------------------------------------------------------------------------------------
def write_jsonl_atomic(records, out_path) -> Path:
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out_path


def load_problems(path, check_answers: bool = True) -> list:
    """Read a normalised JSONL (from `ngrpo prepare-data`): [{id, problem, answer, source, metadata}].

    The rows follow the rules of `ngrpo prepare-data` (`check_row`; with CHECK_ANSWERS math-verify
    must parse every gold answer). Raises DataError, one line naming file, line, field and why,
    for the first bad row, a duplicate id, or a file that is not a readable regular file.
    """
    path = Path(path)
    if path.suffix.lower() != ".jsonl":
        raise DataError(f"{path}: expected the .jsonl written by `ngrpo prepare-data` "
                        f"(convert other files with `ngrpo prepare-data {path} -o problems.jsonl`)")

    def fail(n, fld, why):
        raise DataError(str(Issue(str(path), "line", n, fld, why)))

    out, seen, lines = [], {}, []
    for n, row in _read_jsonl(path):
        if isinstance(row, Exception):
            fail(n, "json", str(row))
        if not isinstance(row, dict):
            fail(n, "row", f"expected an object, got {_json_type(row)}")
        problem, answer, fld, why = check_row(row, row.get("problem"), "problem", row.get("answer"), "answer")
        if why:
            fail(n, fld, why)
        rid = row.get("id")
        if isinstance(rid, int) and not isinstance(rid, bool):
            rid = str(rid)
        if not isinstance(rid, str) or not rid.strip():
            fail(n, "id", "missing or empty" if _is_empty(rid) else f"expected a string, got {_json_type(rid)}")
        if rid in seen:
            fail(n, "id", f"duplicate id {rid!r} (first at line {seen[rid]})")
        seen[rid] = n
        meta = row.get("metadata", {})
        if meta is None:
            meta = {}
        if not isinstance(meta, dict):
            fail(n, "metadata", "expected an object")
        source = row.get("source")
        out.append({"id": rid, "problem": problem, "answer": answer,
                    "source": source if isinstance(source, str) and source else path.stem, "metadata": meta})
        if isinstance(row.get("solution"), str) and row["solution"].strip():
            out[-1]["solution"] = row["solution"]  # SGPO's reference solution
        lines.append(n)
    if not out:
        raise DataError(f"{path}: no problems")
    if check_answers:
        from pipelines.datasets import grading

        had_pool = grading._own_pool() is not None
        bad = unparseable_answers([rec["answer"] for rec in out], progress=False)
        if not had_pool:  # leave no idle grader processes behind (train holds on for hours)
            grading.shutdown()
        for rec, n in zip(out, lines):
            if rec["answer"] in bad:
                fail(n, "answer", bad[rec["answer"]])
    return out


def load_benchmark(spec: str, data_dir=None, check_answers: bool = False) -> tuple:
    """(name, records) for an eval benchmark: a name, a normalised JSONL, or any SOURCE."""
    p = Path(spec).expanduser()
    if spec not in BENCHMARKS and p.suffix.lower() == ".jsonl" and p.exists():
        try:
            return _source_name_for_file(p), load_problems(p, check_answers=check_answers)
        except DataError:
            pass  # not normalised: fall through to the generic reader
    records, issues = collect([spec], data_dir=data_dir, check_answers=check_answers, progress=False)
    if issues:
        raise DataError(_format_issues(issues))
    if spec in BENCHMARKS:
        name = spec
    elif p.exists() and p.is_file():
        name = _source_name_for_file(p)
    else:  # synthetic:..., a Hub id, a dataset folder: the source name (e.g. arith-d1-s0, MATH-500)
        name = records[0]["source"] if records else spec.replace("/", "_").replace(":", "_")
    return name, records


def _format_issues(issues, limit: int = 20) -> str:
    lines = [str(i) for i in issues[:limit]]
    if len(issues) > limit:
        lines.append(f"... and {len(issues) - limit} more")
    return "\n".join(lines)


def summarise_issues(issues) -> str:
    from collections import Counter

    counts = Counter(f"{i.field}: {i.message.split(' the gold')[0].split(' (first')[0].split(' ' + repr(''))[0]}"
                     for i in issues)
    return "; ".join(f"{n} x {why}" for why, n in counts.most_common())


def _benchmark_overlaps(records, benchmarks, data_dir, log, dropping: bool) -> dict:
    """{benchmark: [ids of RECORDS whose problem also occurs in it]}, each reported in one line."""
    overlaps = {}
    for bench in benchmarks:
        _, ref = load_benchmark(bench, data_dir=data_dir)
        hits = find_overlap(records, ref)
        overlaps[bench] = [rec["id"] for rec, _ in hits]
        if hits:
            examples = ", ".join(f"{rec['id']} = {ref_id}" for rec, ref_id in hits[:3])
            log(f"overlap with {bench}: {len(hits)} of {len(records)} problems also occur in {bench} (e.g. {examples})"
                + (" -- dropped" if dropping else ""))
        else:
            log(f"overlap with {bench}: none")
    return overlaps


def prepare(sources, out, data_dir=None, limit=None, shuffle=False, seed=0, skip_invalid=False,
            check_answers=True, check_overlap=None, drop_overlap=False, progress=None,
            log: Callable[[str], None] = print) -> dict:
    """The whole of `ngrpo prepare-data`. Returns a summary dict; raises DataError on bad input.

    Order: validate, shuffle, drop benchmark overlaps, then --limit (so that --limit N writes N
    problems whenever N clean ones exist)."""
    data_dir = data_dir or default_data_dir()
    records, issues = collect(sources, data_dir=data_dir, check_answers=check_answers, progress=progress, log=log)
    if issues and not skip_invalid:
        raise DataError(f"{len(issues)} invalid row(s); nothing written (use --skip-invalid to drop them):\n"
                        + _format_issues(issues))
    if issues:
        log(f"skipped {len(issues)} invalid row(s): {summarise_issues(issues)}")
        for line in _format_issues(issues).splitlines():
            log(f"  {line}")
    if shuffle:
        random.Random(seed).shuffle(records)
    if check_overlap is None:
        names = [b for b in EVAL_BENCHMARKS if data_dir and benchmark_path(b, data_dir).exists()]
        check_overlap = [b for b in names if b not in sources]
    if drop_overlap:
        overlaps = _benchmark_overlaps(records, check_overlap, data_dir, log, dropping=True)
        drop = {i for ids in overlaps.values() for i in ids}
        records = [r for r in records if r["id"] not in drop]
        if not records:
            raise DataError("every problem overlaps a benchmark; nothing to write")
    if limit is not None:
        records = records[:limit]
    if not records:
        raise DataError("no valid problems to write")
    if not drop_overlap:
        overlaps = _benchmark_overlaps(records, check_overlap, data_dir, log, dropping=False)
    write_jsonl_atomic(records, out)
    from collections import Counter

    by_source = dict(Counter(r["source"] for r in records))
    log(f"wrote {len(records)} problems to {out} ({', '.join(f'{k}: {v}' for k, v in by_source.items())})")
    return {"written": len(records), "skipped": len(issues), "issues": [str(i) for i in issues],
            "by_source": by_source, "overlap": {k: len(v) for k, v in overlaps.items()}, "out": str(out)}
