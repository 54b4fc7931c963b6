"""vLLM's engine core in a thread of the rollout actor (openrlhf_patch/cpu/vllm_engine_thread.py).

The stand-in process object on its own, then a real AsyncLLM engine on the tiny model in a fresh
Python (as the rollout actor builds it, through CPU mode's engine-argument patch): it generates
what transformers generates, starts no process, leaves the main thread's signal handlers alone,
freezes the actor's objects out of the garbage collector and ends its thread at shutdown; and an engine core that fails at start makes the engine raise vLLM's
own error instead of hanging. The training runs in tests/test_train_pipeline.py check the launch
log's line that the rollout actor ran it this way."""
import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import threading

import pytest

from openrlhf_patch.cpu.vllm_engine_thread import _EngineCoreThread, _SignalModule

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ended(engine, timeout=10.0):
    """Whether the engine's sentinel became readable (what vLLM's monitor waits for)."""
    return bool(select.select([engine.sentinel], [], [], timeout)[0])


def test_terminate_calls_the_handler_the_engine_installed_in_its_thread():
    stop = threading.Event()
    seen = []

    def engine_main():
        _SignalModule.signal(signal.SIGTERM, lambda signum, frame: (seen.append(signum), stop.set()))
        stop.wait(30)
        raise SystemExit  # what vLLM's busy loop raises once shut down

    before = signal.getsignal(signal.SIGTERM)
    engine = _EngineCoreThread(target=engine_main, name="EngineCore")
    engine.start()
    while signal.SIGTERM not in engine.signal_handlers:
        threading.Event().wait(0.01)
    assert engine.is_alive() and not _ended(engine, 0.05)
    engine.terminate()
    assert _ended(engine)
    engine.join(5)
    assert (seen, engine.exitcode, engine.is_alive(), engine.pid) == ([signal.SIGTERM], 0, False, None)
    assert signal.getsignal(signal.SIGTERM) is before  # the process's own handler untouched


@pytest.mark.parametrize("raised, exitcode", [(SystemExit(3), 3), (ValueError("no KV cache"), 1)])
def test_an_engine_that_stops_sets_its_exit_code_and_its_sentinel(raised, exitcode):
    def engine_main(**kwargs):
        raise raised

    engine = _EngineCoreThread(target=engine_main, kwargs={"vllm_config": None})
    engine.start()
    assert _ended(engine)
    engine.join(5)
    assert engine.exitcode == exitcode


def test_outside_an_engine_thread_signal_is_the_real_module():
    previous = signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    try:
        handler = lambda signum, frame: None  # noqa: E731
        _SignalModule.signal(signal.SIGUSR1, handler)
        assert signal.getsignal(signal.SIGUSR1) is handler
        assert _SignalModule().Signals(signal.SIGUSR1).name == "SIGUSR1"
    finally:
        signal.signal(signal.SIGUSR1, previous)


def _engine_python(code, timeout=300):
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stdout + proc.stderr


ENGINE_PRELUDE = """
    import asyncio, gc, json, signal, sys, threading
    import psutil
    from openrlhf_patch.cpu import cpu_mode
    cpu_mode.apply_cpu_patches()  # as a CPU run's rollout actor: engine arguments patched on import
    import vllm
    from vllm import SamplingParams

    MODEL = sys.argv[1] if len(sys.argv) > 1 else {model!r}
    PROMPT = [5, 17, 42, 99, 7]
    handler_before = signal.getsignal(signal.SIGTERM)

    def engine_args(**overrides):
        return vllm.AsyncEngineArgs(model=MODEL, dtype="float32", max_model_len=64, enforce_eager=True,
                                    seed=0, **overrides)
"""


@pytest.mark.slow
def test_a_real_async_engine_runs_its_core_in_a_thread_and_generates_what_transformers_does(tiny_model_dir):
    out, output = _engine_python(ENGINE_PRELUDE.format(model=str(tiny_model_dir)) + """
    async def main():
        frozen_before = gc.get_freeze_count()
        llm = vllm.AsyncLLMEngine.from_engine_args(engine_args())
        frozen = gc.get_freeze_count()
        core_threads = [t for t in threading.enumerate() if t.name == "EngineCore"]
        children = [" ".join(p.cmdline()) for p in psutil.Process().children(recursive=True)]
        final = None
        async for final in llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                                        request_id="r0"):
            pass
        log_stats = llm.log_stats
        llm.shutdown()
        for t in core_threads:
            t.join(10)
        return {"core_threads": len(core_threads), "alive_after_shutdown": any(t.is_alive() for t in core_threads),
                "engine_children": [c for c in children if "EngineCore" in c or "multiprocessing" in c],
                "tokens": list(final.outputs[0].token_ids), "log_stats": log_stats,
                "sigterm_handler_kept": signal.getsignal(signal.SIGTERM) is handler_before,
                "frozen": [frozen_before, frozen > 100_000]}

    result = asyncio.run(main())
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(MODEL, torch_dtype=torch.float32)
    model.generation_config.eos_token_id = None  # as ignore_eos: neither stops nor masks the end token
    hf = model.generate(torch.tensor([PROMPT]), do_sample=False, max_new_tokens=12, pad_token_id=0)
    result["hf_tokens"] = hf[0, len(PROMPT):].tolist()
    print(json.dumps(result))
    """)
    assert "vLLM's engine core runs in a thread of the rollout actor" in output
    assert (out["core_threads"], out["alive_after_shutdown"], out["engine_children"]) == (1, False, [])
    assert out["sigterm_handler_kept"] is True
    assert out["log_stats"] is False  # CPU mode turns vLLM's statistics off
    assert out["frozen"] == [0, True]  # the actor's objects left the collector as the thread started
    assert len(out["tokens"]) == 12
    assert out["tokens"] == out["hf_tokens"]


@pytest.mark.slow
def test_an_engine_core_that_fails_at_start_raises_vllms_error_instead_of_hanging(tiny_model_dir):
    out, output = _engine_python(ENGINE_PRELUDE.format(model=str(tiny_model_dir)) + """
    try:
        vllm.AsyncLLMEngine.from_engine_args(engine_args(kv_cache_memory_bytes=1))  # no room for one block
        print(json.dumps({"raised": None}))
    except Exception as error:
        core = [t for t in threading.enumerate() if t.name == "EngineCore"]
        print(json.dumps({"raised": type(error).__name__, "message": str(error), "core_threads_left": len(core)}))
    """, timeout=120)
    assert out["raised"] == "RuntimeError", out
    assert "Engine core initialization failed" in out["message"]
    assert out["core_threads_left"] == 0
    assert "EngineCore failed to start" in output  # vLLM's own log of the root cause
