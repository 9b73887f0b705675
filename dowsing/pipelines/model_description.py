"""The model an analysis runs on: loaded when given an id, checked against
the configuration, and described once. The description holds what the
analysis asks of its model besides running it: where its pieces sit
(`subspace.Anatomy`), how many blocks it has, which block's inputs the
forward pass keeps, and who it is (for the result and the units' keys).
Every later step reads it instead of inspecting the model again."""
from __future__ import annotations

import time
from dataclasses import dataclass

from ..access.models import LoadedModel, ModelInfo, load_model
from ..config import AnalysisConfig
from ..kernels.subspace import Anatomy, find_anatomy
from ..progress import Progress
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


def prepared_model(model, config: AnalysisConfig, report, timings: dict) -> tuple:
    """(LoadedModel, its ModelDescription, checked checkpoints or None):
    loads the model when given an id, refuses one loaded with other
    settings, checks the user's checkpoints (the last must be the model),
    and refuses an architecture dowsing cannot read or one with fewer
    blocks than config.blocks."""
    if not isinstance(model, LoadedModel):
        report(Progress("loading model", 0.0, "loading model"))
        t0 = time.perf_counter()
        model = load_model(model, config.device, config.dtype)
        timings["load_model"] = time.perf_counter() - t0
    if model.info.dtype != config.dtype or model.info.device != config.device:
        raise ValueError(
            f"The model is loaded as {model.info.dtype} on {model.info.device} but the configuration asks for "
            f"{config.dtype} on {config.device}: load it with those settings."
        )
    checkpoints = None
    if config.checkpoints:
        from ..access.checkpoints import check_last_is_model, validate_checkpoints

        checkpoints = validate_checkpoints(config.checkpoints)
        check_last_is_model(checkpoints, model.info.id)
    anatomy = find_anatomy(model.model)
    depth = len(anatomy.down_projs)
    if config.blocks > depth:
        raise ValueError(f"blocks = {config.blocks} but the model has only {depth} blocks.")
    described = ModelDescription(model.info, loaded_identity(model.info), anatomy, depth,
                                 capture_block_of(depth, config))
    return model, described, checkpoints
