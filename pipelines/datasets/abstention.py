"""Abstention: is a response's final answer "I don't know"? (UCPO, docs/ALGORITHM.md §8)

A response abstains when its final answer, the content of its last complete ``\\boxed{}`` (the
same box the `boxed` grading rule reads, `grading.extract_boxed`), is one of the abstention
phrases. The check runs before math-verify, in the training reward (pipelines/reward.py) and in
`ngrpo eval --abstention`, so an abstention is never graded as an answer.

Matching is exact after normalisation, not a substring search (``\\boxed{5, I don't know why}``
is an answer): ``\\text{}``-like wrappers are unwrapped, LaTeX spaces, ``$`` and quotes removed,
curly apostrophes made straight, case and runs of spaces ignored, and final ``.`` or ``!``
dropped. The phrases and the prompt sentence are ngrpo's choice: the UCPO paper's own are not
confirmed (docs/FIDELITY.md, "UCPO").
"""
from __future__ import annotations

import re
from typing import Iterable, Optional, Sequence, Tuple, Union

from openrlhf_patch.algorithms import ESTIMATOR_OPTIONS

# The option's default: phrases separated by "|" (a recipe setting, `--abstention-phrases`).
DEFAULT_PHRASES_TEXT: str = ESTIMATOR_OPTIONS["abstention_phrases"][0]
PHRASE_SEPARATOR = "|"

_WRAPPER_RE = re.compile(r"\\(?:text|textrm|textbf|textit|textsf|texttt|mathrm|mathbf|mathit|mathsf|mbox|emph|"
                         r"operatorname)\s*\{([^{}]*)\}")
_LATEX_SPACE_RE = re.compile(r"\\[,;:! ]|~|\\quad|\\qquad")
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "`": "'", "\u02bc": "'"})
_SPACES_RE = re.compile(r"\s+")


def split_phrases(phrases: Union[str, Iterable[str], None]) -> Tuple[str, ...]:
    """The phrases of PHRASES ("a|b|c" or a list) normalised, empty ones left out."""
    if phrases is None:
        phrases = DEFAULT_PHRASES_TEXT
    items = phrases.split(PHRASE_SEPARATOR) if isinstance(phrases, str) else list(phrases)
    out = tuple(dict.fromkeys(n for n in (normalise(p) for p in items) if n))
    if not out:
        raise ValueError(f"no abstention phrase in {phrases!r} (phrases are separated by {PHRASE_SEPARATOR})")
    return out


def normalise(answer: str) -> str:
    """ANSWER as compared with the phrases: wrappers unwrapped, LaTeX spaces, $ and quotes removed,
    apostrophes straight, lower case, single spaces, no final . or !"""
    text = answer
    while True:
        unwrapped = _WRAPPER_RE.sub(r"\1", text)
        if unwrapped == text:
            break
        text = unwrapped
    text = _LATEX_SPACE_RE.sub(" ", text).replace("\\'", "'").replace("$", "").translate(_APOSTROPHES)
    text = _SPACES_RE.sub(" ", text).strip().strip("\"'").strip()
    return text.rstrip(".!").strip().lower()


def is_abstention_answer(answer: Optional[str], phrases: Union[str, Sequence[str], None] = None) -> bool:
    """Whether an extracted final answer is an abstention phrase (None, no answer: False)."""
    if answer is None:
        return False
    return normalise(answer) in split_phrases(phrases)


def abstains(response: str, phrases: Union[str, Sequence[str], None] = None) -> bool:
    """Whether RESPONSE's final boxed answer (its last complete \\boxed{}) is an abstention phrase."""
    from pipelines.datasets.grading import extract_boxed

    return is_abstention_answer(extract_boxed(response), phrases)


def abstentions(responses: Sequence[str], phrases: Union[str, Sequence[str], None] = None) -> list:
    """`abstains` for each response (the phrases normalised once)."""
    from pipelines.datasets.grading import extract_boxed

    normalised = split_phrases(phrases)
    out = []
    for r in responses:
        answer = extract_boxed(r)
        out.append(answer is not None and normalise(answer) in normalised)
    return out
