"""A small random-weight Qwen2 causal LM with a Qwen-style tokenizer, for tests and CPU demos.

The tokenizer is a byte-level BPE trained on the fly with the `tokenizers` library (so any text
round-trips and nothing is downloaded), with numbers split into digits as in Qwen's; the chat template and special tokens follow Qwen2.5, so
the same prompt code serves the tiny model and Qwen2.5-Math-7B. vLLM's CPU attention needs
head_dim >= 32, hence 2 heads of 64 on a hidden size of 128.
"""
import json
from pathlib import Path

SYSTEM_PROMPT = "You are a helpful assistant."
IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]

# Qwen2.5's template, reduced to what single-turn math prompts use: a default system message
# when none is given, then each turn, then the assistant header for generation.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + SYSTEM_PROMPT + "<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tokenizer_corpus():
    """Text the BPE merges are learned from: math prompt boilerplate, LaTeX and numbers."""
    lines = [
        "Please reason step by step, and put your final answer within \\boxed{}.",
        SYSTEM_PROMPT,
        "The answer is \\boxed{42}. Therefore the final answer is 7.",
        "\\frac{1}{2} \\sqrt{3} \\pi \\cdot \\times \\left( \\right) \\dfrac \\text{ cm}",
        "What is the sum of the numbers? Compute the product. Find the value of x such that",
        "Let a and b be real numbers. How many positive integers n satisfy the equation?",
    ]
    for a in range(0, 100, 3):
        for b in range(0, 100, 7):
            lines.append(f"What is {a} + {b}? {a} + {b} = {a + b}. The answer is \\boxed{{{a + b}}}.")
            lines.append(f"What is {a} times {b}? {a} * {b} = {a * b}.")
    return lines


def build_tokenizer(vocab_size: int = 512):
    """A PreTrainedTokenizerFast with Qwen's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Numbers split into single digits, as Qwen's tokenizer does: arithmetic then means learning
    # digit-wise rules that carry over to unseen questions, not a table of whole-number tokens.
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=4096,
        padding_side="left",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(
    out_dir,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate_size: int = 256,
    max_position_embeddings: int = 2048,
    vocab_size: int = 512,
    seed: int = 0,
    dtype: str = "bfloat16",
) -> Path:
    """Write a random Qwen2ForCausalLM and its tokenizer to `out_dir` with save_pretrained.

    Returns the folder. transformers, vLLM and OpenRLHF load it from that path.
    """
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    if hidden_size // num_heads < 32:
        raise ValueError(f"head_dim = {hidden_size // num_heads} < 32: vLLM's CPU attention needs head_dim >= 32")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(vocab_size)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.convert_tokens_to_ids(ENDOFTEXT),
        eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(getattr(torch, dtype))
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=[config.eos_token_id, config.bos_token_id],
        pad_token_id=config.pad_token_id,
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "ngrpo_tiny_model.json").write_text(
        json.dumps({"builder": "pipelines.launch.tiny_model.build_tiny_model", "seed": seed, "hidden_size": hidden_size,
                    "num_layers": num_layers, "num_heads": num_heads, "vocab_size": len(tokenizer)}, indent=2)
    )
    return out
