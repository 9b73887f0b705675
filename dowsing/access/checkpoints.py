"""A user's training checkpoints of one model, oldest first, as the input of
the trajectory estimators (`dowsing.estimators.trajectory`).

A checkpoint is a local Hugging Face model folder (config.json plus
weights), or a revision of a hub repository written `owner/name@revision`
(fetched into the local Hugging Face cache when the hub is reachable). The
list is checked before anything runs: at least two checkpoints, every
folder readable and holding weights, one architecture (the same model type
and shapes) and one tokenizer (the same vocabulary and special tokens). Any
failure is one `CheckpointError` line naming the checkpoint.

The last checkpoint is the model the analysis or the benchmark runs on.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

# Fields of config.json that fix the parameter shapes, under the names
# different architectures give them; model_type must agree as well.
SHAPE_FIELDS = (
    ("hidden_size", "n_embd", "d_model"),
    ("num_hidden_layers", "n_layer", "num_layers"),
    ("num_attention_heads", "n_head"),
    ("num_key_value_heads",),
    ("intermediate_size", "n_inner"),
    ("vocab_size",),
    ("tie_word_embeddings",),
)
WEIGHT_SUFFIXES = (".safetensors", ".bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


class CheckpointError(ValueError):
    """A checkpoint list that cannot form a trajectory; the message is one line."""


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint as checked: what the user wrote, the folder it
    resolved to, its architecture signature and its tokenizer's fingerprint
    (None when the folder has no tokenizer files: it then uses the last
    checkpoint's)."""

    spec: str
    path: Path
    model_type: str
    shapes: tuple
    tokenizer: str | None

    def describe(self) -> str:
        layers = dict(self.shapes).get("num_hidden_layers")
        return f"{self.model_type}, {layers} layers" if layers is not None else self.model_type


def checkpoint_fields(checkpoints, checkpoint_lr) -> tuple:
    """The configuration fields `checkpoints` (None, or a list of specs) and
    `checkpoint_lr`, checked without touching the disk: the specs as a tuple
    of strings; a list of one cannot form a trajectory and a step size must
    be > 0 (one-line ValueError otherwise)."""
    specs = tuple(str(c) for c in (checkpoints or ()))
    if len(specs) == 1:
        raise ValueError("checkpoints: a trajectory needs at least 2, oldest first (got 1)")
    if checkpoint_lr is not None and not checkpoint_lr > 0:
        raise ValueError(f"checkpoint_lr must be > 0, got {checkpoint_lr!r}")
    return specs


def parse_list(text: str) -> list[str]:
    """The checkpoints of a text box or a file: one per line, blank lines and
    lines starting with # skipped, in order."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def allowed_checkpoints(specs, roots=None) -> tuple:
    """The specs the app and its jobs may read: every local folder resolved
    inside the model roots (`models.model_roots`), hub steps
    owner/name@revision as they are. A folder outside the roots is one
    CheckpointError whose text is the same whether it exists or not."""
    from .models import NOT_ALLOWED, ModelError, allowed_path, is_hub_id

    out = []
    for spec in (str(s).strip() for s in specs):
        repo, at, revision = spec.partition("@")
        if at and repo.count("/") == 1 and is_hub_id(repo) and revision and ".." not in revision \
                and not Path(spec).exists():
            out.append(spec)
            continue
        try:
            out.append(str(allowed_path(spec, roots)))
        except ModelError:
            raise CheckpointError(NOT_ALLOWED) from None
    return tuple(out)


def _resolve(spec: str, position: int) -> Path:
    """The local folder of checkpoint `position` (1-based, for messages)."""
    where = f"checkpoint {position} ({spec})"
    path = Path(spec).expanduser()
    local = spec.startswith((".", "/", "~")) or path.exists() or "@" not in spec
    if local:
        if not path.exists():
            hint = (" (a step of a hub repository is written owner/name@revision)"
                    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")) else "")
            raise CheckpointError(f"{where}: no such folder{hint}")
        if not path.is_dir():
            raise CheckpointError(f"{where}: not a folder (a checkpoint is a Hugging Face model folder)")
        if not os.access(path, os.R_OK | os.X_OK):
            raise CheckpointError(f"{where}: the folder cannot be read (permission denied)")
        return path.resolve()
    repo, _, revision = spec.partition("@")
    if repo.count("/") != 1 or not revision:
        raise CheckpointError(f"{where}: neither a folder nor a hub step written owner/name@revision")
    from .models import _hub_reachable

    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or not _hub_reachable()
    try:
        folder = snapshot_download(repo, revision=revision, local_files_only=offline,
                                   allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
    except Exception as exc:  # noqa: BLE001 - every hub failure is one line for the user
        reason = "not in the local Hugging Face cache and the hub cannot be reached" if offline else (
            str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        raise CheckpointError(f"{where}: {reason}") from None
    return Path(folder)


def _read_config(path: Path, where: str) -> dict:
    file = path / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{where}: no config.json, not a Hugging Face model folder")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{where}: config.json cannot be read ({type(exc).__name__})") from None


def _shapes(config: dict) -> tuple:
    out = []
    for names in SHAPE_FIELDS:
        value = next((config[n] for n in names if n in config), None)
        out.append((names[0], value))
    return tuple(out)


def _has_weights(path: Path) -> bool:
    try:
        return any(name.endswith(WEIGHT_SUFFIXES) for name in os.listdir(path))
    except OSError:
        return False


def tokenizer_fingerprint(path: Path, where: str) -> str | None:
    """sha256 of the tokenizer's vocabulary and special tokens; None when the
    folder has no tokenizer files."""
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - a broken tokenizer is one line for the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{where}: its tokenizer cannot be loaded ({first})") from None
    payload = json.dumps([sorted(tokenizer.get_vocab().items()), sorted(map(str, tokenizer.all_special_tokens))])
    return hashlib.sha256(payload.encode()).hexdigest()


def validate_checkpoints(specs, minimum: int = 2) -> list[Checkpoint]:
    """The checked checkpoints, in order, or a one-line CheckpointError."""
    specs = [str(s).strip() for s in specs if str(s).strip()]
    if len(specs) < minimum:
        got = "none" if not specs else f"only {len(specs)}"
        raise CheckpointError(f"a trajectory needs at least {minimum} checkpoints, oldest first; got {got}")
    out = []
    for position, spec in enumerate(specs, start=1):
        path = _resolve(spec, position)
        where = f"checkpoint {position} ({spec})"
        config = _read_config(path, where)
        if not _has_weights(path):
            raise CheckpointError(f"{where}: holds no weights (*.safetensors or *.bin)")
        out.append(Checkpoint(spec, path, str(config.get("model_type", "unknown")), _shapes(config),
                              tokenizer_fingerprint(path, where)))
    if len({c.path for c in out}) < len(out):
        raise CheckpointError("the same checkpoint is listed twice: a trajectory needs distinct steps")
    first = out[0]
    for position, c in enumerate(out[1:], start=2):
        if c.model_type != first.model_type:
            raise CheckpointError(f"checkpoint {position} ({c.spec}) is a {c.model_type} model, checkpoint 1 a "
                                  f"{first.model_type}: the checkpoints must be one architecture")
        for (name, value), (_, want) in zip(c.shapes, first.shapes):
            if value != want:
                raise CheckpointError(f"checkpoint {position} ({c.spec}) has {name} = {value}, checkpoint 1 has "
                                      f"{want}: the checkpoints must be one architecture")
    known = [c.tokenizer for c in out if c.tokenizer is not None]
    if not known:
        raise CheckpointError("no checkpoint holds a tokenizer (tokenizer.json or tokenizer_config.json)")
    for position, c in enumerate(out, start=1):
        if c.tokenizer is not None and c.tokenizer != known[-1]:
            raise CheckpointError(f"checkpoint {position} ({c.spec}) has a different tokenizer from the last "
                                  "checkpoint's (vocabulary or special tokens differ)")
    return out


def check_last_is_model(checkpoints: list[Checkpoint], model_id: str | None) -> None:
    """The model analysed must be the trajectory's last checkpoint: the
    trajectory estimators describe how that model got where it is."""
    last = checkpoints[-1].path
    try:
        same = model_id is not None and Path(model_id).expanduser().resolve() == last
    except OSError:
        same = False
    if not same:
        shown = model_id or "the embedded default"
        raise CheckpointError(f"the model analysed ({shown}) must be the last checkpoint ({checkpoints[-1].spec})")


def summary(checkpoints: list[Checkpoint]) -> str:
    """'3 checkpoints of one llama, 2 layers model' for the app and the CLI."""
    return f"{len(checkpoints)} checkpoints of one {checkpoints[-1].describe()} model, oldest first"
