"""Where dowsing keeps its files. The cache folder and every folder dowsing
makes in it are private to the user (0700): they hold the user's facts,
results and job logs."""
from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def private(path: Path, mode: int) -> None:
    """chmod `path` to `mode` when it is this user's and open to the group or
    others (a fresh checkout's `cache/` is 0755)."""
    try:
        info = os.stat(path)
        if info.st_uid == os.getuid() and stat.S_IMODE(info.st_mode) & 0o077:
            os.chmod(path, mode)
    except OSError:
        pass


def private_dir(path: Path) -> Path:
    """`path`, made 0700 if missing and closed to the group and others if not."""
    path = Path(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    private(path, 0o700)
    return path


def cache_dir() -> Path:
    """The cache folder: $DOWSING_CACHE, else `cache/` at the repo root."""
    return private_dir(Path(os.environ.get("DOWSING_CACHE") or REPO_ROOT / "cache"))

def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, then rename: never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
