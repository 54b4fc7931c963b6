"""openrlhf_patch.cpu_top_p: vLLM's CPU top-p without a full sort keeps exactly vLLM's nucleus."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from openrlhf_patch.cpu_top_p import top_p_mask


def vllm_top_p(logits, p):
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch

    return apply_top_k_top_p_pytorch(logits, None, p, allow_cpu_sync=True)


def _logits(rows=12, vocab=5000, seed=0):
    g = torch.Generator().manual_seed(seed)
    # From near-uniform rows (nucleus of thousands of tokens) to peaked ones (a handful).
    scale = torch.logspace(-1, 1.5, rows)[:, None]
    return torch.randn(rows, vocab, generator=g) * scale


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.95, 0.999])
def test_same_logits_as_vllm(top_p):
    logits = _logits()
    p = torch.full((logits.shape[0],), top_p)
    fallback_rows = []

    def fallback(rows, rows_p):
        fallback_rows.append(rows.shape[0])
        return vllm_top_p(rows, rows_p)

    ours = top_p_mask(logits.clone(), p, fallback, candidates=64)
    assert torch.equal(ours, vllm_top_p(logits.clone(), p))
    # Rows whose nucleus is not inside the 64 most probable tokens, and only those, went to vLLM's sort.
    fits = logits.softmax(-1).topk(64, dim=-1).values.sum(-1) >= top_p
    assert sum(fallback_rows) == int((~fits).sum())
    assert fits.any()


def test_rows_with_their_own_p_and_a_p_of_one():
    logits = _logits(rows=6, seed=1) * 5
    p = torch.tensor([1.0, 0.9, 0.3, 1.0, 0.99, 0.6])
    ours = top_p_mask(logits.clone(), p, vllm_top_p, candidates=32)
    assert torch.equal(ours, vllm_top_p(logits.clone(), p))
    assert torch.isfinite(ours[0]).all() and torch.isfinite(ours[2]).sum() < torch.isfinite(ours[1]).sum()


def test_a_row_without_top_p_keeps_its_improbable_tokens():
    """p = 1 beside rows with top-p: vLLM keeps every token of non-zero probability, even when the
    most probable tokens' probabilities already sum to 1.0 in float32."""
    logits = torch.zeros(2, 300)
    logits[:, 0] = 100.0  # the other 299 tokens: probability ~4e-44 each, not zero
    p = torch.tensor([1.0, 0.5])
    ours = top_p_mask(logits.clone(), p, vllm_top_p, candidates=8)
    assert torch.equal(ours, vllm_top_p(logits.clone(), p))
    assert torch.isfinite(ours).sum(1).tolist() == [300, 1]


def test_the_most_probable_token_always_stays():
    logits = torch.tensor([[10.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 5.0]])
    ours = top_p_mask(logits.clone(), torch.tensor([0.01, 0.01]), vllm_top_p, candidates=2)
    assert torch.isfinite(ours).tolist() == [[True, False, False, False], [False, False, False, True]]
    assert ours[0, 0] == 10.0 and ours[1, 3] == 5.0


@pytest.mark.slow
def test_a_real_vllm_engine_samples_the_same_tokens_through_it(tiny_model_dir):
    """`ngrpo eval`'s vLLM engine on CPU routes top-p through cpu_top_p (counted inside the engine,
    which runs in this process), and seeded samples are the tokens vLLM's own sort gives."""
    script = textwrap.dedent(f"""
        import json
        from openrlhf_patch import cpu_top_p
        from pipelines.evaluation import Request, VLLMBackend
        from vllm.v1.sample.ops import topk_topp_sampler as sampler

        rows, sorted_rows = [], []
        top_p_mask = cpu_top_p.top_p_mask
        def counting(logits, p, fallback, candidates=cpu_top_p.CANDIDATES):
            rows.append(logits.shape[0])
            def counted_fallback(r, rp):
                sorted_rows.append(r.shape[0])
                return fallback(r, rp)
            return top_p_mask(logits, p, counted_fallback, candidates)
        cpu_top_p.top_p_mask = counting

        original = sampler.apply_top_k_top_p  # VLLMBackend installs cpu_top_p over it
        backend = VLLMBackend({str(tiny_model_dir)!r}, max_model_len=256)
        reqs = [Request(key=(i,), prompt_ids=[1 + i, 7, 9, 11], seed=100 + i) for i in range(8)]
        def sample():
            return [g.token_ids for g in backend.generate(reqs, set(), 0, 0.05, 0.9, 24, ignore_eos=True)]
        patched = sample()
        sampler.apply_top_k_top_p = original
        original = sample()
        backend.close()
        print("RESULT" + json.dumps({{"steps": len(rows), "rows": sum(rows), "sorted": sum(sorted_rows),
                                      "patched": patched, "original": original}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT"):])
    assert result["steps"] >= 24 and result["rows"] == 8 * 24  # every token of every request
    assert result["sorted"] < result["rows"] / 2  # most rows took the path without the sort
    assert result["patched"] == result["original"]
    assert all(len(t) == 24 for t in result["patched"])
