"""Which curvature preconditions the unlearning step: one name per approximation, loaded or fitted once.

- ``diagonal``: the paper's diagonal Fisher (:mod:`common.unlearning.fisher`), or a released file;
- ``ekfac``: EK-FAC factors of the selected Linear modules (:mod:`common.unlearning.ekfac`; FastGDA's AbU+), or a
  released factor folder in kronfluence's layout;
- ``block``: the exact empirical Fisher of each selected tensor (:mod:`common.unlearning.block`), the oracle,
  or a block Fisher file made for another model of the same weights (a base model's, for its customized ones).

Each is fitted from the same keyed draws, cached under the method's cache folder with everything that made it,
and refused when it was made from another model, training set or settings.
"""

from __future__ import annotations

from pathlib import Path

import torch

from common.data import ArrayTrainingSet
from common.errors import require
from common.fingerprints import fingerprint_tensors
from common.model import DiffusionModel
from common.unlearning.block import BlockFisher, cached_block, read_block
from common.unlearning.ekfac import EkfacFactors, cached_ekfac, read_factor_folder
from common.unlearning.fisher import FisherConfig, cached_fisher, import_fisher, newton_direction

PRECONDITIONERS = ("diagonal", "ekfac", "block")
Curvature = dict[str, torch.Tensor] | EkfacFactors | BlockFisher

# Where each kind is cached under a method's cache folder.
CACHE_NAMES = {"diagonal": "fisher.safetensors", "ekfac": "ekfac", "block": "block_fisher.safetensors"}


def load_curvature(
    kind: str,
    model: DiffusionModel,
    data: ArrayTrainingSet,
    cfg: FisherConfig,
    cache_dir: str | Path | None,
    progress: bool = True,
    accelerator=None,
) -> Curvature:
    """The curvature ``kind`` of ``cfg.selection``: imported from ``cfg.file``, read from the cache, or fitted.

    With several processes every one must call it: they fit it together, each taking its share of the batches.
    """
    require(kind in PRECONDITIONERS, f"unknown preconditioner {kind!r}; choose from {', '.join(PRECONDITIONERS)}")
    path = Path(cache_dir) / CACHE_NAMES[kind] if cache_dir is not None else None
    if kind == "diagonal":
        if cfg.file:
            return import_fisher(cfg.file, model, cfg.selection)
        return cached_fisher(model, data, cfg, path, progress, accelerator)
    if kind == "ekfac":
        if cfg.file:
            return read_factor_folder(cfg.file, model, cfg.selection)
        return cached_ekfac(model, data, cfg, path, progress, accelerator)
    if cfg.file:
        return read_block(cfg.file, model, cfg.selection)
    return cached_block(model, data, cfg, path, progress, accelerator)


def curvature_fingerprint(curvature: Curvature | None, names: list[str]) -> str:
    """Identifies the curvature of the named weights ('' for none), for the unlearned weights' cache."""
    if curvature is None:
        return ""
    if isinstance(curvature, dict):
        return fingerprint_tensors(*(curvature[n] for n in names))
    return curvature.fingerprint()


def precondition(grads: dict[str, torch.Tensor], curvature: Curvature, damping: float) -> dict[str, torch.Tensor]:
    """The curvature's damped inverse applied to ``grads`` (name -> gradient shaped like the weight)."""
    if isinstance(curvature, dict):
        return newton_direction(grads, curvature, damping)
    return curvature.direction(grads, damping)
