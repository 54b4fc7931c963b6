"""CPU mode's vLLM engine: the KV cache sized to the rollout, and the actor -> vLLM weight sync in
buckets (openrlhf_patch/cpu/cpu_mode.py, cpu_vllm_worker.py).

The bucketing is pure; the receiver is run against a real two-rank gloo group (two threads, the
sender doing what `broadcast_to_vllm_in_buckets` does for one bucket). Its run inside real Ray
and vLLM workers is checked by tests/test_train_pipeline.py (vllm_kl ~ 0 after every sync, and
the launch log's "[ngrpo] weight sync" line).
"""
import threading
from types import SimpleNamespace

import pytest
import torch

from openrlhf_patch.cpu.cpu_mode import KV_CACHE_FALLBACK_BYTES, GlooBroadcastGroup, kv_cache_bytes, weight_buckets
from pipelines.launch.warmup import _free_port  # the port helper of the warm-up's own gloo group


def test_kv_cache_holds_one_rollout_at_full_length(tmp_path):
    from transformers import Qwen2Config

    Qwen2Config(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=100).save_pretrained(tmp_path)
    # K and V x 2 layers x 2 KV heads x head_dim 32 = 256 values a token; 16 sequences of 160 + 128 tokens
    assert kv_cache_bytes(str(tmp_path), "bfloat16", 160, 16) == 256 * 2 * 16 * 288 == 2_359_296
    assert kv_cache_bytes(str(tmp_path), "float32", 160, 16) == 2 * 2_359_296
    Qwen2Config(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                vocab_size=100).save_pretrained(tmp_path)
    assert kv_cache_bytes(str(tmp_path), "bfloat16", 160, 16) == 2 * 2_359_296
    assert kv_cache_bytes(str(tmp_path / "missing"), "bfloat16", 160, 16) == KV_CACHE_FALLBACK_BYTES


def _named(*specs):
    return [(f"p{i}", torch.zeros(n, dtype=dtype)) for i, (n, dtype) in enumerate(specs)]


def test_buckets_keep_order_split_at_dtype_changes_and_at_the_size_limit():
    f32, bf16 = torch.float32, torch.bfloat16
    params = _named((10, f32), (10, f32), (5, f32), (8, bf16), (8, bf16), (100, f32), (1, f32))
    buckets = [[n for n, _ in b] for b in weight_buckets(params, max_bytes=80)]
    # 40 + 40 bytes fill the first bucket; 20 bytes start the next; bf16 starts its own; a
    # 400-byte tensor over the limit goes alone; the last float32 follows it.
    assert buckets == [["p0", "p1"], ["p2"], ["p3", "p4"], ["p5"], ["p6"]]
    assert [n for b in weight_buckets(params, max_bytes=1 << 30) for n, _ in b] == [n for n, _ in params]
    assert [len(b) for b in weight_buckets(params, max_bytes=1 << 30)] == [3, 2, 2]  # dtype runs only


def _receiver_and_sender():
    port, groups = _free_port(), {}

    def make(rank):
        groups[rank] = GlooBroadcastGroup("127.0.0.1", port, rank, 2, timeout_s=60)

    threads = [threading.Thread(target=make, args=(r,)) for r in (0, 1)]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    loaded = []
    model = SimpleNamespace(load_weights=lambda weights: loaded.extend((n, t.clone()) for n, t in weights))
    from openrlhf_patch.cpu.cpu_vllm_worker import CPUWorkerWrap

    worker = CPUWorkerWrap()
    worker._model_update_group = groups[1]
    worker.model_config = SimpleNamespace(dtype=torch.float32)
    worker.model_runner = SimpleNamespace(model=model)
    return worker, groups[0], loaded


def _sync(worker, sender, bucket):
    flat = torch.cat([t.reshape(-1) for _, t in bucket])
    send = threading.Thread(target=sender.broadcast, args=(flat, 0))
    send.start()
    try:
        worker.update_weight([n for n, _ in bucket], torch.float32, [tuple(t.shape) for _, t in bucket])
    finally:
        send.join(60)


def test_a_bucket_arrives_as_the_tensors_it_was_made_of():
    worker, sender, loaded = _receiver_and_sender()
    g = torch.Generator().manual_seed(0)
    bucket = [("embed.weight", torch.randn(7, 3, generator=g)), ("norm.weight", torch.randn(3, generator=g)),
              ("lm_head.bias", torch.randn(7, generator=g))]
    _sync(worker, sender, bucket)
    assert [n for n, _ in loaded] == [n for n, _ in bucket]
    for (_, got), (_, sent) in zip(loaded, bucket):
        assert got.shape == sent.shape and torch.equal(got, sent)
    # upstream's one-tensor call still works on the same group
    one = torch.randn(2, 2, generator=g)
    send = threading.Thread(target=sender.broadcast, args=(one.clone(), 0))
    send.start()
    worker.update_weight("one", torch.float32, (2, 2))
    send.join(60)
    assert loaded[-1][0] == "one" and torch.equal(loaded[-1][1], one)


def test_non_finite_weights_are_refused_naming_the_tensor():
    worker, sender, loaded = _receiver_and_sender()
    bad = torch.ones(4)
    bad[2] = float("nan")
    with pytest.raises(FloatingPointError, match=r"non-finite values for b$"):
        _sync(worker, sender, [("a", torch.ones(3)), ("b", bad), ("c", torch.ones(2))])
    assert loaded == []  # nothing half-loaded
    with pytest.raises(TypeError, match="dtype mismatch for x: actor torch.bfloat16, vLLM torch.float32"):
        worker.update_weight(["x"], torch.bfloat16, [(1,)])


MATMUL_SHAPES_CHILD = r"""
import torch
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
w = torch.randn(256, 128, dtype=torch.bfloat16)
torch.nn.functional.linear(torch.randn(3, 128, dtype=torch.bfloat16), w)
before = rss_mb()
for rows in range(1, 401):  # a new matmul shape each time, as every rollout brings
    torch.nn.functional.linear(torch.randn(rows, 128, dtype=torch.bfloat16), w)
print(rss_mb() - before)
"""


def _matmul_shapes_growth_mb(env):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", MATMUL_SHAPES_CHILD], env=env, capture_output=True, text=True,
                         check=True, timeout=300)
    return float(out.stdout.strip())


def test_cpu_mode_bounds_onednn_kernel_caches():
    """CPU mode's environment caps the two caches in which oneDNN keeps a compiled kernel per bf16
    matmul shape. Uncapped (1024 entries each, oneDNN's default) 400 shapes grow the process by
    ~250 MB (vLLM's engine core grew ~2.3 MB a training step); capped, by what 64 kernels take."""
    import os

    from openrlhf_patch.cpu.cpu_mode import ONEDNN_CACHE_ENV, cpu_env

    base = {k: v for k, v in os.environ.items() if k not in ONEDNN_CACHE_ENV}
    uncapped = _matmul_shapes_growth_mb({**base, **{k: "1024" for k in ONEDNN_CACHE_ENV}})
    if uncapped < 100:
        pytest.skip(f"this CPU's bf16 matmul does not go through oneDNN's kernel caches ({uncapped:.0f} MB growth)")
    env = cpu_env()
    assert {k: env[k] for k in ONEDNN_CACHE_ENV} == {"LRU_CACHE_CAPACITY": "64", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64"}
    capped = _matmul_shapes_growth_mb({**base, **env})
    assert capped < uncapped / 3, (capped, uncapped)
