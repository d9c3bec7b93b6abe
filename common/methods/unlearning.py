"""Attribution by unlearning (the paper's method) and its Table 2 ablations.

Unlearn the query (:mod:`common.unlearning.unlearn`: a Fisher-preconditioned Newton step, or SGD,
on a selection of weights), measure every training image's loss under the unlearned weights with
the same keyed noise as the cached pretrained losses, and score by the loss increase
τ_i = L(z_i, θ_unlearned) − L(z_i, θ0), averaged over the scoring timesteps and captions, per orientation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from common import keyed_random
from common.cache import cached_tensors
from common.data import Query
from common.diffusion.losses import LossConfig, dataset_losses
from common.errors import require
from common.methods import register
from common.methods.base import Method
from common.model import DiffusionModel
from common.unlearning.fisher import FisherConfig, cached_fisher, import_fisher
from common.unlearning.unlearn import UnlearnConfig, unlearn


@dataclass
class UnlearningConfig:
    """Fisher, scoring loss and unlearning update (each a stage of flags: --fisher.*, --loss.*, --unlearn.*)."""

    fisher: FisherConfig = field(default_factory=FisherConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    unlearn: UnlearnConfig = field(default_factory=UnlearnConfig)

    def __post_init__(self) -> None:
        for name, cls in (("fisher", FisherConfig), ("loss", LossConfig), ("unlearn", UnlearnConfig)):
            if isinstance(getattr(self, name), dict):
                setattr(self, name, cls(**getattr(self, name)))
        require(
            self.unlearn.method != "newton" or self.fisher.selection == self.unlearn.selection,
            f"fisher.selection ({self.fisher.selection}) must equal unlearn.selection ({self.unlearn.selection}): "
            "the Fisher preconditions exactly the updated weights",
        )


def loss_deviation(base: torch.Tensor, unlearned: torch.Tensor) -> np.ndarray:
    """Per-orientation scores (N,F) from per-timestep losses (N,F,T): the timestep-mean increase."""
    require(base.shape == unlearned.shape, f"loss shapes differ: {tuple(base.shape)} vs {tuple(unlearned.shape)}")
    return (unlearned.mean(-1) - base.mean(-1)).numpy()


def query_losses(model: DiffusionModel, query: Query, cfg: LossConfig) -> torch.Tensor:
    """The query's own per-timestep losses (1,1,T) on the scoring timesteps, keyed by its id."""
    return dataset_losses(
        model, query.as_training_set(), cfg, sample_ids=[query.key], purpose=keyed_random.EVAL, flips=False
    )


def cached_base_losses(model: DiffusionModel, data, cfg: LossConfig, path) -> torch.Tensor:
    """The pretrained model's losses (N,F,T), computed once and cached at ``path`` (None: not cached)."""
    identity = {
        "model": model.fingerprint(),
        "data": data.fingerprint,
        "flips": bool(cfg.flips and model.flips),
        "settings": cfg.identity_dict(),
    }
    compute = lambda: {"losses": dataset_losses(model, data, cfg, progress="pretrained losses")}  # noqa: E731
    return cached_tensors(path, identity, compute, "loss cache")["losses"]


@register
class Unlearning(Method):
    """Rank training images by how much their loss rises when the query is unlearned."""

    name = "unlearning"
    Config = UnlearningConfig

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.flips = self.flips and self.cfg.loss.flips
        self.fisher: dict[str, torch.Tensor] | None = None
        self.base: torch.Tensor | None = None
        self.last_deltas: np.ndarray | None = None  # (N,F,T) float32 of the latest query, for analyses

    def identity(self) -> dict:
        settings = super().identity()
        if self.cfg.unlearn.method == "sgd":
            settings.pop("fisher")  # SGD needs no Fisher
        return settings

    def prepare(self) -> None:
        if self.cfg.unlearn.method == "newton" and self.fisher is None:
            if self.cfg.fisher.file:
                self.fisher = import_fisher(self.cfg.fisher.file, self.model, self.cfg.fisher.selection)
            else:
                self.fisher = cached_fisher(
                    self.model, self.data, self.cfg.fisher, self.cache_path("fisher.safetensors")
                )
        if self.base is None:
            self.base = cached_base_losses(
                self.model, self.data, self.cfg.loss, self.cache_path("base_losses.safetensors")
            )

    def score_flips(self, query: Query) -> tuple[np.ndarray, dict]:
        self.prepare()
        t0 = time.time()
        result = unlearn(self.model, query, self.cfg.unlearn, self.fisher, num_train=len(self.data))
        t1 = time.time()
        after = dataset_losses(result.model, self.data, self.cfg.loss, progress=f"score {query.id}")
        t2 = time.time()
        scores = loss_deviation(self.base, after)
        self.last_deltas = (after - self.base).float().numpy()
        q_before = float(query_losses(self.model, query, self.cfg.loss).mean())
        q_after = float(query_losses(result.model, query, self.cfg.loss).mean())
        stats = {
            "relative_update": result.relative_update,
            "max_tensor_relative_update": result.max_tensor_relative_update,
            "query_loss_before": q_before,
            "query_loss_after": q_after,
            "query_loss_rise": q_after - q_before,
            "median_train_loss_rise": float(np.median(self.last_deltas.mean((1, 2)))),
            "seconds_unlearn": round(t1 - t0, 2),
            "seconds_score": round(t2 - t1, 2),
        }
        return scores, stats
