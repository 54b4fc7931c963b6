"""Import stub for CPU runs, where flash-attn cannot be built.

OpenRLHF 0.11.2 imports a few flash_attn helpers at module level (for sample packing and ring
attention, which CPU mode never uses). This stub lets those imports succeed; calling any of them
raises. It sits on sys.path only when the real flash_attn is missing, and has no dist-info, so
transformers still reports flash-attention as unavailable.
"""
__version__ = "0.0.0+ngrpo.cpu.stub"


def _unavailable(name):
    def fn(*args, **kwargs):
        raise RuntimeError(f"flash_attn.{name} is not available on CPU (ngrpo import stub); "
                           "sample packing and ring attention need the real flash-attn on CUDA")

    fn.__name__ = name
    return fn
