"""The chat prompt of the NGRPO paper (docs/ALGORITHM.md §5), shared by training and evaluation.

It is written out literally rather than produced by a tokenizer's chat template, so that a
model whose template differs (or that has none) still sees exactly the paper's prompt.

With abstention (UCPO, docs/ALGORITHM.md §8: `--uncertain-reward` in training, `ngrpo eval
--abstention`) one sentence follows the instruction and offers ``\\boxed{\\text{I don't know}}``.
That sentence is ngrpo's: the UCPO paper's prompt text is not confirmed (docs/FIDELITY.md).
"""

CHAT_PROMPT_TEMPLATE = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n{question}\n"
    "Please reason step by step, and put your final answer within \\boxed{{}}.<|im_end|>\n"
    "<|im_start|>assistant\n"
)

# The answer the abstention sentence offers; it must be one of the abstention phrases
# (pipelines/datasets/abstention.py), which tests/test_ucpo.py checks.
ABSTENTION_ANSWER = "\\boxed{\\text{I don't know}}"
ABSTENTION_SENTENCE = f"If you are not sure of the answer, put {ABSTENTION_ANSWER} as your final answer instead."
ABSTENTION_PROMPT_TEMPLATE = CHAT_PROMPT_TEMPLATE.replace(
    "\\boxed{{}}.<|im_end|>",
    "\\boxed{{}}. " + ABSTENTION_SENTENCE.replace("{", "{{").replace("}", "}}") + "<|im_end|>")


def prompt_template(abstention: bool = False) -> str:
    """The template build_prompt fills: the paper's, or the paper's with the abstention sentence."""
    return ABSTENTION_PROMPT_TEMPLATE if abstention else CHAT_PROMPT_TEMPLATE


def build_prompt(question: str, abstention: bool = False) -> str:
    """The full prompt text for one problem (ABSTENTION: the model is told it may answer
    \\boxed{\\text{I don't know}})."""
    return prompt_template(abstention).format(question=question)
