"""Nucleus (top-p) sampling on CPU without sorting the whole vocabulary.

vLLM's CPU sampler applies top-p by sorting every row of the logits (49,152 tokens for SmolLM2), a
softmax and a cumulative sum over the sorted row, then scattering back: on two cores that is about
a third of a decoding step at 16 sequences (SmolLM2-135M, top_p 0.95: 307 tokens/s with it, 443
without). The nucleus of a trained model is a few dozen tokens, so `top_p_mask` looks only at the
most probable `CANDIDATES` tokens of each row and keeps vLLM's own code for a row whose nucleus
does not fit in them (a near-uniform distribution, e.g. an untrained model).

The kept set is vLLM's: a token stays when the probability of the tokens ranked above it is below
p (vLLM: its ascending cumulative sum exceeds 1 - p), the most probable token always stays. Only
float rounding at the nucleus boundary can differ (vLLM sums the whole sorted row, this sums the
candidates), tested against vLLM's function in tests/test_cpu_top_p.py.
"""
import torch

CANDIDATES = 256  # tokens per row looked at before falling back to vLLM's full sort


def top_p_mask(logits: torch.Tensor, p: torch.Tensor, fallback, candidates: int = CANDIDATES) -> torch.Tensor:
    """LOGITS [rows, vocab] with every token outside each row's nucleus set to -inf (P: [rows]).
    FALLBACK(logits, p) handles the rows whose nucleus does not fit in the top CANDIDATES."""
    k = min(candidates, logits.shape[-1])
    probs = logits.softmax(dim=-1, dtype=torch.float32)
    top_probs, top_idx = probs.topk(k, dim=-1)  # descending
    above = top_probs.cumsum(dim=-1) - top_probs  # mass of the tokens ranked above each candidate
    p = p.to(torch.float32).unsqueeze(1)
    keep = above < p
    keep[:, 0] = True
    # Every token past the candidates is then out. Not for p = 1 (a row without top-p in a batch
    # with it), where vLLM keeps any token of non-zero probability and a sum can round up to 1.
    fits = (top_probs.sum(dim=-1, keepdim=True) >= p) & (p < 1)
    out = torch.full_like(logits, float("-inf"))
    out.scatter_(1, top_idx, torch.where(keep, logits.gather(1, top_idx), float("-inf")))
    rest = ~fits.squeeze(1)
    if rest.any():
        out[rest] = fallback(logits[rest], p.squeeze(1)[rest])  # a boolean index copies
    return out


def install() -> None:
    """Route vLLM's CPU top-p (no top-k) through `top_p_mask` in this process (vLLM's sampler
    looks the function up at call time; the engine must run in this process)."""
    from vllm.v1.sample.ops import topk_topp_sampler as sampler

    if getattr(sampler.apply_top_k_top_p, "ngrpo_top_p", False):
        return
    original = sampler.apply_top_k_top_p

    def apply_top_k_top_p(logits, k, p):
        if k is None and p is not None and logits.device.type == "cpu":
            return top_p_mask(logits, p, lambda rows, rows_p: original(rows, None, rows_p))
        return original(logits, k, p)

    apply_top_k_top_p.ngrpo_top_p = True
    sampler.apply_top_k_top_p = apply_top_k_top_p
