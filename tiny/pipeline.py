"""Glue between the tiny model, image folders and the library: the load sequence, written once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.config import resolve_device
from common.data import ArrayTrainingSet
from common.errors import require
from common.model import read_model_json
from tiny import shapes
from tiny.data import ImageFolder, load_image_folder
from tiny.model import TinyTextToImage


def training_set(model: TinyTextToImage, folder: ImageFolder) -> ArrayTrainingSet:
    """Pixels plus text conditions from the model's frozen text encoder (N,captions,L,D)."""
    n_cap = len(folder.captions[0])
    flat = [c for caps in folder.captions for c in caps]
    text = model.encode_text(flat).view(len(folder), n_cap, model.cfg.context_length, model.cfg.text_dim)
    return ArrayTrainingSet(folder.pixels, text, folder.captions, folder.paths)


def set_threads() -> None:
    """Use every core for intra-op parallelism (tiny models are dominated by per-op overhead), or OMP_NUM_THREADS
    when set (processes side by side: one thread each)."""
    import os

    wanted = os.environ.get("OMP_NUM_THREADS", "")
    torch.set_num_threads(int(wanted) if wanted.isdigit() and int(wanted) > 0 else max(1, os.cpu_count() or 1))


@dataclass
class TinyRun:
    """A loaded tiny model, its training images and the training set the library scores."""

    model: TinyTextToImage
    folder: ImageFolder
    data: ArrayTrainingSet


def load_model(path: str | Path, device: str = "auto") -> TinyTextToImage:
    """A saved tiny model, ready for per-sample gradients on ``device``."""
    model = TinyTextToImage.load(path)
    model.prepare_for_gradients(resolve_device(device))
    return model


def load_run(model_dir: str | Path, data_dir: str | Path, device: str = "auto") -> TinyRun:
    """Model → training images → text conditions → ready for gradients: what every tiny script starts with."""
    set_threads()
    model = TinyTextToImage.load(model_dir)
    folder = load_image_folder(data_dir, model.cfg.resolution)
    data = training_set(model, folder)
    model.prepare_for_gradients(resolve_device(device))
    return TinyRun(model, folder, data)


def shape_prompts(num: int, seed: int) -> list[tuple[str, dict]]:
    """Seeded captions from the shapes grammar, with their attributes."""
    rng = np.random.default_rng(seed + 10_000)
    out = []
    for _ in range(num):
        spec = shapes.sample_spec(rng)
        out.append((spec.caption(), spec.attributes()))
    return out


def check_trained_on(model_dir: str | Path, data: ArrayTrainingSet, data_dir: str | Path) -> None:
    """Refuse a training set other than the one the model records having been trained on (``model.json``): its
    ranking would be of images the model never saw. A model without the record is taken as it is."""
    recorded = read_model_json(Path(model_dir) / "model.json").get("recipe", {}).get("data")
    require(
        recorded in (None, data.fingerprint),
        f"{data_dir} is not the training set {model_dir} was trained on (its model.json records another); pass "
        "--other-data to rank it anyway",
    )
