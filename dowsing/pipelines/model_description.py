"""What an analysis asks of its model besides running it: where its pieces
sit (`subspace.Anatomy`), how many blocks it has, which block's inputs the
forward pass keeps, and who it is (for the result and the units' keys).
Read once from the loaded model and handed down, so no step inspects the
model again for one of these."""
from __future__ import annotations

from dataclasses import dataclass

from ..access.models import LoadedModel, ModelInfo
from ..config import AnalysisConfig
from ..kernels.subspace import Anatomy, find_anatomy
from ..storage.units import loaded_identity
from .ranking import capture_block_of


@dataclass(frozen=True)
class ModelDescription:
    """info: what was loaded (its fingerprint among it); identity: the
    units' model identity (`units.loaded_identity`); depth: the number of
    transformer blocks; capture_block: the block whose inputs the forward
    pass keeps (`ranking.capture_block_of`), None for none."""

    info: ModelInfo
    identity: str
    anatomy: Anatomy
    depth: int
    capture_block: int | None


def describe_model(loaded: LoadedModel, config: AnalysisConfig) -> ModelDescription:
    """The description of `loaded` for an analysis under `config`; ModelError
    for an architecture dowsing cannot read."""
    anatomy = find_anatomy(loaded.model)
    depth = len(anatomy.down_projs)
    return ModelDescription(loaded.info, loaded_identity(loaded.info), anatomy, depth,
                            capture_block_of(depth, config))
