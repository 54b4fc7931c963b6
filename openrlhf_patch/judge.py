"""SGPO's step judge (docs/ALGORITHM.md §10): graded rewards for the responses of all-wrong groups.

Each response of a group in which every response is wrong is cut into numbered steps (paragraphs
separated by blank lines) and sent, with the problem and the reference solution, to a judge model
behind any OpenAI-compatible chat endpoint (`POST {url}/chat/completions`, e.g. `vllm serve`). The
judge names the first wrong step k (or none). RTS, the share of the response before step k
(characters by default, or steps), becomes the reward

    min(0.999 R_max, R_max * sigmoid(beta * (RTS - gamma)))

which rises with RTS and stays below R_max, so a graded response is never counted as correct.
beta, gamma, the direction of the logistic, the 0.999 cap and the judge prompt are not confirmed
from the SGPO paper (docs/FIDELITY.md).

Calls run concurrently on a thread pool, each bounded by a timeout and retried once; verdicts are
cached by sha256(problem, response). A failed or unparsable judgement leaves the reward at 0 and
is counted. Standard library only: this runs in the trainer process (on CPU, the driver).
"""
import concurrent.futures
import dataclasses
import hashlib
import json
import math
import os
import re
import threading
import time
import urllib.error
import urllib.request
from typing import List, Optional, Tuple

DEFAULT_PROMPT_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sgpo_judge_prompt.txt")
# The cap below R_max: a graded response must never reach the reward of a correct one (unconfirmed).
CAP = 0.999
RTS_UNITS = ("chars", "steps")
_VERDICT = re.compile(r"FIRST[ _-]?WRONG[ _-]?STEP\s*[:=]\s*\**\s*(none|\d+)", re.IGNORECASE)
_BLANK_LINE = re.compile(r"\n[ \t]*\n")


# The reference solutions of a run, keyed by the prompt text OpenRLHF hands the refill loop:
# {"prompt", "problem", "solution"} a line, written next to RUN_DIR/data/train.jsonl at launch. The
# label stays the bare answer, so the math-verify reward is untouched.
REFERENCES_FILE = os.path.join("data", "sgpo_references.jsonl")
# the judge prompt as the run started with it: a resume reads this copy, not the user's file again
PROMPT_COPY = os.path.join("data", "sgpo_judge_prompt.txt")


def write_references(path: str, rows) -> None:
    """ROWS: (prompt, problem, solution) triples."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for prompt, problem, solution in rows:
            f.write(json.dumps({"prompt": prompt, "problem": problem, "solution": solution}) + "\n")
    os.replace(tmp, path)


def load_references(run_dir: Optional[str]) -> dict:
    """{prompt: (problem, solution)} of RUN_DIR's references file; JudgeError when it is missing."""
    path = os.path.join(run_dir or "", REFERENCES_FILE)
    if not run_dir or not os.path.exists(path):
        raise JudgeError(f"SGPO: no reference solutions at {path} (the launch writes them from the data's "
                         "'solution' field)")
    out = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                out[row["prompt"]] = (row["problem"], row["solution"])
    return out


def first_without_solution(problems) -> Optional[Tuple[int, str]]:
    """(1-based row, id) of the first problem without a non-empty 'solution' string, else None."""
    for n, p in enumerate(problems, 1):
        solution = p.get("solution")
        if not isinstance(solution, str) or not solution.strip():
            return n, str(p.get("id"))
    return None


class JudgeError(RuntimeError):
    """The judge failed on more than the allowed share of a step's responses, or is misconfigured."""


@dataclasses.dataclass(frozen=True)
class JudgeSettings:
    url: str
    model: str
    prompt: str  # the template's text; placeholders {problem} {solution} {steps} {n_steps}
    timeout: float = 60.0
    workers: int = 8
    max_fail_share: float = 0.5
    beta: float = 5.0
    gamma: float = 0.5
    unit: str = "chars"
    max_reward: float = 1.0

    @classmethod
    def from_dict(cls, d: dict) -> "JudgeSettings":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def load_prompt(path: Optional[str]) -> str:
    """The judge prompt template of PATH (None: the one shipped with ngrpo); JudgeError naming
    the file when it cannot be read or lacks a placeholder the judge needs."""
    path = path or DEFAULT_PROMPT_FILE
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as err:
        raise JudgeError(f"--judge-prompt {path}: cannot read it ({err})") from None
    missing = [p for p in ("{problem}", "{steps}") if p not in text]
    if missing:
        raise JudgeError(f"--judge-prompt {path}: the template has no {' and no '.join(missing)} placeholder "
                         "(placeholders: {problem} {solution} {steps} {n_steps})")
    return text


def split_steps(response: str) -> List[str]:
    """The response's steps: its paragraphs (separated by blank lines), stripped, empty ones left out."""
    return [s.strip() for s in _BLANK_LINE.split(response.replace("\r\n", "\n")) if s.strip()]


def number_steps(steps: List[str]) -> str:
    return "\n\n".join(f"Step {i}: {s}" for i, s in enumerate(steps, 1))


def build_messages(template: str, problem: str, solution: str, steps: List[str]) -> list:
    """The chat request's messages: the template with its placeholders filled in (str.replace,
    so the braces of LaTeX in the problem need no escaping)."""
    text = (template.replace("{problem}", problem).replace("{solution}", solution or "")
            .replace("{n_steps}", str(len(steps))).replace("{steps}", number_steps(steps)))
    return [{"role": "user", "content": text}]


def parse_verdict(text: str, n_steps: int) -> Optional[int]:
    """The first wrong step the judge names (1-based), or n_steps + 1 for 'none'; None when the
    answer has no verdict line or names a step the response does not have. The last verdict wins."""
    found = _VERDICT.findall(text or "")
    if not found:
        return None
    value = found[-1].lower()
    if value == "none":
        return n_steps + 1
    k = int(value)
    return k if 1 <= k <= n_steps else None


def rts(steps: List[str], first_wrong: int, unit: str = "chars") -> float:
    """The share of the response before step FIRST_WRONG (1-based; len(steps) + 1: none wrong):
    characters of the steps before it over all the steps' characters, or steps over steps."""
    if unit not in RTS_UNITS:
        raise ValueError(f"unknown RTS unit {unit!r}; valid: {', '.join(RTS_UNITS)}")
    if not steps:
        return 0.0
    if unit == "steps":
        return (first_wrong - 1) / len(steps)
    total = sum(len(s) for s in steps)
    return sum(len(s) for s in steps[:first_wrong - 1]) / total if total else 0.0


def graded_reward(rts_value: float, beta: float, gamma: float, max_reward: float = 1.0) -> float:
    """min(0.999 R_max, R_max * sigmoid(beta * (RTS - gamma)))."""
    z = beta * (rts_value - gamma)
    sig = 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))
    return min(CAP * max_reward, max_reward * sig)


def cache_key(problem: str, response: str) -> str:
    return hashlib.sha256(json.dumps([problem, response]).encode("utf-8")).hexdigest()


@dataclasses.dataclass
class JudgeStats:
    """One step's cost: HTTP requests made (retries included), responses graded, cache hits,
    failed judgements, seconds spent waiting on the judge, and the last failure's text."""
    calls: int = 0
    judged: int = 0
    cached: int = 0
    failures: int = 0
    seconds: float = 0.0
    last_error: str = ""

    def fail_share(self) -> float:
        return self.failures / self.judged if self.judged else 0.0


class StepJudge:
    """The client of one run: settings, a verdict cache and the stats of the current step."""

    def __init__(self, settings: JudgeSettings):
        if settings.unit not in RTS_UNITS:
            raise JudgeError(f"unknown RTS unit {settings.unit!r}; valid: {', '.join(RTS_UNITS)}")
        self.settings = settings
        self.cache = {}
        self.stats = JudgeStats()
        self._lock = threading.Lock()

    def new_step(self) -> JudgeStats:
        """Start a step's stats; returns the finished step's."""
        done, self.stats = self.stats, JudgeStats()
        return done

    def _request(self, messages: list) -> str:
        body = json.dumps({"model": self.settings.model, "messages": messages, "temperature": 0.0,
                           "max_tokens": 512}).encode("utf-8")
        req = urllib.request.Request(self.settings.url.rstrip("/") + "/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=self.settings.timeout) as resp:
            data = json.loads(resp.read().decode("utf-8"))
        return data["choices"][0]["message"]["content"]

    def _judge_one(self, problem: str, solution: str, steps: List[str]) -> Tuple[Optional[int], str]:
        """(first wrong step or None, error text): two tries, each bounded by the timeout."""
        messages = build_messages(self.settings.prompt, problem, solution, steps)
        error = ""
        for _ in range(2):
            with self._lock:
                self.stats.calls += 1
            try:
                answer = self._request(messages)
            except urllib.error.HTTPError as err:
                error = f"HTTP {err.code} from {self.settings.url}: {err.read()[:200]!r}"
                continue
            except (urllib.error.URLError, OSError, TimeoutError) as err:
                error = f"{self.settings.url}: {getattr(err, 'reason', err)}"
                continue
            except (ValueError, KeyError, IndexError, TypeError) as err:
                error = f"{self.settings.url}: not an OpenAI chat completion ({type(err).__name__}: {err})"
                continue
            verdict = parse_verdict(answer, len(steps))
            if verdict is not None:
                return verdict, ""
            error = f"unparsable judgement (no 'FIRST_WRONG_STEP: k' with 1 <= k <= {len(steps)}): {answer[:200]!r}"
        return None, error

    def grade(self, problem: str, solution: str, responses: List[str]) -> List[Optional[float]]:
        """The graded reward of each response (None where the judgement failed), concurrently."""
        start = time.monotonic()
        s = self.settings
        out: List[Optional[float]] = [None] * len(responses)
        todo = {}
        for i, response in enumerate(responses):
            steps = split_steps(response)
            key = cache_key(problem, response)
            if key in self.cache:
                self.stats.cached += 1
                out[i] = graded_reward(rts(steps, self.cache[key], s.unit), s.beta, s.gamma, s.max_reward)
            elif not steps:
                out[i] = 0.0  # an empty response: nothing to judge, its reward stays 0
            else:
                todo[i] = (key, steps)
        self.stats.judged += len(responses)
        if todo:
            with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(s.workers, len(todo)))) as pool:
                futures = {i: pool.submit(self._judge_one, problem, solution, steps) for i, (_, steps) in todo.items()}
                for i, future in futures.items():
                    verdict, error = future.result()
                    key, steps = todo[i]
                    if verdict is None:
                        self.stats.failures += 1
                        self.stats.last_error = error
                        continue
                    self.cache[key] = verdict
                    out[i] = graded_reward(rts(steps, verdict, s.unit), s.beta, s.gamma, s.max_reward)
        self.stats.seconds += time.monotonic() - start
        return out

    def check_step(self, stats: JudgeStats) -> None:
        """JudgeError when the judge failed on more than --judge-max-fail-share of the step's responses."""
        if stats.judged and stats.fail_share() > self.settings.max_fail_share:
            raise JudgeError(
                f"the SGPO judge ({self.settings.url}, model {self.settings.model!r}) failed on {stats.failures} of "
                f"{stats.judged} responses this step, more than --judge-max-fail-share {self.settings.max_fail_share}; "
                f"last error: {stats.last_error}")
