"""The one transformers `generate` loop: batched, left-padded, with ngrpo's stop rules.

Used by `ngrpo eval --backend hf` and by the warm-up's accuracy check. Prompts arrive as token
ids (tokenised with add_special_tokens=False, as OpenRLHF does in training), so both backends of
`ngrpo eval` see the same ids.
"""
import dataclasses
from typing import List, Optional, Sequence


@dataclasses.dataclass
class Generation:
    token_ids: list
    finish_reason: str  # "stop" (an EOS token ended it, kept in token_ids) or "length"


def load_hf_model(path: str, dtype: str = "auto", trust_remote_code: bool = False):
    """A causal LM in eval mode on the GPU when there is one. dtype: auto (the model's own) or a torch dtype name."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipelines.models import detect_device

    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    return model.to(detect_device()).eval()


def eos_token_ids(model_path: str, tokenizer) -> set:
    """The tokenizer's EOS and every EOS id of the model's generation config."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    try:
        from transformers import GenerationConfig

        eos = GenerationConfig.from_pretrained(model_path).eos_token_id
        ids.update(eos if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else []))
    except Exception:  # noqa: BLE001 - no generation_config.json: the tokenizer's EOS is all there is
        pass
    return ids


def hf_generate(model, prompts: Sequence[Sequence[int]], *, pad_id: int, eos_ids: set, max_new_tokens: int,
                temperature: float = 0.0, top_p: float = 1.0, seeds: Optional[Sequence[int]] = None,
                batch_size: int = 16, ignore_eos: bool = False) -> List[Generation]:
    """One generation per prompt (token ids), in order. temperature 0 is greedy; with sampling,
    each batch is seeded with the seed of its first prompt. A response stops at its first EOS
    token (kept), or at max_new_tokens, or at the model's position limit."""
    import torch

    max_positions = getattr(model.config, "max_position_embeddings", None)
    out = []
    for start in range(0, len(prompts), batch_size):
        batch = [list(p) for p in prompts[start:start + batch_size]]
        width = max(len(p) for p in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, p in enumerate(batch):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        new = max_new_tokens if not max_positions else max(1, min(max_new_tokens, max_positions - width))
        kwargs = dict(max_new_tokens=new, pad_token_id=pad_id)
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
            torch.manual_seed(seeds[start] if seeds is not None else 0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if ignore_eos:
            kwargs.update(min_new_tokens=new, eos_token_id=None)
        else:
            kwargs.update(eos_token_id=sorted(eos_ids))
        with torch.no_grad():
            seqs = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), **kwargs)
        for row in seqs[:, width:].tolist():
            finish = "length"
            if not ignore_eos:
                for j, t in enumerate(row):
                    if t in eos_ids:
                        row, finish = row[: j + 1], "stop"
                        break
            out.append(Generation(row, finish))
    return out
