"""Patch 6, vLLM engines (inside PolicyModelActor and PPOTrainer): `ActorPPOTrainer._init_vllm_sync_group`
fails at once, with the engine's own error, when a vLLM engine died while it was being created;
an engine that dies later (killed, out of memory, crashed) fails the run as "vLLM engine N died"
(`wrap_engine_calls` on generation and weight sync, `engine_death` for Ray's own error).
"""
import functools
import re

import torch

from openrlhf_patch.reward_checks import RewardError


ENGINE_POLL_S = 1.0


class EngineStartError(RuntimeError):
    pass


def wrap_init_vllm_sync_group(upstream):
    """The policy actor's rank 0 forms the weight-sync group with every vLLM engine and waits for
    all of them (up to the group's 10-minute timeout). An engine whose creation failed never
    joins, and the run used to sit there, then fail with a store timeout that hid the cause.
    Here the group forms in a thread while this one watches the engines; a dead engine's
    creation error is raised at once."""
    @functools.wraps(upstream)
    def _init_vllm_sync_group(self, *args, **kwargs):
        import threading

        import ray

        engines = list(self.vllm_engines)
        register_engines(engines)  # for naming an engine that dies later (engine_death)
        # __ray_ready__ resolves once an engine is created, or raises its creation error.
        ready = {engine.__ray_ready__.remote(): i for i, engine in enumerate(engines)}
        device = torch.cuda.current_device() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        outcome = {}

        def form_group():
            try:
                if device is not None:  # the current CUDA device is per thread
                    torch.cuda.set_device(device)
                upstream(self, *args, **kwargs)
            except BaseException as e:  # noqa: BLE001 - handed to the calling thread
                outcome["error"] = e

        thread = threading.Thread(target=form_group, name="ngrpo-vllm-sync-group", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(ENGINE_POLL_S)
            done, _ = ray.wait(list(ready), num_returns=len(ready), timeout=0)
            for ref in done:
                try:
                    ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    raise EngineStartError(
                        f"vLLM engine {ready[ref]} of {len(engines)} failed to start (its traceback is in the "
                        f"launch log):\n{_last_exception(str(e))}") from None
                del ready[ref]
        if "error" in outcome:
            raise outcome["error"]

    return _init_vllm_sync_group


def _last_exception(traceback_text: str, max_chars: int = 600) -> str:
    """The last exception of a traceback as text: from its `Type: message` line (at column 0) to
    the end, cut at MAX_CHARS (vLLM's message lists every architecture it knows)."""
    lines = traceback_text.rstrip().splitlines()
    starts = [i for i, line in enumerate(lines) if re.match(r"[\w.]+:", line)]
    text = "\n".join(lines[starts[-1]:] if starts else lines[-1:]).strip()
    return text if len(text) <= max_chars else text[:max_chars] + " ..."


ENGINE_PROBE_S = 10.0  # how long a failed call waits to learn whether an engine is dead


_engine_index = {}     # actor id (hex) -> (index, number of engines): the engines this process has seen


class EngineDiedError(RuntimeError):
    """A vLLM engine actor died during the run; the message is one line, "vLLM engine N died: cause"."""


def _actor_hex(engine):
    actor_id = getattr(engine, "_actor_id", None)
    return actor_id.hex() if actor_id is not None else None


def register_engines(engines) -> None:
    for i, engine in enumerate(engines):
        if _actor_hex(engine):
            _engine_index[_actor_hex(engine)] = (i, len(engines))


def _died_line(index, err) -> str:
    """'vLLM engine N died', with the cause Ray gives (ERR: its RayActorError) on the same line."""
    # ActorDiedError: its base message, tab-indented fields (class_name, actor_id, pid, ...), the cause
    base = getattr(type(err), "BASE_ERROR_MSG", None)
    cause = " ".join(line.strip() for line in str(err).splitlines()
                     if line.strip() and not line.startswith("\t") and line.strip() != base)
    cause = re.sub(r"^The actor is dead because ", "", cause)
    name = "a vLLM engine" if index is None else f"vLLM engine {index}"
    return f"{name} died: {cause}" if cause else f"{name} died"


def engine_death(err):
    """'vLLM engine N died: ...' when ERR, or an exception it was raised from, is Ray's error for a
    dead vLLM engine actor (RolloutRayActor); else None."""
    import ray

    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, ray.exceptions.RayActorError):
            known = _engine_index.get(getattr(err, "actor_id", None))
            if known is not None or "class_name: RolloutRayActor" in str(err):
                return _died_line(known[0] if known else None, err)
        err = getattr(err, "cause", None) or err.__cause__ or err.__context__
    return None


def dead_engine(engines, timeout: float = ENGINE_PROBE_S):
    """'vLLM engine N died: ...' for the first of ENGINES that is dead, else None (Ray answers a dead
    actor's __ray_ready__ with its death; a live engine, an async actor, answers at once)."""
    import ray

    try:
        refs = {engine.__ray_ready__.remote(): i for i, engine in enumerate(engines)}
        done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
    except Exception:  # noqa: BLE001 - Ray itself is going down: nothing to add to the run's error
        return None
    for ref in sorted(done, key=lambda r: refs[r]):
        try:
            ray.get(ref)
        except ray.exceptions.RayActorError as e:
            return _died_line(refs[ref], e)
        except Exception:  # noqa: BLE001
            continue
    return None


def wrap_engine_calls(upstream):
    """UPSTREAM, a method of an object holding `vllm_engines` (the sample generator, the policy's
    weight sync), with a dead engine named: Ray's ActorDiedError from a call to it, or what its
    death caused elsewhere (the weight sync's gloo "Connection closed by peer"), becomes
    EngineDiedError("vLLM engine N died: cause")."""
    @functools.wraps(upstream)
    def with_engines_named(self, *args, **kwargs):
        try:
            return upstream(self, *args, **kwargs)
        except (EngineDiedError, EngineStartError, RewardError):
            raise
        except Exception as err:
            engines = list(getattr(self, "vllm_engines", None) or [])
            register_engines(engines)
            died = engine_death(err) or (dead_engine(engines) if engines else None)
            if died is None:
                raise
            raise EngineDiedError(died) from err

    return with_engines_named
