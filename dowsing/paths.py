"""Where dowsing keeps its files."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    """The cache folder: $DOWSING_CACHE, else `cache/` at the repo root."""
    path = Path(os.environ.get("DOWSING_CACHE") or REPO_ROOT / "cache")
    path.mkdir(parents=True, exist_ok=True)
    return path
