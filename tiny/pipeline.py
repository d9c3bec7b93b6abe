"""Glue between the tiny model, image folders and the common library's dataset interface."""

from __future__ import annotations

import torch

from common.data import ArrayTrainingSet
from tiny.data import ImageFolder
from tiny.model import TinyTextToImage


def training_set(model: TinyTextToImage, folder: ImageFolder) -> ArrayTrainingSet:
    """Pixels plus text conditions from the model's frozen text encoder (N,captions,L,D)."""
    n_cap = len(folder.captions[0])
    flat = [c for caps in folder.captions for c in caps]
    text = model.encode_text(flat).view(len(folder), n_cap, model.cfg.context_length, model.cfg.text_dim)
    return ArrayTrainingSet(folder.pixels, text, folder.captions, folder.paths)


def set_threads() -> None:
    """Use every core for intra-op parallelism (tiny models are dominated by per-op overhead)."""
    import os

    torch.set_num_threads(max(1, os.cpu_count() or 1))
