"""The policy's tokenizer reaches each rollout actor once per run, not once per prompt.

OpenRLHF hands every prompt to a rollout actor as `generate_responses.remote(..., hf_tokenizer=
self.tokenizer)`, so Ray pickles the whole tokenizer for each prompt and the actor unpickles it
for each call: 0.3 + 0.8 ms on the tiny model, 16 + 85 ms on SmolLM2-135M (1.6 MB), 4 to 16 times a
step, in the process that serves generation (where, on CPU, vLLM's engine core waits for the GIL
meanwhile). Here a dispatch pickles the tokenizer once and sends those bytes with their digest; a
process unpickles each digest once and hands out that object afterwards. The bytes are made again
at every dispatch, so a tokenizer changed in the trainer reaches the actors as upstream's would.
"""
import functools
import hashlib
import pickle
import sys

KEPT_TOKENIZERS = 4  # digests a process keeps (one per run in practice)
_unpickled = {}  # digest -> tokenizer, in the process that receives them


def tokenizer_from_bytes(digest: str, payload: bytes):
    """Unpickling side: the tokenizer PAYLOAD holds, unpickled once per process."""
    tokenizer = _unpickled.get(digest)
    if tokenizer is None:
        tokenizer = pickle.loads(payload)
        while len(_unpickled) >= KEPT_TOKENIZERS:
            _unpickled.pop(next(iter(_unpickled)))
        _unpickled[digest] = tokenizer
        print(f"[ngrpo] tokenizer {digest[:12]} unpickled ({len(payload):,} bytes), kept for later prompts",
              file=sys.stderr, flush=True)
    return tokenizer


class PickledOnce:
    """A tokenizer that pickles as its bytes pickled once (with Ray's cloudpickle, as Ray would)."""

    def __init__(self, tokenizer):
        from ray import cloudpickle

        self.payload = cloudpickle.dumps(tokenizer)
        self.digest = hashlib.sha256(self.payload).hexdigest()

    def __reduce__(self):
        return tokenizer_from_bytes, (self.digest, self.payload)


def wrap_dispatch_prompts(dispatch):
    """SamplesGenerator._dispatch_prompts_to_vllm, handing out its tokenizer as PickledOnce; it
    reads `self.tokenizer` only to pass it to `generate_responses`."""
    @functools.wraps(dispatch)
    def _dispatch_prompts_to_vllm(self, *args, **kwargs):
        tokenizer = self.tokenizer
        self.tokenizer = PickledOnce(tokenizer)
        try:
            return dispatch(self, *args, **kwargs)
        finally:
            self.tokenizer = tokenizer

    return _dispatch_prompts_to_vllm
