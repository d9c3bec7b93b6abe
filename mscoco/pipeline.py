"""The MSCOCO load sequence, written once: release folder -> model -> training set -> ready for gradients."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.config import resolve_device
from common.data import Query
from common.errors import require
from common.queries import load_queries
from mscoco import release
from mscoco.model import DEFAULT_COMPONENTS, MscocoModel, load_unet


@dataclass
class MscocoRun:
    model: MscocoModel
    data: release.MemmapTrainingSet


def load_model(data_dir: str | Path, unet: str | Path | None = None, components=DEFAULT_COMPONENTS, device="auto"):
    """The released UNet (``DATA/model.bin`` unless ``unet`` names another), ready for gradients on ``device``."""
    model = MscocoModel(load_unet(unet or Path(data_dir) / release.MODEL), components)
    return model.prepare_for_gradients(resolve_device(device) if isinstance(device, str) else device)


def load_run(data_dir: str | Path, unet: str | Path | None = None, components=DEFAULT_COMPONENTS, device="auto"):
    """The model (:func:`load_model`) and the released training set, memory-mapped."""
    data = release.load_training_set(data_dir)
    return MscocoRun(load_model(data_dir, unet, components, device), data)


def parse_ids(spec: str) -> list[int]:
    """``0-9,15,20-22`` -> [0, ..., 9, 15, 20, 21, 22]."""
    ids: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        require(lo.strip().isdigit() and (not hi or hi.strip().isdigit()), f"bad query range {part!r} (e.g. 0-9,15)")
        require(int(hi or lo) >= int(lo), f"query range {part!r} is empty: write the lower end first (e.g. 0-2)")
        ids += list(range(int(lo), int(hi or lo) + 1))
    return ids


def load_query_spec(spec: str, data_dir: str | Path) -> list[Query]:
    """``release`` (all 110), ``release:0-9,15`` (some of them) or a folder of query folders (the generate stage)."""
    if spec == "release" or spec.startswith("release:"):
        _, _, ids = spec.partition(":")
        return release.load_release_queries(data_dir, parse_ids(ids) if ids else None)
    return load_queries(spec)
