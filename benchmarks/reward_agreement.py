"""How often ngrpo's reward agrees with Math-Verify's own test cases (issue 33, item 7).

Math-Verify's test suite lists (gold, prediction, expected verdict) triples. This script grades
each through ngrpo's reward path (pipelines.datasets.grading.grade_many, extraction "boxed", as
pipelines/reward.py calls it) and prints three agreement counts:

* math-verify direct vs expected: the test case's own call (its parse config, float precision,
  strictness) with the installed math-verify: where that is already wrong, ngrpo cannot be blamed;
* ngrpo vs expected: the number the study cares about;
* ngrpo vs math-verify direct: how much ngrpo's wrapper changes math-verify's verdicts.

Mapping a test case onto ngrpo's reward (the `response` and `label` fields of the fixture):

* label = the test's gold string as written (ngrpo's clean_answer strips ``$``/``$$`` and takes
  the boxed answer, as prepare-data does for a label);
* response = the test's prediction unchanged when it has a ``\\boxed{}``/``\\fbox{}`` (the reward
  grades its last one); else the prediction with its outer math delimiters (``$..$``, ``$$..$$``,
  ``\\[..\\]``, ``\\(..\\)``) removed, wrapped in ``\\boxed{...}``: ngrpo's reward only ever reads a
  boxed answer, so an unboxed prediction stands for a response that boxed it. ``wrap`` in the
  fixture says which: "as-is", "math" (a delimited or bare formula) or "text" (the prediction holds
  prose around the answer: its last delimited formula is boxed, or, without one, the whole
  prediction less any lone currency ``$``, as a response that boxed its answer would look). A
  prediction that is a whole model response (over MAX_WRAPPED_CHARS characters) with no box is
  left out of the fixture (its header lists them): ngrpo's boxed reward scores it 0 by contract.

The cases come from tests/fixtures/math_verify_cases.jsonl (its first line names the source repo
and commit). To rebuild it from a checkout of github:huggingface/Math-Verify (a bare git dir is
fine)::

    .venv/bin/python benchmarks/reward_agreement.py --extract /path/to/Math-Verify/.git

Run::

    .venv/bin/python benchmarks/reward_agreement.py [--show-disagreements]
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

FIXTURE = REPO_ROOT / "tests" / "fixtures" / "math_verify_cases.jsonl"
SOURCE_REPO = "github:huggingface/Math-Verify"
# The test files with (gold, pred, expected) cases; the others test parse() alone, timeouts or configs.
TEST_FILES = ("tests/test_all.py", "tests/test_boxed.py", "tests/test_numina_cases.py",
              "tests/test_open_thoughts.py", "tests/test_strict.py", "tests/test_yujianll.py")
# compare_strings' defaults in Math-Verify's tests/test_all.py.
DEFAULTS = {"match_types": ["latex", "expr"], "precision": 6, "strict": True, "allow_set_relation_comp": False}

# Agreement measured on this fixture with pipelines/datasets/grading.py as it was before the
# issue-33 item-7 fix (a label was its last box only), printed beside today's numbers.
BEFORE = {"ngrpo_vs_expected": 226, "ngrpo_vs_direct": 226}


# --------------------------------------------------------------------------------------------
# Extraction of the cases from Math-Verify's tests
# --------------------------------------------------------------------------------------------
def _git(git_dir: str, *args) -> str:
    return subprocess.run(["git", "-C", git_dir, *args], check=True, capture_output=True, text=True).stdout


def _call_settings(func: ast.FunctionDef, argnames: list, values: tuple) -> dict:
    """The math-verify call of a test function: compare_strings(...) keywords, or parse() defaults."""
    for node in ast.walk(func):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "compare_strings":
            settings = dict(DEFAULTS, call="compare_strings")
            for kw in node.keywords:
                if isinstance(kw.value, ast.Name) and kw.value.id in argnames:
                    settings[kw.arg] = values[argnames.index(kw.value.id)]
                else:
                    settings[kw.arg] = ast.literal_eval(kw.value)
            return settings
    # test_yujianll: verify(parse(gold), parse(pred)) with parse's and verify's defaults
    return dict(DEFAULTS, call="parse_default")


def _literal(node):
    """A parametrize case: literals, plus the one f-string (f"{math.sqrt(17):.15f}") of the tests,
    evaluated with nothing but the math module in reach."""
    if isinstance(node, ast.Tuple):
        return tuple(_literal(e) for e in node.elts)
    if isinstance(node, ast.JoinedStr):
        return eval(compile(ast.Expression(node), "<math-verify test>", "eval"),  # noqa: S307
                    {"__builtins__": {}, "math": math})
    return ast.literal_eval(node)


_DELIMS = (("$$", "$$"), ("$", "$"), ("\\[", "\\]"), ("\\(", "\\)"))


def _strip_delimiters(text: str):
    """(inner, True) when TEXT is one delimited formula, else (TEXT stripped, False)."""
    s = text.strip()
    for left, right in _DELIMS:
        if s.startswith(left) and s.endswith(right) and len(s) > len(left) + len(right):
            inner = s[len(left):-len(right)]
            if left not in inner and right not in inner:
                return inner.strip(), True
    return s, False


_FORMULA_RE = re.compile(r"(?<!\\)\$\$(.+?)(?<!\\)\$\$|(?<!\\)\$(.+?)(?<!\\)\$|\\\[(.+?)\\\]|\\\((.+?)\\\)", re.S)
_PROSE_RE = re.compile(r"(?<![\\a-zA-Z])[a-zA-Z]{3,}")
_MATH_WORDS = {"and", "or", "cm", "yuan", "percent", "infty"}


# A prediction longer than this without a box is a whole model response that never boxed its answer.
MAX_WRAPPED_CHARS = 300


def response_for(pred: str):
    """(response, wrap) that ngrpo's reward grades for a Math-Verify test prediction (module doc)."""
    if re.search(r"\\(?:boxed|fbox)(?![a-zA-Z])", pred):
        return pred, "as-is"
    inner, delimited = _strip_delimiters(pred)
    words = [w for w in _PROSE_RE.findall(re.sub(r"\\text\{[^{}]*\}", "", inner)) if w.lower() not in _MATH_WORDS]
    if (not delimited and words) or "$" in inner:
        if len(pred) > MAX_WRAPPED_CHARS:
            return pred, "unboxed"
        formulas = _FORMULA_RE.findall(pred)
        formula = next((f for f in reversed([a or b or c or d for a, b, c, d in formulas]) if f.strip()), None)
        if formula is None:  # a lone $ is a currency sign
            formula = re.sub(r"(?<!\\)\$", "", inner)
        return "\\boxed{" + formula.strip() + "}", "text"
    return "\\boxed{" + inner + "}", "math"


def extract_cases(git_dir: str) -> tuple:
    commit = _git(git_dir, "rev-parse", "HEAD").strip()
    cases, skipped = [], []
    for path in TEST_FILES:
        tree = ast.parse(_git(git_dir, "show", f"HEAD:{path}"))
        for func in tree.body:
            if not isinstance(func, ast.FunctionDef):
                continue
            for dec in func.decorator_list:
                if not (isinstance(dec, ast.Call) and getattr(dec.func, "attr", "") == "parametrize"):
                    continue
                argnames = [a.strip() for a in ast.literal_eval(dec.args[0]).split(",")]
                if not {"gold", "pred"} <= set(argnames):
                    continue
                verdict_name = "expected" if "expected" in argnames else "result"
                for k, node in enumerate(dec.args[1].elts):
                    values = _literal(node)
                    row = dict(zip(argnames, values))
                    settings = _call_settings(func, argnames, values)
                    response, wrap = response_for(row["pred"])
                    case = {"id": f"{path}::{func.name}[{k}]", "gold": row["gold"], "pred": row["pred"],
                            "expected": int(row[verdict_name]), "wrap": wrap}
                    if response != row["pred"]:
                        case["response"] = response
                    case.update({k2: v for k2, v in settings.items()
                                 if dict(DEFAULTS, call="compare_strings").get(k2) != v})
                    (skipped if wrap == "unboxed" else cases).append(case)
    return commit, cases, skipped


def write_fixture(commit: str, cases: list, skipped: list, out: Path = FIXTURE) -> None:
    header = {"_header": {
        "source": SOURCE_REPO, "commit": commit, "license": "MIT (Copyright 2024 The HuggingFace Team)",
        "files": list(TEST_FILES), "cases": len(cases),
        "left_out": {"why": f"the prediction is a whole model response (over {MAX_WRAPPED_CHARS} characters) "
                            "with no \\boxed{}: ngrpo's boxed reward scores it 0 by its contract (SPEC 6), "
                            "whatever the parsing", "ids": [c["id"] for c in skipped]},
        "made_by": "benchmarks/reward_agreement.py --extract",
        "fields": "gold, pred, expected: the test case; call, match_types, precision, strict, "
                  "allow_set_relation_comp: how the test calls math-verify, given only where not "
                  f"{dict(DEFAULTS, call='compare_strings')}; response: what ngrpo's reward grades "
                  "(the pred itself when absent); wrap: how the pred became the response; the label "
                  "is the gold (see benchmarks/reward_agreement.py)",
    }}
    with open(out, "w", encoding="utf-8") as f:
        for rec in [header, *cases]:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def load_cases(path: Path = FIXTURE) -> tuple:
    """(header, cases) of the fixture, each case completed: the math-verify call's settings
    (DEFAULTS where the fixture leaves them out), label (= gold) and response (= pred if absent)."""
    lines = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    cases = []
    for rec in lines[1:]:
        case = {**DEFAULTS, "call": "compare_strings", **rec}
        case.setdefault("response", case["pred"])
        case["label"] = case["gold"]
        cases.append(case)
    return lines[0]["_header"], cases


# --------------------------------------------------------------------------------------------
# Grading
# --------------------------------------------------------------------------------------------
def direct_verdict(case: dict) -> int:
    """The test case's own math-verify call, in this process (math-verify's signal timeouts work
    here: this is the main thread)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    if case["call"] == "parse_default":
        return int(bool(verify(parse(case["gold"]), parse(case["pred"]))))
    targets = []
    for t in case["match_types"]:
        targets.append(LatexExtractionConfig(boxed_match_priority=0) if t == "latex" else ExprExtractionConfig())
    gold, pred = parse(case["gold"], targets), parse(case["pred"], targets)
    return int(bool(verify(gold, pred, float_rounding=case["precision"], strict=case["strict"],
                           allow_set_relation_comp=case["allow_set_relation_comp"])))


def ngrpo_verdicts(cases: list, quick: bool = True) -> list:
    """ngrpo's reward for each case (0/1): grade_many(response, label), extraction "boxed"."""
    from pipelines.datasets.grading import grade_many

    return [int(r.correct) for r in grade_many([c["response"] for c in cases], [c["label"] for c in cases],
                                               quick=quick)]


def agreement(cases: list) -> dict:
    """Counts of agreement (see the module doc) and the per-case verdicts."""
    import logging

    logging.disable(logging.CRITICAL)  # math-verify logs every string it cannot parse
    direct = [direct_verdict(c) for c in cases]
    ngrpo = ngrpo_verdicts(cases)
    expected = [c["expected"] for c in cases]
    where_direct_right = [k for k in range(len(cases)) if direct[k] == expected[k]]
    return {
        "n": len(cases),
        "direct_vs_expected": sum(d == e for d, e in zip(direct, expected)),
        "ngrpo_vs_expected": sum(g == e for g, e in zip(ngrpo, expected)),
        "ngrpo_vs_direct": sum(g == d for g, d in zip(ngrpo, direct)),
        "ngrpo_vs_expected_where_direct_right": sum(ngrpo[k] == expected[k] for k in where_direct_right),
        "n_direct_right": len(where_direct_right),
        "by_wrap": {w: (sum(ngrpo[k] == expected[k] for k in range(len(cases)) if cases[k]["wrap"] == w), n)
                    for w, n in sorted(Counter(c["wrap"] for c in cases).items())},
        "direct": direct, "ngrpo": ngrpo,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--extract", metavar="GIT_DIR", help="rebuild the fixture from a Math-Verify git dir")
    ap.add_argument("--fixture", default=str(FIXTURE))
    ap.add_argument("--show-disagreements", action="store_true")
    args = ap.parse_args(argv)
    if args.extract:
        commit, cases, skipped = extract_cases(args.extract)
        write_fixture(commit, cases, skipped, Path(args.fixture))
        print(f"wrote {len(cases)} cases from {SOURCE_REPO}@{commit} to {args.fixture} "
              f"({len(skipped)} unboxed whole responses left out)")
        return 0
    header, cases = load_cases(Path(args.fixture))
    res = agreement(cases)
    n = res["n"]
    print(f"cases: {n} from {header['source']}@{header['commit'][:12]} ({', '.join(header['files'])})")
    print(f"math-verify direct vs expected:          {res['direct_vs_expected']}/{n}")
    print(f"ngrpo reward vs expected:                {res['ngrpo_vs_expected']}/{n}"
          + (f"   (before the fix: {BEFORE['ngrpo_vs_expected']}/{n})" if BEFORE["ngrpo_vs_expected"] else ""))
    print(f"ngrpo reward vs math-verify direct:      {res['ngrpo_vs_direct']}/{n}"
          + (f"   (before the fix: {BEFORE['ngrpo_vs_direct']}/{n})" if BEFORE["ngrpo_vs_direct"] else ""))
    print(f"ngrpo vs expected where direct is right: {res['ngrpo_vs_expected_where_direct_right']}/"
          f"{res['n_direct_right']}")
    print("ngrpo vs expected by prediction wrap:    "
          + ", ".join(f"{w} {a}/{m}" for w, (a, m) in res["by_wrap"].items()))
    if args.show_disagreements:
        for c, d, g in zip(cases, res["direct"], res["ngrpo"]):
            if g != c["expected"]:
                print(f"  {c['id']}: expected {c['expected']} direct {d} ngrpo {g} [{c['wrap']}] "
                      f"label={c['label']!r} response={c['response']!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
