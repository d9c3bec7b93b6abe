"""Distilled attribution: a small network trained to reproduce a teacher's rankings (FastGDA's design).

A query costs one feature pass of its image and prompt (:mod:`common.distillation.features`) and one matrix product
with the training images' stored embeddings (float16, memory-mapped, computed once per model and distilled model).
The network comes from the distill stage (``python -m common.driver BENCHMARK distill``, :mod:`common.distillation`);
it is refused for another model or training set than the one it was distilled on, and for a teacher other than
``--distilled.teacher`` when that is given.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from common.cache import cached_array
from common.config import no_effect
from common.data import Query
from common.distillation.features import FeatureConfig, ModelFeatures
from common.distillation.net import describe, load_net
from common.errors import require
from common.methods.base import Method
from common.methods.registry import register


@dataclass
class DistilledConfig:
    """A distilled model (made by the distill stage)."""

    file: str = field(default="", metadata={"help": "the distilled model folder (the distill stage's --out)"})
    teacher: str = field(default="", metadata={"help": "refuse a distilled model whose teacher is another method"})
    batch_size: int = no_effect(256, "training images embedded per batch (does not change results)")

    def __post_init__(self) -> None:
        require(self.batch_size >= 1, f"batch_size must be positive, got {self.batch_size}")


def index_scores(index: np.ndarray, query: np.ndarray, scale: float, bias: float) -> np.ndarray:
    """``scale`` x (index rows . query) + ``bias``: scores (N, F) float32 of stored unit embeddings (N, F, d) against
    one query embedding (d,).

    One matrix product in the index's own dtype, straight from the memory map (no copy): on a 2-core CPU 7 ms at
    N = 118,287 x 2 orientations x d = 128 in float16, against 57 ms converting blocks to float32 first
    (``python -m common.distillation.latency``). Float16 products carry about 1e-4 absolute error on unit vectors.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a read-only memory map: read here, never written
        rows = torch.from_numpy(index)
    q = torch.from_numpy(np.asarray(query, dtype=np.float32)).to(rows.dtype)
    scores = (rows.reshape(-1, rows.shape[-1]) @ q).float().view(rows.shape[:2]).numpy()
    return scale * scores + bias


@register
class Distilled(Method):
    """Scores from a distilled network: learned scale x cosine of embeddings + bias."""

    name = "distilled"
    Config = DistilledConfig

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        require(bool(self.cfg.file), "the distilled method needs --distilled.file FOLDER (made by the distill stage)")
        self.net, self.info = load_net(self.cfg.file)
        made = self.info["identity"]
        require(made["data"] == self.data.fingerprint, f"{self.cfg.file} was distilled on another training set")
        require(made["model"] == self.model.fingerprint(), f"{self.cfg.file} was distilled from another model")
        teacher = made["teacher"]["method"]
        require(not self.cfg.teacher or teacher == self.cfg.teacher,
                f"{self.cfg.file} was distilled from {teacher}, not {self.cfg.teacher}")  # fmt: skip
        self.features = ModelFeatures(self.model, FeatureConfig(**made["features"]))
        dim, wanted = self.features.dim, self.net.in_dim
        require(dim == wanted, f"the model gives features of dimension {dim}, {self.cfg.file} reads {wanted}")
        self.index: np.ndarray | None = None

    def identity(self) -> dict:
        return super().identity() | {"distilled": self.info["fingerprint"]}

    @torch.no_grad()
    def _rows(self, start: int, stop: int) -> np.ndarray:
        rows = torch.from_numpy(self.features.training_rows(self.data, start, stop, self.flip_states()))
        return self.net.embed(rows.flatten(0, 1)).view(*rows.shape[:2], -1).numpy().astype(np.float16)

    def prepare(self) -> None:
        if self.index is not None:
            return
        shape = (len(self.data), len(self.flip_states()), self.net.mlp[-1].out_features)
        if self.cache_dir is None:
            self.index = np.concatenate([self._rows(a, min(a + self.cfg.batch_size, len(self.data)))
                                         for a in range(0, len(self.data), self.cfg.batch_size)])  # fmt: skip
            return
        self.index = cached_array(self.cache_dir / "index.npy", self.artifact_identity(), shape, np.float16,
                                  self._rows, self.cfg.batch_size, "distilled index")  # fmt: skip
        print(f"{self.name}: {describe(self.info)}")

    @torch.no_grad()
    def score_flips(self, query: Query) -> tuple[np.ndarray, dict]:
        self.prepare()
        t0 = time.time()
        q = self.net.embed(self.features.query(query))[0].numpy()
        t1 = time.time()
        scores = index_scores(self.index, q, float(self.net.scale), float(self.net.bias))
        t2 = time.time()
        stats = {"seconds_query": round(t2 - t0, 4), "seconds_features": round(t1 - t0, 4),
                 "seconds_index": round(t2 - t1, 4)}  # fmt: skip
        return scores.astype(np.float64), stats
