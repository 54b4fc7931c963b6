"""The chat prompt of the NGRPO paper (docs/ALGORITHM.md §5), shared by training and evaluation.

It is written out literally rather than produced by a tokenizer's chat template, so that a
model whose template differs (or that has none) still sees exactly the paper's prompt.
"""

CHAT_PROMPT_TEMPLATE = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n{question}\n"
    "Please reason step by step, and put your final answer within \\boxed{{}}.<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def build_prompt(question: str) -> str:
    """The full prompt text for one problem."""
    return CHAT_PROMPT_TEMPLATE.format(question=question)

