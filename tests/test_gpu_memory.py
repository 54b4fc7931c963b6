"""pipelines/launch/gpu_memory.py on CPU: Qwen2.5-Math-7B's real shape, every recipe, hand-checked numbers."""
import dataclasses
from types import SimpleNamespace

import pytest

from pipelines.launch import gpu_memory as gm
from pipelines.launch.gpu_run import GpuRunSettings, recipe_memory_setup
from pipelines.launch.recipes import ALGOS, build_recipe

# Qwen/Qwen2.5-Math-7B config.json
QWEN_7B_CONFIG = {"model_type": "qwen2", "hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28,
                  "num_key_value_heads": 4, "intermediate_size": 18944, "vocab_size": 152064,
                  "tie_word_embeddings": False}
QWEN_7B = gm.ModelShape.from_config(QWEN_7B_CONFIG)
GIB = 2 ** 30
EIGHT_GPUS = dict(nodes=1, gpus_per_node=8)


def test_qwen_7b_shape_by_hand():
    # per layer: q 3584^2 + 3584 bias, k and v 3584*512 + 512 each, o 3584^2, MLP 3*3584*18944, 2 norms
    layer = (3584 * 3584 + 3584) + 2 * (3584 * 512 + 512) + 3584 * 3584 + 3 * 3584 * 18944 + 2 * 3584
    assert layer == 233_057_792 == QWEN_7B.layer_params
    # 28 layers + embeddings + untied lm_head + final norm: Qwen2.5-7B's published 7.62B
    assert QWEN_7B.params == 28 * layer + 2 * 152064 * 3584 + 3584 == 7_615_616_512
    assert QWEN_7B.critic_params == 7_615_616_512 - 152064 * 3584 + 3584
    # 16h + 4kv + 8I = 57,344 + 2,048 + 151,552 bytes per token per layer
    assert QWEN_7B.activation_bytes_per_token(checkpointing=False) == 28 * 210_944 == 5_906_432
    assert QWEN_7B.activation_bytes_per_token(checkpointing=True) == 28 * 2 * 3584 + 210_944 == 411_648
    assert QWEN_7B.kv_cache_bytes_per_token() == 2 * 28 * 4 * 128 * 2 == 57_344


def test_tied_embeddings_and_llama_have_no_extra_head_or_bias():
    tied = gm.ModelShape.from_config({**QWEN_7B_CONFIG, "tie_word_embeddings": True})
    assert QWEN_7B.params - tied.params == 152064 * 3584
    llama = gm.ModelShape.from_config({**QWEN_7B_CONFIG, "model_type": "llama"})
    assert QWEN_7B.params - llama.params == 28 * (3584 + 2 * 512)


def test_proposed_gpu_preset_ngrpo_on_8x80_by_hand():
    """ZeRO-3, gradient checkpointing, 4 x 4096 padded tokens per micro-batch, vLLM at 0.5."""
    setup = GpuRunSettings(packing=False).memory_setup(build_recipe("ngrpo", "paper"), **EIGHT_GPUS)
    assert (setup.zero_stage, setup.gradient_checkpointing, setup.train_tokens) == (3, True, 16384)
    est = gm.estimate(QWEN_7B, setup, gpu_gib=80)
    a = est.actor
    P = 7_615_616_512
    assert a.weights == pytest.approx(2 * P / 8 / GIB) == pytest.approx(1.77315, abs=1e-5)
    assert a.grads == pytest.approx(2 * P / 8 / GIB)
    assert a.optimizer == pytest.approx(12 * P / 8 / GIB) == pytest.approx(10.63889, abs=1e-5)
    assert a.zero3_gather == pytest.approx(4 * 152064 * 3584 / GIB) == pytest.approx(2.03027, abs=1e-5)
    assert a.activations == pytest.approx(16384 * 411_648 / GIB) == pytest.approx(6.28125, abs=1e-5)
    assert a.logits == 18.5625  # 8 bytes x 152064 x 16384 tokens, exactly
    assert a.total == pytest.approx(43.05921, abs=1e-4)
    # train phase: + the sleeping vLLM's process; generate: vLLM's 40 GiB + the actor's bf16 shard + process
    assert est.phases["train actor"] == pytest.approx(44.05921, abs=1e-4)
    assert est.phases["generate"] == pytest.approx(40 + 1.77315 + 1, abs=1e-4)
    assert est.reference is None and est.critic is None
    report = gm.check_fit(QWEN_7B, setup, 80)
    assert report.fits and "44.1 GiB per GPU in the train actor phase" in report.message


@pytest.mark.parametrize("packing", [False, True], ids=["sdpa", "flash-attn"])
@pytest.mark.parametrize("algo", ALGOS)
def test_every_recipe_fits_8x80_with_the_proposed_gpu_preset(algo, packing):
    recipe = build_recipe(algo, "paper")
    setup = GpuRunSettings(packing=packing).memory_setup(recipe, **EIGHT_GPUS)
    assert setup.reference == (algo in ("grpo", "ppo", "grpo_uc", "ucpo", "reinforce_pp", "reinforce_pp_baseline", "sgpo")) \
        and setup.critic == (algo == "ppo")
    report = gm.check_fit(QWEN_7B, setup, 80)
    assert report.fits, report.message
    est = report.estimate
    assert (est.reference is not None, est.critic is not None) == (setup.reference, setup.critic)
    expected_train = {"grpo": 46.83, "grpo_uc": 46.83, "ucpo": 46.83, "reinforce_pp": 46.83, "reinforce_pp_baseline": 46.83, "sgpo": 46.83,
                      "ppo": 49.48}.get(algo, 44.06)  # + reference 1.77 + 1; + critic 1.65 + 1
    assert est.phases["train actor"] == pytest.approx(expected_train, abs=0.01)
    assert est.total < 0.95 * 80


def test_reference_and_critic_by_hand():
    setup = GpuRunSettings(packing=False).memory_setup(build_recipe("ppo", "paper"), **EIGHT_GPUS)
    est = gm.estimate(QWEN_7B, setup, 80)
    # ZeRO-3: the reference model is sharded too; its forward holds 6 bytes x V of logits per token
    # over 8 x 4096 rollout tokens, plus one layer's intermediates
    assert est.reference.weights == pytest.approx(1.77315, abs=1e-5)
    assert est.reference.activations == pytest.approx((32768 * 6 * 152064 + 32768 * 411_648 / 28) / GIB)
    assert est.critic.weights == pytest.approx(2 * 7_070_622_720 / 8 / GIB)
    assert est.critic.logits == 0
    # ZeRO-2 (today's recipe default): the reference model is unsharded, 2P on every GPU
    zero2 = gm.estimate(QWEN_7B, dataclasses.replace(setup, zero_stage=2), 80)
    assert zero2.reference.weights == pytest.approx(2 * 7_615_616_512 / GIB) == pytest.approx(14.18519, abs=1e-5)
    assert zero2.actor.asleep == pytest.approx(14.18519 + 1, abs=1e-5)  # sleep keeps the bf16 weights


OLD_PAPER = {"zero_stage": 2, "gradient_checkpointing": False}  # the paper preset before it set the GPU knobs


def test_the_old_gpu_command_line_does_not_fit_8x80_and_says_what_to_change():
    """ZeRO-2, no checkpointing, 4 x 4096 tokens: ~90 GiB of activations alone."""
    setup = recipe_memory_setup(build_recipe("ngrpo", "paper", OLD_PAPER), **EIGHT_GPUS)
    report = gm.check_fit(QWEN_7B, setup, 80)
    assert not report.fits
    assert report.estimate.actor.activations == pytest.approx(16384 * 5_906_432 / GIB) == pytest.approx(90.125, abs=1e-3)
    assert "--gradient-checkpointing" in report.message and "fewer tokens per GPU" in report.message
    assert "138.3 GiB" in report.message


@pytest.mark.parametrize("algo", ALGOS)
def test_2x24_is_refused_with_what_to_change(algo):
    setup = GpuRunSettings(packing=False).memory_setup(build_recipe(algo, "paper"), nodes=1, gpus_per_node=2)
    report = gm.check_fit(QWEN_7B, setup, 24)
    assert not report.fits
    with pytest.raises(gm.GpuMemoryError) as err:
        gm.require_fit(QWEN_7B, setup, 24)
    message = str(err.value)
    assert message == report.message
    # ZeRO-3 over 2 GPUs: 16 bytes x 7.6B / 2 = 56.7 GiB of training states alone
    assert report.estimate.actor.weights + report.estimate.actor.grads + report.estimate.actor.optimizer == \
        pytest.approx(16 * 7_615_616_512 / 2 / GIB)
    assert "fewer tokens per GPU" in message and "more GPUs:" in message
    # vLLM's half of 24 GiB cannot hold 14.2 GiB of weights + runtime + KV cache: 16.9 GiB
    assert "(16.9 GiB)" in message and "--vllm.tensor_parallel_size 2" in message


def test_zero2_2x24_names_zero3_and_checkpointing():
    setup = recipe_memory_setup(build_recipe("ngrpo", "paper", OLD_PAPER), nodes=1, gpus_per_node=2)
    message = gm.check_fit(QWEN_7B, setup, 24).message
    assert "ZeRO-3" in message and "--gradient-checkpointing" in message and "more GPUs:" in message


def test_more_gpus_is_the_fewest_that_fit():
    # ZeRO-3 + checkpointing on 40 GiB GPUs (38 usable): 29.9 GiB per GPU do not shrink with more GPUs
    # (gather 2.03, activations 6.28, logits 18.56, runtime 2, sleeping vLLM 1), the 16 x P bytes of
    # training states do: / 12 GPUs 9.46 GiB (39.33 in all), / 16 GPUs 7.09 GiB (36.97 in all).
    setup = GpuRunSettings(packing=False).memory_setup(build_recipe("ngrpo", "paper"), nodes=1, gpus_per_node=4)
    report = gm.check_fit(QWEN_7B, setup, 40)
    assert not report.fits and "more GPUs: 16 x 40 GiB fit these settings" in report.message
    grown = lambda nodes: dataclasses.replace(setup, nodes=nodes, vllm_engines=4 * nodes)
    assert gm.estimate(QWEN_7B, grown(3), 40).total == pytest.approx(39.3308, abs=1e-3)
    assert gm.estimate(QWEN_7B, grown(4), 40).total == pytest.approx(36.9666, abs=1e-3)
    assert not gm.check_fit(QWEN_7B, grown(3), 40).fits and gm.check_fit(QWEN_7B, grown(4), 40).fits


def test_dynamic_batching_counts_tokens_per_gpu_not_sequences():
    setup = GpuRunSettings(packing=True, max_tokens_per_gpu=8192).memory_setup(build_recipe("ngrpo", "paper"),
                                                                              **EIGHT_GPUS)
    assert setup.dynamic_batch and setup.train_tokens == 8192 and setup.rollout_tokens == 8192
    assert gm.estimate(QWEN_7B, setup, 80).actor.logits == 8 * 152064 * 8192 / GIB


def test_not_colocated_peaks_per_model():
    setup = dataclasses.replace(GpuRunSettings().memory_setup(build_recipe("grpo", "paper"), **EIGHT_GPUS),
                                colocate=False, sleep=False)
    est = gm.estimate(QWEN_7B, setup, 80)
    assert set(est.phases) == {"actor GPUs", "vLLM GPUs", "reference GPUs"}
    assert est.total == est.phases["actor GPUs"] == pytest.approx(est.actor.total)


def test_setup_from_parsed_openrlhf_args_and_config_file(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps(QWEN_7B_CONFIG))
    ns = SimpleNamespace
    args = ns(actor=ns(num_nodes=1, num_gpus_per_node=8, gradient_checkpointing_enable=True,
                       model_name_or_path=str(tmp_path)),
              train=ns(colocate_all=True, micro_batch_size=4, dynamic_batch_enable=False, max_tokens_per_gpu=16192),
              ds=ns(enable_sleep=True, zero_stage=3, adam_offload=False),
              vllm=ns(num_engines=8, tensor_parallel_size=1, gpu_memory_utilization=0.5),
              data=ns(max_len=4096), rollout=ns(micro_batch_size=8, max_tokens_per_gpu=None),
              algo=ns(kl=ns(init_coef=0)), critic=ns(model_name_or_path=None))
    report = gm.check_openrlhf_args(args, gpu_gib=80)
    assert report.fits and report.estimate.phases["train actor"] == pytest.approx(44.05921, abs=1e-4)


def test_gpu_size_without_nvml_or_nvidia_smi_names_what_to_pass(monkeypatch):
    import subprocess
    import sys

    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails

    def no_nvidia_smi(*args, **kwargs):
        raise FileNotFoundError("nvidia-smi")

    monkeypatch.setattr(subprocess, "run", no_nvidia_smi)
    with pytest.raises(gm.GpuMemoryError, match="give it as gpu_gib"):
        gm.gpu_total_gib()


def test_gpu_size_from_nvidia_smi(monkeypatch):
    import subprocess
    import sys

    monkeypatch.setitem(sys.modules, "pynvml", None)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: SimpleNamespace(stdout="81559\n"))
    assert gm.gpu_total_gib() == pytest.approx(81559 / 1024)  # an H100 80GB: 79.65 GiB
