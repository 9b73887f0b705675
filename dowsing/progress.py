"""Progress of a long run, as every layer reports it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass
class Progress:
    stage: str
    fraction: float  # of the whole run, in [0, 1]
    message: str


ProgressFn = Callable[[Progress], None]
