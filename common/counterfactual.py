"""Counterfactual metrics: how much a model retrained without a set of images lost the query.

- ΔL = L(ẑ, θ_−K) − L(ẑ, θ0) over 200 timesteps (stride 5) with noise keyed by the query, the same
  for both models;
- regeneration from the query's saved initial noise and prompt with the same sampler: MSE against
  the original output, and CLIP image similarity when CLIP weights are available.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from common.attribute import query_losses
from common.data import Query
from common.errors import AttributionError
from common.losses import LossConfig


@dataclass
class EvalConfig:
    """The leave-K-out evaluation."""

    ks: tuple[int, ...] = field(default=(500, 1000, 4000), metadata={"help": "images removed (paper: MSCOCO)"})
    loss_stride: int = field(default=5, metadata={"help": "timestep stride of ΔL (paper: 5, i.e. 200 timesteps)"})
    seed: int = field(default=0, metadata={"help": "seed of the ΔL noise"})
    random_seeds: int = field(default=3, metadata={"help": "random removal sets per K"})
    clip_model: str = field(default="ViT-B-32", metadata={"help": "open_clip architecture for CLIP similarity"})
    clip_weights: str = field(default="", metadata={"help": "open_clip pretrained tag or local path; empty: no CLIP"})

    def __post_init__(self) -> None:
        self.ks = tuple(int(k) for k in self.ks)
        if not self.ks or min(self.ks) < 1:
            raise AttributionError("ks must be positive integers")
        if self.loss_stride < 1 or 1000 % self.loss_stride:
            raise AttributionError(f"loss_stride must divide 1000, got {self.loss_stride}")


def query_loss(model: torch.nn.Module, query: Query, alphas_cumprod: torch.Tensor, stride: int, seed: int) -> float:
    """The query's diffusion loss averaged over timesteps 0, stride, ... with noise keyed by the query."""
    cfg = LossConfig(
        seed=seed,
        num_timesteps=len(alphas_cumprod) // stride,
        num_train_timesteps=len(alphas_cumprod),
        flips=False,
        batch_size=1000,
    )
    return float(query_losses(model, query, cfg, alphas_cumprod).mean())


def delta_loss(
    original: torch.nn.Module,
    retrained: torch.nn.Module,
    query: Query,
    alphas_cumprod: torch.Tensor,
    stride: int = 5,
    seed: int = 0,
) -> float:
    """ΔL = L(ẑ, θ_−K) − L(ẑ, θ0), identical noise and timesteps for both."""
    return query_loss(retrained, query, alphas_cumprod, stride, seed) - query_loss(
        original, query, alphas_cumprod, stride, seed
    )


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean squared error between two images in the same value range."""
    if a.shape != b.shape:
        raise AttributionError(f"images differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float((a.double() - b.double()).pow(2).mean())


class ClipSimilarity:
    """CLIP image-embedding cosine similarity (open_clip), only from real pretrained weights.

    Args:
        model_name: open_clip architecture, e.g. ``ViT-B-32``.
        weights: an open_clip pretrained tag (e.g. ``openai``, fetched from the hub) or a local
            checkpoint path. Loading failures make :attr:`available` false with the reason in
            :attr:`reason`; similarity is then never computed (a random network would be meaningless).
    """

    def __init__(self, model_name: str = "ViT-B-32", weights: str = "") -> None:
        self.model = None
        self.reason = "no CLIP weights configured"
        if not weights:
            return
        try:
            import open_clip

            model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=weights)
            self.model, self.preprocess = model.eval(), preprocess
            self.reason = ""
        except Exception as err:  # noqa: BLE001 - any load failure means "not available", reported once
            self.reason = f"CLIP weights {weights!r} unavailable: {err.__class__.__name__}"

    @property
    def available(self) -> bool:
        return self.model is not None

    @torch.no_grad()
    def __call__(self, a: np.ndarray, b: np.ndarray) -> float | None:
        """Cosine similarity of two uint8 (H,W,3) images, or None without weights."""
        if self.model is None:
            return None
        from PIL import Image

        batch = torch.stack([self.preprocess(Image.fromarray(x)) for x in (a, b)])
        emb = torch.nn.functional.normalize(self.model.encode_image(batch).float(), dim=-1)
        return float(emb[0] @ emb[1])
