"""SGPO (issue 32; docs/ALGORITHM.md §10): graded rewards for all-wrong groups from a step judge.

Hand-worked: RTS in characters and in steps, the reward min(0.999 R_max, R_max sigmoid(beta (RTS -
gamma))), and GRPO's advantages on a graded group of 8. Real HTTP: a deterministic judge on
127.0.0.1 (tests/judge_server.py) for exact rewards, timeouts, a dead judge and garbage answers.
A 2-step CPU run against it (pipeline) shows the judge's calls and the graded rewards in metrics.jsonl.
"""
import json
import math
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from judge_server import JudgeServer, verdict_by_rule
from openrlhf_patch import algorithms, judge, sampling
from openrlhf_patch.config import PatchConfig
from openrlhf_patch.reward_checks import RewardError

REPO = Path(__file__).resolve().parents[1]
PROMPT = judge.load_prompt(None)
STEPS = ["x = 2 + 3", "so x = 5.", "<<ERR>> x*2 =12", "answer 12"]  # 9, 9, 15, 9 characters


def sigmoid(z):
    return 1 / (1 + math.exp(-z))


def settings(url, **kw):
    return judge.JudgeSettings(**{"url": url, "model": "toy", "prompt": PROMPT, "timeout": 5.0, **kw})


def response(first_wrong, n_steps=4, variant=0):
    """A response of N_STEPS paragraphs, the marker in step FIRST_WRONG (None: no step)."""
    return "\n\n".join(f"{'<<ERR>> ' if k == first_wrong else ''}step {k} of variant {variant}"
                       for k in range(1, n_steps + 1))


# ------------------------------------------------------------------ hand-worked


def test_steps_are_blank_line_paragraphs():
    assert judge.split_steps("a\nb\n\n  \n c \r\n\r\nd\n\n") == ["a\nb", "c", "d"]
    assert judge.number_steps(["a", "b"]) == "Step 1: a\n\nStep 2: b"


def test_rts_by_characters_and_by_steps():
    # first wrong step 3: 9 + 9 characters of 42 before it; 2 steps of 4
    assert judge.rts(STEPS, 3, "chars") == 18 / 42 == 0.42857142857142855
    assert judge.rts(STEPS, 3, "steps") == 0.5
    assert judge.rts(STEPS, 1, "chars") == 0.0 and judge.rts(STEPS, 5, "chars") == 1.0  # 5: none wrong


def test_graded_reward_rises_with_rts_and_stays_below_r_max():
    assert judge.graded_reward(18 / 42, 5.0, 0.5) == 0.41165137518528216 == pytest.approx(sigmoid(-5 / 14), abs=1e-15)
    assert judge.graded_reward(0.5, 5.0, 0.5) == 0.5
    assert judge.graded_reward(0.0, 5.0, 0.5) == 0.07585818002124356  # sigmoid(-2.5)
    assert judge.graded_reward(1.0, 5.0, 0.5) == 0.9241418199787566   # sigmoid(2.5)
    assert judge.graded_reward(1.0, 100.0, 0.0) == 0.999               # the cap binds
    assert judge.graded_reward(1.0, 100.0, 0.0, max_reward=2.0) == 1.998
    assert judge.graded_reward(0.5, 5.0, 0.5, max_reward=2.0) == 1.0


def test_verdicts_are_parsed_or_refused():
    assert judge.parse_verdict("blah\nFIRST_WRONG_STEP: 3", 4) == 3
    assert judge.parse_verdict("FIRST_WRONG_STEP: 1 ... FIRST_WRONG_STEP: **2**", 4) == 2  # the last one
    assert judge.parse_verdict("first wrong step = none", 4) == 5
    assert judge.parse_verdict("FIRST_WRONG_STEP: 5", 4) is None  # no such step
    assert judge.parse_verdict("FIRST_WRONG_STEP: 0", 4) is None
    assert judge.parse_verdict("step 2 looks off", 4) is None


def test_the_prompt_template_is_filled_without_format_braces():
    messages = judge.build_messages(PROMPT, r"Find $\frac{1}{2}$", r"\boxed{1}", ["a", "b"])
    text = messages[0]["content"]
    assert r"Find $\frac{1}{2}$" in text and r"\boxed{1}" in text and "Step 1: a\n\nStep 2: b" in text
    assert "cut into 2 numbered steps" in text and "{" + "steps}" not in text


# ------------------------------------------------------------------ real HTTP


def test_a_graded_group_of_8_gets_exact_rewards_and_grpo_advantages():
    """RTS in steps of 4: first wrong step 1, 2, 3 (x4), 4, none -> 0, .25, .5 (x4), .75, 1; with
    beta 5, gamma .5 the rewards are symmetric about 1/2: a = sigmoid(2.5) - 1/2, b = sigmoid(1.25) -
    1/2, mean 1/2, std (Bessel) sqrt((2a^2 + 2b^2) / 7), advantages +-a/std, +-b/std, 0."""
    group = [response(1), response(2), *[response(3, variant=v) for v in range(4)], response(4), response(None)]
    with JudgeServer() as server:
        j = judge.StepJudge(settings(server.url, unit="steps"))
        rewards = j.grade("What is 5 * 2?", r"$5 \cdot 2 = \boxed{10}$", group)
    a, b = sigmoid(2.5) - 0.5, sigmoid(1.25) - 0.5
    assert rewards == [0.07585818002124356, 0.22270013882530884, 0.5, 0.5, 0.5, 0.5, 0.7772998611746911,
                       0.9241418199787566]
    assert j.stats.calls == 8 and j.stats.judged == 8 and j.stats.failures == 0
    request = server.requests[0]
    assert request["path"] == "/v1/chat/completions" and request["body"]["model"] == "toy"
    assert r"$5 \cdot 2 = \boxed{10}$" in request["body"]["messages"][0]["content"]
    adv = algorithms.group_advantages(torch.tensor(rewards, dtype=torch.float64), 8, "grpo")
    std = math.sqrt((2 * a * a + 2 * b * b) / 7)
    assert std == pytest.approx(0.27086712423115444, abs=1e-15)
    expected = [-a / (std + 1e-6), -b / (std + 1e-6), 0, 0, 0, 0, b / (std + 1e-6), a / (std + 1e-6)]
    assert adv.tolist() == pytest.approx(expected, abs=1e-12)
    assert adv.tolist() == pytest.approx([-1.5658609560747019, -1.0237449015523432, 0, 0, 0, 0,
                                          1.0237449015523432, 1.5658609560747019], abs=1e-12)


def test_characters_rts_through_the_server_and_the_cache():
    text = "\n\n".join(STEPS)
    with JudgeServer() as server:
        j = judge.StepJudge(settings(server.url))
        assert j.grade("p", "s", [text]) == [0.41165137518528216]
        assert j.grade("p", "s", [text]) == [0.41165137518528216]  # cached by (problem, response)
        assert len(server.requests) == 1 and j.stats.cached == 1 and j.stats.judged == 2
        assert j.grade("another problem", "s", [text]) == [0.41165137518528216]
        assert len(server.requests) == 2


def test_a_judge_timeout_is_retried_once_then_counted():
    with JudgeServer(mode="slow", delay=3.0) as server:
        j = judge.StepJudge(settings(server.url, timeout=0.3))
        start = time.monotonic()
        assert j.grade("p", "s", [response(2)]) == [None]
        took = time.monotonic() - start
    assert j.stats.calls == 2 and j.stats.failures == 1 and len(server.requests) == 2
    assert 0.6 <= took < 2.0 and "timed out" in j.stats.last_error


def _dead_url():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now: connection refused
    return f"http://127.0.0.1:{port}/v1"


def test_a_dead_judge_fails_each_response_and_stops_the_step():
    url = _dead_url()
    j = judge.StepJudge(settings(url, max_fail_share=0.5))
    assert j.grade("p", "s", [response(1), response(2)]) == [None, None]
    stats = j.new_step()
    assert stats.calls == 4 and stats.failures == 2 and "Connection refused" in stats.last_error
    with pytest.raises(judge.JudgeError, match=r"failed on 2 of 2 responses this step, more than "
                                               r"--judge-max-fail-share 0.5; last error: .*Connection refused"):
        j.check_step(stats)


@pytest.mark.parametrize("mode", ["garbage", "not_json"])
def test_garbage_answers_keep_reward_0_and_are_counted(mode):
    with JudgeServer(mode=mode) as server:
        j = judge.StepJudge(settings(server.url))
        assert j.grade("p", "s", [response(1)]) == [None]
    assert j.stats.calls == 2 and j.stats.failures == 1
    assert ("unparsable judgement" if mode == "garbage" else "not an OpenAI chat completion") in j.stats.last_error


def test_the_fail_share_is_a_limit_not_a_trigger():
    j = judge.StepJudge(settings("http://127.0.0.1:1/v1", max_fail_share=0.5))
    j.check_step(judge.JudgeStats(judged=4, failures=2))  # 0.5 is allowed
    with pytest.raises(judge.JudgeError):
        j.check_step(judge.JudgeStats(judged=4, failures=3))


# ------------------------------------------------------------------ the refill loop's hook


class _Tokenizer:
    def __init__(self, texts):
        self.texts = texts

    def decode(self, ids, skip_special_tokens=True):
        return self.texts[ids[0]]


def _group(prompt, rewards):
    return [SimpleNamespace(sequences=torch.tensor([[0, i]]), action_mask=torch.tensor([[1]]), prompts=[prompt],
                            rewards=torch.tensor([r]), info={"reward": torch.tensor([r])})
            for i, r in enumerate(rewards)]


def _generator(texts, cfg):
    gen = SimpleNamespace(tokenizer=_Tokenizer(texts))
    gen._ngrpo_judge = judge.StepJudge(judge.JudgeSettings.from_dict(cfg.sgpo))
    gen._ngrpo_references = {"the prompt": ("What is 5 * 2?", r"\boxed{10}")}
    return gen


def test_only_all_wrong_groups_are_graded_and_the_step_logs_the_cost():
    texts = [response(1), response(2), response(3), response(None)]
    with JudgeServer() as server:
        cfg = PatchConfig(sgpo={"url": server.url, "model": "toy", "prompt": PROMPT, "unit": "steps"})
        gen = _generator(texts, cfg)
        mixed = _group("the prompt", [1.0, 0.0, 0.0, 0.0])
        out = sampling._sgpo_grade(gen, mixed, torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64), cfg)
        assert out.tolist() == [1.0, 0.0, 0.0, 0.0] and not server.requests  # mixed: 0/1 kept
        wrong = _group("the prompt", [0.0] * 4)
        out = sampling._sgpo_grade(gen, wrong, torch.zeros(4, dtype=torch.float64), cfg)
    expected = [sigmoid(-2.5), sigmoid(-1.25), 0.5, sigmoid(2.5)]
    assert out.tolist() == pytest.approx(expected, abs=1e-15)
    assert [float(e.rewards[0]) for e in wrong] == pytest.approx(expected, abs=1e-7)  # float32 on the sample
    assert [float(e.info["reward"][0]) for e in wrong] == pytest.approx(expected, abs=1e-7)
    sampling._sgpo_close_step(gen, wrong + mixed, rollout_seconds=10.0)
    info = wrong[0].info
    assert (float(info["ngrpo/judge_calls"][0]), float(info["ngrpo/judge_responses"][0]),
            float(info["ngrpo/judge_failures"][0])) == (4.0, 4.0, 0.0)
    assert 0 < float(info["ngrpo/judge_seconds"][0]) == pytest.approx(10 * float(info["ngrpo/judge_share"][0]))
    assert float(mixed[0].info["ngrpo/judge_calls"][0]) == 4.0  # every sample carries the step's numbers


def test_a_dead_judge_stops_the_run_with_its_error():
    cfg = PatchConfig(sgpo={"url": _dead_url(), "model": "toy", "prompt": PROMPT, "max_fail_share": 0.5})
    gen = _generator([response(1), response(2)], cfg)
    group = _group("the prompt", [0.0, 0.0])
    out = sampling._sgpo_grade(gen, group, torch.zeros(2, dtype=torch.float64), cfg)
    assert out.tolist() == [0.0, 0.0]  # failed judgements keep 0
    with pytest.raises(RewardError, match="failed on 2 of 2 responses.*Connection refused"):
        sampling._sgpo_close_step(gen, group, rollout_seconds=1.0)


def test_the_server_rule():
    assert verdict_by_rule("Step 1: a\n\nStep 2: <<ERR>> b\n\nStep 3: <<ERR>>") == "Step 2 is wrong.\nFIRST_WRONG_STEP: 2"
    assert verdict_by_rule("Step 1: a").endswith("FIRST_WRONG_STEP: none")


# ------------------------------------------------------------------ recipe, data, CLI


def test_the_sgpo_recipe_needs_its_judge():
    from pipelines.launch.recipes import RecipeError, build_recipe

    import click

    from ngrpo_cli.train_cmd import _check_sgpo

    problems = [{"id": "a", "problem": "p", "answer": "1", "solution": "s"}]
    with pytest.raises(click.UsageError, match="--algo sgpo needs its step judge: give --judge-model"):
        _check_sgpo(build_recipe("sgpo", "cpu-tiny"), problems, "d.jsonl")
    with pytest.raises(click.UsageError, match="give --judge-model"):
        _check_sgpo(build_recipe("sgpo", "cpu-tiny", {"judge_url": "http://127.0.0.1:9/v1"}), problems, "d.jsonl")
    with pytest.raises(click.UsageError, match=r"--judge-model /nowhere/judge: .*without --judge-url ngrpo serves"):
        _check_sgpo(build_recipe("sgpo", "cpu-tiny", {"judge_model": "/nowhere/judge"}), problems, "d.jsonl")
    with pytest.raises(RecipeError, match="--judge-url 'ftp://x': must be an http"):
        build_recipe("sgpo", "cpu-tiny", {"judge_url": "ftp://x"})
    with pytest.raises(click.UsageError, match=r"--judge-prompt .*nowhere.txt: cannot read it"):
        _check_sgpo(build_recipe("sgpo", "cpu-tiny", {"judge_url": "http://x/v1", "judge_model": "m",
                                                      "judge_prompt": "/nowhere.txt"}), problems, "d.jsonl")
    r = build_recipe("sgpo", "cpu-tiny", {"judge_url": "http://127.0.0.1:9/v1", "judge_model": "m"})
    assert (r.estimator, r.graded_negatives, r.kl_mode, r.sgpo_beta, r.sgpo_gamma, r.rts_unit) == (
        "grpo", True, "loss", 5.0, 0.5, "chars")
    with pytest.raises(RecipeError, match="--group-filter 'drop_all_wrong': drops the all-wrong groups"):
        build_recipe("sgpo", "cpu-tiny", {"judge_url": "http://x/v1", "judge_model": "m",
                                          "group_filter": "drop_all_wrong"})
    from pipelines.launch import training

    cfg = training.build_patch_config(r, device="cpu", max_steps=1, reward_file="r.py")
    assert cfg.sgpo["url"] == "http://127.0.0.1:9/v1" and cfg.sgpo["prompt"] == PROMPT and cfg.estimator == "grpo"
    off = training.build_patch_config(build_recipe("grpo", "cpu-tiny"), device="cpu", max_steps=1, reward_file="r.py")
    assert off.sgpo == {}


def test_a_resume_reads_the_runs_copy_of_the_judge_prompt_not_the_users_file(tmp_path):
    """The prompt the run started with is kept in RUN_DIR/data; a resume uses that copy even when
    the user's --judge-prompt file changed or is gone, and is refused when the copy is missing."""
    import dataclasses

    from ngrpo_cli.train_cmd import _write_sgpo_references
    from pipelines.launch import resume
    from pipelines.launch.recipes import build_recipe

    users = tmp_path / "prompt.txt"
    users.write_text("Problem: {problem}\nSteps:\n{steps}\nFirst wrong step?")
    recipe = build_recipe("sgpo", "cpu-tiny", {"judge_url": "http://127.0.0.1:9/v1", "judge_model": "m",
                                               "judge_prompt": str(users)})
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    manifest = {"recipe": dataclasses.asdict(recipe), "device": "cpu"}
    with pytest.raises(resume.ResumeRefused, match=r"copy of its judge prompt \(data/sgpo_judge_prompt.txt\) is missing"):
        resume.rebuild_patch_config(run, manifest, False)
    _write_sgpo_references([{"problem": "p", "solution": "s"}], run, recipe)
    assert (run / judge.PROMPT_COPY).read_text() == users.read_text()
    started_with = users.read_text()
    users.unlink()
    assert resume.rebuild_patch_config(run, manifest, False).sgpo["prompt"] == started_with


def test_math_solutions_are_kept_through_prepare_data(tmp_path):
    from pipelines.datasets.data import load_problems, normalise_row

    record, _, why = normalise_row({"problem": "1+1?", "solution": r"It is $\boxed{2}$.", "unique_id": "a"}, "math")
    assert why is None and record["answer"] == "2" and record["solution"] == r"It is $\boxed{2}$."
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"id": "a", "problem": "1+1?", "answer": "2", "solution": "s"}) + "\n"
                    + json.dumps({"id": "b", "problem": "2+2?", "answer": "4"}) + "\n")
    problems = load_problems(path)
    assert problems[0]["solution"] == "s" and "solution" not in problems[1]
    assert judge.first_without_solution(problems) == (2, "b")


def test_a_run_without_solutions_is_refused_before_anything_starts(tmp_path, tiny_model_dir):
    from test_faults import ngrpo, write_problems

    data = write_problems(tmp_path / "d.jsonl", 8)
    proc = ngrpo("train", "--model", tiny_model_dir, "--data", data, "--output", tmp_path / "run", "--device", "cpu",
                 "--algo", "sgpo", "--judge-url", "http://127.0.0.1:9/v1", "--judge-model", "m", timeout=300)
    assert proc.returncode != 0
    assert f"{data}: row 1 (id '0') has no 'solution': --algo sgpo's judge compares" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_a_multi_node_run_is_refused_a_judge_on_this_nodes_loopback(tmp_path, tiny_model_dir):
    """The judge ngrpo serves listens on 127.0.0.1 only: on several nodes the trainer may not reach
    it, so the run is refused before anything starts (a --judge-url the user serves is fine)."""
    from click.testing import CliRunner

    from ngrpo_cli.main import cli

    data, _ = _all_wrong_inputs(tmp_path)
    base = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--device", "cuda", "--algo", "sgpo",
            "--nodes", "2", "--gpus-per-node", "1", "--preset", "cpu-tiny", "--eval-every", "0", "--dry-run"]
    refused = CliRunner().invoke(cli, base + ["--judge-model", str(tiny_model_dir)])
    assert refused.exit_code == 2 and "--algo sgpo on 2 nodes: the judge ngrpo serves itself listens on this " \
        "node's 127.0.0.1" in refused.output, refused.output
    served = CliRunner().invoke(cli, base + ["--judge-model", "j", "--judge-url", "http://judge.cluster:8000/v1"])
    assert served.exit_code == 0 and "OpenRLHF's parser accepted the command line" in served.output, served.output


# ------------------------------------------------------------------ a real run


REWARD_ALL_WRONG = "import torch\ndef reward_func(queries, prompts, labels, **kw):\n" \
                   "    r = torch.zeros(len(queries))\n    return {'rewards': r, 'scores': r, 'extra_logs': {}}\n"


def _all_wrong_inputs(tmp_path):
    """16 problems with a reference solution each, and a reward file that scores every response 0."""
    from test_faults import write_problems

    rows = [json.loads(line) for line in write_problems(tmp_path / "p.jsonl", 16).read_text().splitlines()]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({**r, "solution": f"so it is $\\boxed{{{r['answer']}}}$"}) + "\n" for r in rows))
    reward = tmp_path / "wrong.py"
    reward.write_text(REWARD_ALL_WRONG)
    return data, reward


@pytest.mark.pipeline
def test_a_cpu_run_grades_all_wrong_groups_through_the_judge(tmp_path, tiny_model_dir):
    """Every group all-wrong (scripted reward); the judge finds no wrong step in any response (no
    marker), so every response has RTS 1 and reward sigmoid(5 * 0.5) = 0.9241418199787566."""
    from test_faults import ngrpo

    data, reward = _all_wrong_inputs(tmp_path)
    portfile = tmp_path / "url"
    server = subprocess.Popen([sys.executable, str(REPO / "tests" / "judge_server.py"), str(portfile)],
                              cwd=REPO, env={"PYTHONPATH": str(REPO / "tests")})
    try:
        for _ in range(100):
            if portfile.exists() and portfile.read_text():
                break
            time.sleep(0.1)
        run = tmp_path / "run"
        prompt = tmp_path / "judge_prompt.txt"
        prompt.write_text((REPO / "openrlhf_patch" / "sgpo_judge_prompt.txt").read_text())
        proc = ngrpo("train", "--model", tiny_model_dir, "--data", data, "--output", run, "--device", "cpu",
                     "--preset", "cpu-tiny", "--algo", "sgpo", "--judge-url", portfile.read_text(),
                     "--judge-model", "toy", "--judge-max-fail-share", "0", "--reward-file", reward,
                     "--judge-prompt", prompt, "--max-steps", "2")
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 2
    for step in steps:
        # 4 prompts x 4 responses a step, each judged once (distinct responses) or from the cache
        assert step["ngrpo/judge_responses"] == 16.0
        assert step["ngrpo/judge_calls"] + step["ngrpo/judge_cached"] == 16.0
        assert step["ngrpo/judge_failures"] == 0.0 and step["ngrpo/judge_seconds"] > 0
        assert 0 < step["ngrpo/judge_share"] < 1
        # the graded rewards reach the step's metrics: sigmoid(2.5) for every non-empty response
        # (an empty one keeps 0 without a call); the scripted reward alone would give 0
        non_empty = step["ngrpo/judge_calls"] + step["ngrpo/judge_cached"]
        assert step["rollout/reward_mean"] == pytest.approx(0.9241418199787566 * non_empty / 16, abs=1e-6)
    assert steps[0]["ngrpo/judge_calls"] >= 1 and steps[0]["rollout/reward_mean"] > 0.5
    refs = [json.loads(line) for line in (run / "data" / "sgpo_references.jsonl").read_text().splitlines()]
    assert len(refs) == 16 and refs[0]["solution"].startswith("so it is")
    # a resume reads the run's copy of the judge prompt, not the user's file: the copy gone, it is
    # refused in one line before anything starts
    from openrlhf_patch import judge

    assert (run / judge.PROMPT_COPY).read_text() == prompt.read_text()
    (run / judge.PROMPT_COPY).unlink()
    again = ngrpo("train", "--resume", run, "--max-steps", "3")
    assert again.returncode == 1 and "Traceback" not in again.stderr, again.stderr[-2000:]
    assert again.stderr.strip().splitlines()[-1] == (f"Error: cannot resume {run}: the run's copy of its judge "
                                                     f"prompt ({judge.PROMPT_COPY}) is missing"), again.stderr[-2000:]


# ------------------------------------------------------------------ a real (toy) judge


@pytest.mark.real_model
@pytest.mark.slow
def test_smollm2_served_by_ngrpo_answers_as_a_judge(tmp_path):
    """`--judge-model` without `--judge-url`: ngrpo serves SmolLM2-135M-Instruct with vLLM's own OpenAI
    server on CPU (pipelines/launch/judge_server.py), on 127.0.0.1 only, and stops it after the block.
    Its judgements are poor (a 135M model cannot check maths): only their form is asserted, and an
    unparsable answer is an expected, counted failure."""
    from pipelines.launch import judge_server

    config = PatchConfig(device="cpu", sgpo={"model": "smollm2-135m-instruct", "url": None})
    with judge_server.serving(config, tmp_path) as served:
        url = served.sgpo["url"]
        assert url.startswith("http://127.0.0.1:") and config.sgpo["url"] is None
        j = judge.StepJudge(settings(url, model="smollm2-135m-instruct", timeout=120.0, workers=2))
        group = ["2 + 3 = 5\n\nso 5 * 2 = 10\n\nThe answer is 10.", "2 + 3 = 6\n\nso 6 * 2 = 12\n\nThe answer is 12."]
        rewards = j.grade("What is (2 + 3) * 2?", r"$(2+3) \cdot 2 = 5 \cdot 2 = \boxed{10}$", group)
    with pytest.raises(OSError):  # stopped with the block
        urllib.request.urlopen(url + "/models", timeout=5)
    assert (tmp_path / "logs" / "judge-1.log").exists()
    assert j.stats.judged == 2 and j.stats.calls >= 2
    assert "Connection refused" not in j.stats.last_error and "HTTP " not in j.stats.last_error
    for r in rewards:
        assert r is None or sigmoid(-2.5) - 1e-12 <= r <= sigmoid(2.5) + 1e-12


# ------------------------------------------------------------------ the judge ngrpo serves itself
_MODELS_SERVER = """
import http.server, json, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"data": [{"id": sys.argv[2]}]}).encode()
        self.send_response(200 if self.path == "/v1/models" else 404)
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def _fake_server(monkeypatch, script):
    from pipelines.launch import judge_server

    monkeypatch.setattr(judge_server, "server_command",
                        lambda path, name, port, device, max_model_len: [sys.executable, "-c", script, str(port), name])
    return judge_server


def test_a_judge_ngrpo_starts_serves_the_launch_and_stops_with_it(tmp_path, monkeypatch):
    judge_server = _fake_server(monkeypatch, _MODELS_SERVER)
    config = PatchConfig(device="cpu", sgpo={"model": "judge-7b", "url": None, "beta": 5.0})
    with judge_server.serving(config, tmp_path, model_path_of=lambda spec: "/models/" + spec) as served:
        url = served.sgpo["url"]
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1") and served.sgpo["beta"] == 5.0
        assert json.loads(urllib.request.urlopen(url + "/models", timeout=5).read())["data"][0]["id"] == "judge-7b"
    with pytest.raises(OSError):
        urllib.request.urlopen(url + "/models", timeout=5)
    given = PatchConfig(device="cpu", sgpo={"model": "m", "url": "http://127.0.0.1:9/v1"})
    with judge_server.serving(given, tmp_path) as served:  # --judge-url given: nothing started
        assert served is given
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["judge-1.log"]


def test_a_judge_that_dies_while_starting_stops_the_launch_with_its_log(tmp_path, monkeypatch):
    judge_server = _fake_server(monkeypatch, "import sys; print('CUDA out of memory in the judge'); sys.exit(3)")
    config = PatchConfig(device="cpu", sgpo={"model": "judge-7b", "url": None})
    with pytest.raises(judge_server.JudgeServerError,
                       match=r"(?s)exited with 3 while starting; its log is .*judge-1.log, ending:\nCUDA out of memory"):
        with judge_server.serving(config, tmp_path, model_path_of=lambda spec: spec):
            pass


@pytest.mark.pipeline
@pytest.mark.real_model
@pytest.mark.slow
def test_a_cpu_run_with_a_judge_ngrpo_serves_itself(tmp_path, tiny_model_dir):
    """The whole path with a real model as the judge: `--judge-model smollm2-135m-instruct` and no
    --judge-url, so ngrpo serves SmolLM2-135M-Instruct with vLLM's OpenAI server for the launch and
    the refill loop sends it every response of the (scripted) all-wrong groups. A 135M model
    cannot check arithmetic: its verdicts are poor and some unparsable (counted failures, reward 0
    kept); only the path and the bookkeeping are asserted."""
    from test_faults import ngrpo

    data, reward = _all_wrong_inputs(tmp_path)
    run = tmp_path / "run"
    proc = ngrpo("train", "--model", tiny_model_dir, "--data", data, "--output", run, "--device", "cpu",
                 "--preset", "cpu-tiny", "--algo", "sgpo", "--judge-model", "smollm2-135m-instruct",
                 "--judge-max-fail-share", "1", "--judge-timeout", "120", "--reward-file", reward, "--max-steps", "2",
                 timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 2
    for step in steps:
        assert step["ngrpo/judge_responses"] == 16.0
        assert step["ngrpo/judge_calls"] + step["ngrpo/judge_cached"] >= 1
        assert 0.0 <= step["rollout/reward_mean"] <= 0.999
    log = (run / "logs" / "judge-1.log").read_text(errors="replace")
    assert "127.0.0.1" in log and "/v1/chat/completions" in log  # the requests reached the served judge


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_the_judge_servers_command_line_is_one_vllms_own_parser_takes(device):
    """vLLM's server parser, as installed, reads ngrpo's command line for the judge (a flag vLLM
    dropped, such as --disable-log-requests, fails here rather than at a run's start)."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from pipelines.launch.judge_server import VLLM_SERVER_MODULE, server_command

    cmd = server_command("/models/judge", "judge-7b", 8123, device, 4096)
    assert cmd[1:3] == ["-m", VLLM_SERVER_MODULE]
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(cmd[3:])
    assert (args.model, args.served_model_name, args.host, args.port, args.max_model_len) == (
        "/models/judge", ["judge-7b"], "127.0.0.1", 8123, 4096)
    assert (args.enforce_eager, args.dtype) == ((True, "bfloat16") if device == "cpu" else (False, "auto"))
    with pytest.raises(SystemExit):
        make_arg_parser(FlexibleArgumentParser()).parse_args(cmd[3:] + ["--disable-log-requests"])


def test_a_study_runs_sgpo_and_ucpo_like_any_recipe(tmp_path, monkeypatch, tiny_model_dir):
    """`ngrpo study --algos sgpo,ucpo,grpo` hands each run its recipe and the judge flags, and,
    because UCPO may abstain, evaluates every model (the base model too) with abstention offered.
    The study stops at its first step here (Study.execute): the runs themselves are the CPU runs above."""
    from click.testing import CliRunner

    from ngrpo_cli.main import cli
    from pipelines.studies import study as study_mod

    plans = []

    def execute(self, progress=True):
        plans.append(self.plan)
        raise study_mod.StudyError("stopped by the test")

    monkeypatch.setattr(study_mod.Study, "execute", execute)
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"id": "1", "problem": "What is 1 + 1?", "answer": "2",
                                "solution": "1 + 1 = 2, so \\boxed{2}."}) + "\n")
    result = CliRunner().invoke(cli, [
        "study", "-o", str(tmp_path / "s"), "--model", str(tiny_model_dir), "--data", str(data), "--eval", str(data),
        "--algos", "sgpo,ucpo,grpo", "--seeds", "0", "--max-steps", "1",
        "--judge-url", "http://127.0.0.1:9/v1", "--judge-model", "judge"])
    assert result.exit_code == 1 and "stopped by the test" in result.output, result.output
    plan, = plans
    assert plan.eval["abstention"] is True
    argv = {algo: study_mod.train_argv(plan, algo, 0, tmp_path / algo) for algo in ("sgpo", "ucpo", "grpo")}
    for algo, args in argv.items():
        assert args[args.index("--algo") + 1] == algo
        assert args[args.index("--judge-url") + 1] == "http://127.0.0.1:9/v1"  # shared: only SGPO reads it
        assert args[args.index("--judge-model") + 1] == "judge"
    assert "--abstention" in study_mod.eval_argv(plan, "m", tmp_path / "e")
