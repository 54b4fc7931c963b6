"""Grading (pipelines/datasets/grading.py) and the reward file: hand-written cases, MATH500 golds, OpenRLHF contract, fuzz."""
import asyncio
import importlib.util
import json
import random
import threading
import time
from pathlib import Path

import pytest
import torch

from pipelines.datasets import grading as R
from pipelines import reward
from pipelines.datasets.prompts import build_prompt

REWARD_FILE = Path(reward.__file__)

# (response, gold answer, expected verdict)
CASES = [
    # plain numbers
    (r"The answer is \boxed{7}.", "7", True),
    (r"\boxed{8}", "7", False),
    (r"\boxed{-3}", "-3", True),
    (r"\boxed{3}", "-3", False),
    (r"\boxed{007}", "7", True),
    (r"\boxed{1,000}", "1000", True),
    (r"\boxed{1000}", r"1,\!000", True),
    (r"\boxed{10{,}000}", "10000", True),
    (r"\boxed{3.0}", "3", True),
    (r"\boxed{3.5}", r"\frac{7}{2}", True),
    # fractions
    (r"\boxed{\frac{1}{2}}", "0.5", True),
    (r"\boxed{0.5}", r"\frac{1}{2}", True),
    (r"\boxed{\dfrac{1}{2}}", r"\frac{1}{2}", True),
    (r"\boxed{\tfrac{3}{4}}", r"\frac34", True),
    (r"\boxed{1/2}", r"\frac{1}{2}", True),
    (r"\boxed{\frac{2}{4}}", r"\frac{1}{2}", True),
    (r"\boxed{\frac{1}{3}}", "0.33", False),
    (r"\boxed{\frac{1}{3}}", r"\frac{1}{2}", False),
    # radicals, pi, expressions
    (r"\boxed{2\sqrt{2}}", r"\sqrt{8}", True),
    (r"\boxed{\sqrt{2}}", r"\sqrt{3}", False),
    (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt3}{2}", True),
    (r"\boxed{2\pi}", r"2 \pi", True),
    (r"\boxed{\pi}", "3.14", False),
    (r"\boxed{x^2+2x+1}", r"(x+1)^2", True),
    (r"\boxed{x^2+1}", r"(x+1)^2", False),
    (r"\boxed{a+c+b}", r"a + b + c", True),
    # \left( \right), tuples, intervals
    (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)", True),
    (r"\boxed{(3, \frac{\pi}{2})}", r"\left( 3, \frac{\pi}{2} \right)", True),
    (r"\boxed{(3, \pi)}", r"\left( 3, \frac{\pi}{2} \right)", False),
    (r"\boxed{(1, 2)}", "(1,2)", True),
    (r"\boxed{(2, 1)}", "(1,2)", False),
    (r"\boxed{[1, 2)}", "[1,2)", True),
    (r"\boxed{[1, 2]}", "[1,2)", False),
    (r"\boxed{(-\infty, 3]}", r"(-\infty,3]", True),
    (r"\boxed{(-\infty, 3)}", r"(-\infty,3]", False),
    (r"\boxed{(-\infty,-2)\cup(2,\infty)}", r"(-\infty, -2) \cup (2, \infty)", True),
    # sets
    (r"\boxed{\{1, 2, 3\}}", r"\{3, 2, 1\}", True),
    (r"\boxed{\{1, 2\}}", r"\{1, 2, 3\}", False),
    (r"\boxed{1, 2, 3}", r"3, 2, 1", True),
    # matrices / vectors
    (r"\boxed{\begin{pmatrix} 1 \\ 2 \end{pmatrix}}", r"\begin{pmatrix}1\\2\end{pmatrix}", True),
    (r"\boxed{\begin{pmatrix} 1 & 0 \\ 0 & 1 \end{pmatrix}}", r"\begin{pmatrix}1&0\\0&1\end{pmatrix}", True),
    (r"\boxed{\begin{pmatrix} 1 & 0 \\ 0 & 2 \end{pmatrix}}", r"\begin{pmatrix}1&0\\0&1\end{pmatrix}", False),
    (r"\boxed{\begin{pmatrix} 2 \\ 1 \end{pmatrix}}", r"\begin{pmatrix}1\\2\end{pmatrix}", False),
    # degrees, percentages, units, money
    (r"\boxed{90^\circ}", "90", True),
    (r"\boxed{90}", r"90^\circ", True),
    (r"\boxed{45^{\circ}}", "90", False),
    (r"\boxed{50\%}", "50", True),
    (r"\boxed{5 \text{ cm}}", "5", True),
    (r"\boxed{5\text{ meters}}", r"5 \text{ m}", True),
    (r"\boxed{6 \text{ cm}}", "5", False),
    (r"\boxed{\$18.90}", "18.90", True),
    (r"\boxed{18.9}", r"\$18.90", True),
    # text answers
    (r"\boxed{\text{(C)}}", r"\text{(C)}", True),
    (r"\boxed{C}", r"\text{(C)}", True),
    (r"\boxed{\text{(B)}}", r"\text{(C)}", False),
    (r"\boxed{\text{Evelyn}}", r"\text{Evelyn}", True),
    (r"\boxed{\text{Tuesday}}", r"\text{Evelyn}", False),
    (r"\boxed{\text{odd}}", r"\text{odd}", True),
    (r"\boxed{\text{even}}", r"\text{odd}", False),
    # equations
    (r"\boxed{x = 5}", "5", True),
    (r"\boxed{y = 2x + 3}", "y=2x+3", True),
    # no boxed answer / empty
    ("The answer is 7.", "7", False),
    ("", "7", False),
    (r"\boxed{}", "7", False),
    (r"So $x = 7$ and we are done.", "7", False),
    # several boxed answers: the last wins
    (r"First \boxed{3}, then correcting: \boxed{7}", "7", True),
    (r"First \boxed{7}, then correcting: \boxed{3}", "7", False),
    (r"\boxed{7} and also \fbox{8}", "8", True),
    (r"\fbox{7}", "7", True),
    # nested braces
    (r"\boxed{\frac{\sqrt{\frac{1}{2}}}{2}}", r"\frac{\sqrt{2}}{4}", True),
    (r"\boxed{{{7}}}", "7", True),
    (r"\boxed{\boxed{7}}", "7", True),
    (r"\boxed{2^{10}}", "1024", True),
    (r"\boxed{2^{10}}", "1023", False),
    # unbalanced / truncated
    (r"\boxed{7} and then \boxed{8", "7", True),
    (r"\boxed{7", "7", False),
    (r"\boxed 7", "7", True),
]


# the verdict must not depend on the cheap pre-checks: every case also goes through math-verify alone
@pytest.mark.parametrize("quick", [True, False], ids=["with-shortcuts", "math-verify-only"])
def test_hand_written_cases(quick):
    assert len(CASES) >= 60
    results = R.grade_many([c[0] for c in CASES], [c[1] for c in CASES], quick=quick)
    wrong = [(resp, gold, exp, res) for (resp, gold, exp), res in zip(CASES, results) if res.correct != exp]
    assert wrong == []
    assert not any(r.timed_out for r in results)


@pytest.mark.parametrize("text,expected", [
    (r"a \boxed{1} b \boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"\boxed{\{1,2\}}", r"\{1,2\}"),
    (r"\boxed{\boxed{3}}", "3"),
    (r"\boxed{ \boxed{4} }", "4"),
    (r"\boxed{\boxed{4} + 1}", r"\boxed{4} + 1"),
    (r"\boxed 5$ and more", "5"),
    (r"x \boxed{2} \boxed{", "2"),
    (r"\boxed{}", None),
    (r"\boxed{\boxed{}}", None),
    (r"\fbox{7}", "7"),
    (r"\boxedx{3}", None),
    (r"\boxed{a}{b}", "a"),
    (r"\boxed{\\{1}}", r"\\{1}"),
    (r"\boxed{\left( 3, \frac{\pi}{2} \right)}.", r"\left( 3, \frac{\pi}{2} \right)"),
    ("no answer here", None),
    ("", None),
])
def test_extract_boxed(text, expected):
    assert R.extract_boxed(text) == expected


@pytest.mark.parametrize("text,expected", [
    (r"\boxed{2},\boxed{3},\boxed{5},\boxed{7},\boxed{13}", "2, 3, 5, 7, 13"),
    (r"$$\boxed{2}, \boxed{3}, \boxed{5}, \boxed{7}, \boxed{13}$$", "2, 3, 5, 7, 13"),
    (r"$\boxed{1}\boxed{2}$", "1, 2"),
    (r"\(\boxed{1}\) and \(\boxed{-2}\).", "1, -2"),
    (r"$$\boxed{(2, 2)} \quad \text{and} \quad \boxed{(6, 2)}$$", "(2, 2), (6, 2)"),
    (r"$x = \boxed{3}$ or $x=\boxed{-3}$", "3, -3"),
    (r"\boxed{1} \boxed{1}", "1"),  # a part repeated is kept once
    (r"$= \boxed{17}.$$- OR -\n\nthe hypotenuse is $\boxed{17}$.", "17"),  # one box per method
    (r"$\log_24=\boxed{2}$, so $\log_2(4^2) = \boxed{4}$", "4"),  # words between: only the last
    (r"\boxed{1}. \boxed{2}", "2"),
    (r"\boxed{(3, 3)} \text{ for part (a) and } \boxed{(1, 1)}", "(1, 1)"),
    (r"$\boxed{(10, 0)}$ and $\boxed{(0,0)}.$ (Either point is an acceptable answer.)", "(0,0)"),
    (r"\boxed{\boxed{3}}", "3"),
    (r"\boxed{x} \boxed 5", "x, 5"),
    (r"\boxed{1}, \boxed{2", "1"),  # the unclosed box is ignored (the data check refuses such a label)
    (r"\boxed{}", None),
    ("no box", None),
])
def test_extract_boxed_answer(text, expected):
    assert R.extract_boxed_answer(text) == expected


def test_extract_boxed_answer_is_linear_on_adversarial_input():
    for text in ["\\boxed{1}" + " " * 500_000 + "x\\boxed{2}", ("\\boxed{1}" + " ," * 90) * 5000,
                 "\\boxed{1}" * 100_000, "\\boxed{" * 200_000]:
        start = time.process_time()
        R.extract_boxed_answer(text)
        assert time.process_time() - start < 5.0


@pytest.mark.parametrize("text,boxes_only,expected", [
    (r"\boxed{5", False, r"the \boxed{ at character 1 is never closed"),
    (r"$\boxed {5$", False, r"the \boxed { at character 2 is never closed"),
    (r"\frac{1}{2", False, "the { at character 9 is never closed"),
    (r"\frac{1}{2", True, None),
    (r"\{1, 2\}", False, None),  # set braces are not grouping braces
    (r"\boxed{5}", False, None),
    ("", False, None),
])
def test_unclosed_brace(text, boxes_only, expected):
    assert R.unclosed_brace(text, boxes_only=boxes_only) == expected


# (label, response, reward): a label of several boxes is all of them (issue 33 item 7)
LABEL_CASES = [
    (r"\boxed{2},\boxed{3},\boxed{5},\boxed{7},\boxed{13}", r"\boxed{2, 3, 5, 7, 13}", True),
    (r"\boxed{2},\boxed{3},\boxed{5},\boxed{7},\boxed{13}", r"\boxed{\{2, 3, 5, 7, 13\}}", True),
    (r"\boxed{2},\boxed{3},\boxed{5},\boxed{7},\boxed{13}", r"\boxed{13}", False),  # was True
    (r"$\boxed{(-2,18)}$ and $\boxed{(8,38)}$", r"\boxed{(-2,18), (8,38)}", True),
    (r"$\boxed{(-2,18)}$ and $\boxed{(8,38)}$", r"\boxed{(8,38)}", False),
    # alternative forms joined stay one answer: each of them still scores
    (r"$\boxed{-b+2}$, or $\boxed{2 - b}$", r"\boxed{2-b}", True),
    (r"$\boxed{15\frac{39}{40}},$ or $\boxed{\frac{639}{40}}$", r"\boxed{\frac{639}{40}}", True),
    # "1,22" is the list {1, 22} as math-verify reads it in LaTeX ($1,22$ or \boxed{1,22}); MATH
    # writes lists so ("17,44", "8,12"); math-verify reads 1.22 only from bare text with its expr
    # extraction, which a label never gets
    ("1,22", r"\boxed{1.22}", False),
    ("1,22", r"\boxed{1, 22}", True),
    ("1,22", r"\boxed{\{22, 1\}}", True),
    ("31,250", r"\boxed{31250}", True),  # a thousands separator stays one
]


@pytest.mark.parametrize("quick", [True, False], ids=["with-shortcuts", "math-verify-only"])
def test_labels_of_several_boxes_and_commas(quick):
    results = R.grade_many([c[1] for c in LABEL_CASES], [c[0] for c in LABEL_CASES], quick=quick)
    assert [r.correct for r in results] == [c[2] for c in LABEL_CASES]


def test_response_still_graded_by_its_last_box():
    """Only labels join their boxes; a response is graded by its last box (SPEC §6, the NGRPO
    authors' extract_answer_math)."""
    assert R.extract_answer(r"\boxed{1}, \boxed{2}") == "2"
    assert [r.correct for r in R.grade_many([r"\boxed{1}, \boxed{2}", r"\boxed{1, 2}"], ["1, 2", "1, 2"])] == [
        False, True]


def test_extract_boxed_is_linear_on_adversarial_input():
    for text in ["\\boxed{" * 200_000, "\\" * 1_000_000, "{" * 1_000_000 + "\\boxed{1}",
                 "\\boxed{" * 100_000 + "}" * 100_000]:
        start = time.process_time()
        R.extract_boxed(text)
        assert time.process_time() - start < 5.0


@pytest.fixture(scope="module")
def math500_answers(shared_data_dir):
    with open(shared_data_dir / "math500" / "test.jsonl") as f:
        answers = [json.loads(line)["answer"] for line in f]
    assert len(answers) == 500
    return answers


@pytest.mark.slow
def test_math500_gold_answers_grade_themselves_correct(math500_answers):
    responses = [f"Therefore the final answer is $\\boxed{{{a}}}$." for a in math500_answers]
    for quick in (True, False):
        results = R.grade_many(responses, math500_answers, quick=quick)
        failures = [(a, r) for a, r in zip(math500_answers, results) if not r.correct]
        assert failures == [] and sum(r.correct for r in results) == 500


@pytest.mark.slow
def test_math500_gold_answers_do_not_match_other_problems(math500_answers):
    shifted = math500_answers[1:] + math500_answers[:1]
    pairs = [(g, s) for g, s in zip(math500_answers, shifted) if R._normalise(g) != R._normalise(s)]
    results = R.grade_many([f"\\boxed{{{s}}}" for g, s in pairs], [g for g, s in pairs])
    matched = [p for p, r in zip(pairs, results) if r.correct]
    print(f"\n{len(matched)} of {len(pairs)} shifted MATH500 pairs graded equivalent: {matched}")
    assert len(pairs) == 498
    assert len(matched) <= 5
    # the one known match: gold "5" and the next problem's "x=5" (math-verify accepts x=5 for 5)
    assert ("5", "x=5") in matched


def test_split_response_strips_the_prompt():
    prompt = build_prompt("What is 3 + 4?")
    resp = "3 + 4 = 7, so \\boxed{7}.<|im_end|>"
    assert R.split_response(prompt + resp, prompt) == resp
    # special tokens stripped by the decoder
    stripped = (prompt + resp).replace("<|im_start|>", "").replace("<|im_end|>", "")
    assert R.split_response(stripped, prompt) == "3 + 4 = 7, so \\boxed{7}."
    # the prompt's own "\boxed{}" never counts as an answer
    assert R.extract_boxed(R.split_response(prompt + "no answer", prompt)) is None
    assert R.extract_boxed(prompt + "no answer") is None


def test_reward_func_contract():
    prompt = build_prompt("What is 3 + 4?")
    queries = [prompt + r"so \boxed{7}<|im_end|>", prompt + r"\boxed{8}<|im_end|>", prompt + "seven<|im_end|>",
               prompt + r"\boxed{\frac{14}{2}}<|endoftext|>"]
    out = reward.reward_func(queries, [prompt] * 4, ["7"] * 4)
    assert set(out) == {"rewards", "scores", "extra_logs"}
    assert out["rewards"].dtype == torch.float32 and out["scores"].dtype == torch.float32
    assert out["rewards"].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert out["scores"].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert out["extra_logs"]["no_boxed_frac"].tolist() == [0.0, 0.0, 1.0, 0.0]
    assert out["extra_logs"]["grader_timeouts"].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert all(v.dtype == torch.float32 for v in out["extra_logs"].values())


def _load_like_openrlhf():
    spec = importlib.util.spec_from_file_location("reward_func", str(REWARD_FILE))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reward_file_loaded_standalone_from_a_thread():
    """As OpenRLHF does: imported from its path as module `reward_func`, called in a worker thread."""
    module = _load_like_openrlhf()
    prompt = build_prompt("Simplify 2/4.")
    result = {}

    def call():
        result["out"] = module.reward_func([prompt + r"\boxed{0.5}", prompt + r"\boxed{\frac{1}{3}}"],
                                           [prompt, prompt], [r"\frac{1}{2}", r"\frac{1}{2}"])

    t = threading.Thread(target=call)
    t.start()
    t.join(120)
    assert not t.is_alive()
    assert result["out"]["rewards"].tolist() == [1.0, 0.0]
    R.shutdown()


@pytest.mark.slow
def test_reward_through_openrlhf_executor():
    """OpenRLHF 0.11.2's own loader and call path (asyncio.to_thread, one query per call)."""
    from openrlhf.utils.agent import SingleTurnAgentExecutor

    executor = SingleTurnAgentExecutor(str(REWARD_FILE))
    prompt = build_prompt("What is 3 + 4?")
    queries = [prompt + r"\boxed{7}<|im_end|>", prompt + "I do not know<|im_end|>"]
    infos = asyncio.run(executor._fetch_rewards_via_func(queries, [prompt] * 2, ["7", "7"]))
    assert len(infos) == 2
    # what samples_generator._process_response_into_experience does with the values
    rewards = [torch.tensor([info["rewards"]]) for info in infos]
    assert [r.shape for r in rewards] == [torch.Size([1]), torch.Size([1])]
    assert [r.item() for r in rewards] == [1.0, 0.0]
    logs = [{k: v.flatten()[0].item() for k, v in info["extra_logs"].items()} for info in infos]
    assert logs == [{"no_boxed_frac": 0.0, "grader_timeouts": 0.0}, {"no_boxed_frac": 1.0, "grader_timeouts": 0.0}]


def test_hanging_input_times_out_and_pool_recovers():
    R.configure(timeout=2.0)
    try:
        start = time.monotonic()
        res = R.grade_many([r"\boxed{9^{9^{9^{9}}}}", r"\boxed{\frac{1}{2}}"], ["1", "0.5"])
        elapsed = time.monotonic() - start
        assert res[0] == R.GradeResult(False, "9^{9^{9^{9}}}", True)
        assert res[1] == R.GradeResult(True, r"\frac{1}{2}", False)
        assert elapsed < 60
        # the killed worker was replaced: grading still works
        assert R.grade(r"\boxed{\sqrt{4}}", "2") == R.GradeResult(True, r"\sqrt{4}", False)
        assert R.pool_stats()["timeouts"] >= 1
    finally:
        R.configure(timeout=R.DEFAULT_TIMEOUT)


def _cmdline(process) -> str:
    """A child's command line; '' for one that is gone or a zombie (another test's in-process Ray
    leaves exited children of this process until they are reaped)."""
    import psutil

    try:
        return " ".join(process.cmdline())
    except (psutil.ZombieProcess, psutil.NoSuchProcess, psutil.AccessDenied):
        return ""


def test_killed_worker_counts_as_failure_without_waiting_for_the_timeout():
    import psutil

    R.configure(timeout=60.0, workers=1)
    try:
        R.grade_many([r"\boxed{\frac{1}{2}}"], ["0.5"], quick=False)  # start the worker (quick=False: not from the cache)
        out = {}
        t = threading.Thread(target=lambda: out.setdefault("r", R.grade(r"\boxed{10^{10^{10}}}", "2", timeout=60)))
        t.start()
        time.sleep(1.0)
        workers = [p for p in psutil.Process().children() if "spawn_main" in _cmdline(p)]
        assert len(workers) == 1
        start = time.monotonic()
        workers[0].kill()
        t.join(30)
        assert not t.is_alive() and time.monotonic() - start < 30
        assert out["r"] == R.GradeResult(False, "10^{10^{10}}", True)
        assert R.grade("\\boxed{3}", "\\frac{6}{2}").correct
    finally:
        R.configure(timeout=R.DEFAULT_TIMEOUT, workers=R.DEFAULT_WORKERS)


def _fuzz_corpus(n, seed=0):
    rng = random.Random(seed)
    alphabet = "0123456789+-*/^_{}()[]\\,.=<> abcxyzπ√∞≤≥é中文😀\n\t$"
    atoms = [r"\frac{", r"\sqrt{", r"\left(", r"\right)", "}", "{", "^", r"\boxed{", r"\fbox{", r"\text{", r"\pi",
             r"\infty", r"\cup", r"\begin{pmatrix}", r"\end{pmatrix}", "\\\\", "&", r"\dfrac", "%", r"^\circ"]
    hang = r"\boxed{9^{9^{9^{9}}}}"
    items = []
    for i in range(n):
        kind = i % 10
        if kind in (0, 1, 2):  # random characters, mostly no box
            s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 200)))
        elif kind in (3, 4):  # LaTeX soup inside a box (unbalanced braces welcome)
            s = r"\boxed{" + "".join(rng.choice(atoms + list("0123456789xy")) for _ in range(rng.randint(1, 12))) + "}"
        elif kind == 5:  # numbers
            s = rf"\boxed{{{rng.randint(-10**6, 10**6)}}}"
        elif kind == 6:  # several boxes, nesting
            depth = rng.randint(1, 60)
            s = "x " + r"\boxed{" * depth + str(rng.randint(0, 9)) + "}" * rng.randint(0, depth + 2)
        elif kind == 7:  # huge numbers / exponent towers, small enough to usually finish
            s = rf"\boxed{{{rng.randint(2, 9)}^{{{rng.randint(10, 5000)}}}}}"
        elif kind == 8:  # unicode / control characters
            s = r"\boxed{" + "".join(chr(rng.randint(1, 0x2FFFF)) for _ in range(rng.randint(1, 30))) + "}"
        else:
            s = rf"\boxed{{\frac{{{rng.randint(1, 99)}}}{{{rng.randint(1, 99)}}}}}"
        items.append(s)
    # adversarial extremes
    items[7] = hang
    items[1007] = hang
    items[17] = "a" * 1_000_000 + r"\boxed{1}"
    items[27] = r"\boxed{" + "(" * 400 + "1" + ")" * 400 + "}"
    items[37] = r"\boxed{" * 100_000
    items[47] = r"\boxed{" + "9" * 600_000 + "}"
    items[57] = "}" * 500_000 + r"\boxed{2}"
    return items


@pytest.mark.slow
def test_fuzz_reward_func_from_threads():
    n = 10_000
    items = _fuzz_corpus(n)
    labels = [random.Random(i).choice(["1", "2", r"\frac{1}{2}", "x", r"\text{(A)}"]) for i in range(n)]
    labels[17] = "1"
    prompt = build_prompt("Fuzz?")
    R.configure(timeout=2.0)
    rewards = [None] * n
    timeouts = [None] * n
    per_item = []
    errors = []
    lock = threading.Lock()

    def worker(tid, n_threads=6):
        idx = list(range(tid, n, n_threads))
        k = 0
        while k < len(idx):
            size = 1 if (k // 7) % 2 == 0 else 64  # OpenRLHF sends 1 query per call; also try batches
            batch = idx[k:k + size]
            k += size
            start = time.monotonic()
            try:
                out = reward.reward_func([prompt + items[i] for i in batch], [prompt] * len(batch), [labels[i] for i in batch])
            except Exception as err:  # noqa: BLE001 - the test records any exception as a failure
                with lock:
                    errors.append(repr(err))
                continue
            dt = (time.monotonic() - start) / len(batch)
            with lock:
                per_item.append(dt)
                for j, i in enumerate(batch):
                    rewards[i] = out["rewards"][j].item()
                    timeouts[i] = out["extra_logs"]["grader_timeouts"][j].item()

    start = time.monotonic()
    try:
        threads = [threading.Thread(target=worker, args=(t,)) for t in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(1800)
        assert not any(t.is_alive() for t in threads)
    finally:
        R.configure(timeout=R.DEFAULT_TIMEOUT)
    total = time.monotonic() - start
    print(f"\nfuzz: {n} items in {total:.1f} s, worst {max(per_item):.2f} s per item (batch-averaged), "
          f"{sum(timeouts)} timeouts, {sum(rewards)} rewarded")
    assert errors == []
    assert all(r in (0.0, 1.0) for r in rewards)
    assert all(t in (0.0, 1.0) for t in timeouts)
    # the two exponent towers cannot finish: each is a counted timeout scoring 0
    assert rewards[7] == rewards[1007] == 0.0
    assert timeouts[7] == timeouts[1007] == 1.0
    assert sum(timeouts) >= 2
    # a megabyte of text before a correct box is still graded
    assert rewards[17] == 1.0
