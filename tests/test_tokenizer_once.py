"""openrlhf_patch/cpu/tokenizer_once.py on a real tokenizer: what OpenRLHF's dispatch sends for each
prompt unpickles to the same tokenizer, once per process; a changed tokenizer travels as a new
one. The training runs in tests/test_train_pipeline.py check the rollout actor's one line per launch."""
import pickle

import pytest
from ray import cloudpickle
from transformers import AutoTokenizer

from openrlhf_patch.cpu import tokenizer_once


@pytest.fixture
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _through_ray(obj):
    return pickle.loads(cloudpickle.dumps(obj))  # what a Ray call does to an argument


def test_each_prompt_gets_the_tokenizer_unpickled_once(tokenizer, monkeypatch, capsys):
    monkeypatch.setattr(tokenizer_once, "_unpickled", {})
    sent = tokenizer_once.PickledOnce(tokenizer)
    first, second = _through_ray(sent), _through_ray(tokenizer_once.PickledOnce(tokenizer))
    assert first is second and first is not tokenizer
    text = "What is 12 + 5?"
    assert first(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert first.decode([3, 4, 5]) == tokenizer.decode([3, 4, 5])
    assert capsys.readouterr().err.count("[ngrpo] tokenizer ") == 1
    assert list(tokenizer_once._unpickled) == [sent.digest]


def test_a_changed_tokenizer_travels_as_a_new_one(tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer_once, "_unpickled", {})
    before = _through_ray(tokenizer_once.PickledOnce(tokenizer))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<tool>"]})
    after = _through_ray(tokenizer_once.PickledOnce(tokenizer))
    assert after is not before
    assert len(after) == len(before) + 1 and after.convert_tokens_to_ids("<tool>") == len(before)


def test_a_process_keeps_a_bounded_number_of_tokenizers(monkeypatch):
    monkeypatch.setattr(tokenizer_once, "_unpickled", {})
    for i in range(tokenizer_once.KEPT_TOKENIZERS + 3):
        assert _through_ray(tokenizer_once.PickledOnce({"vocab": i})) == {"vocab": i}
    assert len(tokenizer_once._unpickled) == tokenizer_once.KEPT_TOKENIZERS


def test_the_dispatch_sends_the_pickled_once_tokenizer_and_puts_its_own_back(tokenizer):
    class Generator:
        def __init__(self):
            self.tokenizer = tokenizer

    def dispatch(self, prompts, fail=False):
        sent = [type(self.tokenizer).__name__ for _ in prompts]
        if fail:
            raise RuntimeError("engine gone")
        return sent

    wrapped = tokenizer_once.wrap_dispatch_prompts(dispatch)
    generator = Generator()
    assert wrapped(generator, ["a", "b"]) == ["PickledOnce", "PickledOnce"]
    assert generator.tokenizer is tokenizer
    with pytest.raises(RuntimeError):
        wrapped(generator, ["a"], fail=True)
    assert generator.tokenizer is tokenizer
