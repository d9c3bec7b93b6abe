"""Pixel similarity (the paper's simplest baseline): cosine similarity of the images' pixels.

Training images are decoded to viewable pixels by the model (identity in pixel space, the VAE for
latent models), flattened and normalised once, and cached memory-mapped; a query is a dot product.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from common.cache import cached_array
from common.config import no_effect
from common.data import Query
from common.errors import require
from common.methods.base import Method
from common.methods.registry import register

DTYPES = {"float32": np.float32, "float16": np.float16}


@dataclass
class PixelConfig:
    """Pixel similarity."""

    batch_size: int = no_effect(256, "images decoded per batch (does not change results)")
    dtype: str = field(
        default="float32", metadata={"help": "stored precision of the cached pixels: float32 or float16"}
    )

    def __post_init__(self) -> None:
        require(self.batch_size >= 1, f"batch_size must be positive, got {self.batch_size}")
        require(self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Flattened rows (B, D) scaled to unit length (float64)."""
    x = x.double().flatten(1)
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


@register
class Pixel(Method):
    """Cosine similarity between the query's pixels and each training image's (and its flip's)."""

    name = "pixel"
    Config = PixelConfig
    uses_noise = False

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pixels: np.ndarray | None = None  # (N, F, D) unit rows

    @torch.no_grad()
    def _rows(self, start: int, stop: int) -> np.ndarray:
        idx = torch.arange(start, stop)
        cols = [unit_rows(self.model.decode(self.data.images(idx, f).to(self.model.dtype))) for f in self.flip_states()]
        return torch.stack(cols, 1).numpy()

    def prepare(self) -> None:
        if self.pixels is not None:
            return
        dim = self._rows(0, 1).shape[-1]
        shape = (len(self.data), len(self.flip_states()), dim)
        path = self.cache_path("pixels.npy")
        dtype = DTYPES[self.cfg.dtype]
        if path is None:
            self.pixels = self._rows(0, len(self.data)).astype(dtype)
        else:
            identity = self.artifact_identity()
            self.pixels = cached_array(path, identity, shape, dtype, self._rows, self.cfg.batch_size, "pixels")

    def score_flips(self, query: Query) -> tuple[np.ndarray, dict]:
        self.prepare()
        with torch.no_grad():
            q = unit_rows(self.model.decode(query.image[None].to(self.model.dtype)))[0].numpy()
        out = np.empty(self.pixels.shape[:2])
        for start in range(0, len(out), 4096):  # chunked: the cache may be larger than memory
            out[start : start + 4096] = self.pixels[start : start + 4096].astype(np.float64) @ q
        return out, {}
