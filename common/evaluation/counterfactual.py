"""Counterfactual metrics: how much a model retrained without a set of images lost the query.

- ΔL = L(ẑ, θ_−K) − L(ẑ, θ0) over 200 timesteps (stride 5) with noise keyed by the query, the same
  for both models;
- regeneration from the query's saved initial noise and prompt with the same sampler: MSE against
  the original output, and CLIP image similarity when CLIP weights are available;
- optionally the off-target control (:class:`OffTarget`): the same retrained model's ΔL on other queries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from common.data import Query
from common.diffusion.keyed_losses import LossConfig
from common.diffusion.sampling import resample
from common.errors import AttributionError, require
from common.files import atomic
from common.methods.unlearning import query_losses
from common.model import DiffusionModel


@dataclass
class EvalConfig:
    """The leave-K-out evaluation."""

    ks: tuple[int, ...] = field(default=(500, 1000, 4000), metadata={"help": "images removed (paper: MSCOCO)"})
    loss_stride: int = field(default=5, metadata={"help": "timestep stride of ΔL (paper: 5, i.e. 200 timesteps)"})
    seed: int = field(default=0, metadata={"help": "seed of the ΔL noise"})
    random_seeds: int = field(default=3, metadata={"help": "random removal sets per K"})
    clip_model: str = field(default="ViT-B-32", metadata={"help": "open_clip architecture for CLIP similarity"})
    clip_weights: str = field(default="", metadata={"help": "open_clip pretrained tag or local path; empty: no CLIP"})
    off_target: int = field(
        default=0,
        metadata={
            "help": "off-target control: each retrained model's ΔL also on this many other queries (the next ones in "
            "order), their mean in the table; a removal that hurts the model in general shows there. 0: off"
        },
    )

    def __post_init__(self) -> None:
        self.ks = tuple(int(k) for k in self.ks)
        if not self.ks or min(self.ks) < 1:
            raise AttributionError("ks must be positive integers")
        if self.loss_stride < 1:
            raise AttributionError(f"loss_stride must be positive, got {self.loss_stride}")
        if self.off_target < 0:
            raise AttributionError(f"off_target must be 0 (off) or a number of other queries, got {self.off_target}")


def query_loss(model: DiffusionModel, query: Query, stride: int, seed: int) -> float:
    """The query's diffusion loss averaged over timesteps 0, stride, ... with noise keyed by the query."""
    steps = model.num_train_timesteps
    require(steps % stride == 0, f"loss_stride {stride} must divide the model's {steps} diffusion steps")
    cfg = LossConfig(seed=seed, num_timesteps=steps // stride, flips=False, batch_size=1000)
    return float(query_losses(model, query, cfg).mean())


def delta_loss(
    original: DiffusionModel, retrained: DiffusionModel, query: Query, stride: int = 5, seed: int = 0
) -> float:
    """ΔL = L(ẑ, θ_−K) − L(ẑ, θ0), identical noise and timesteps for both."""
    return query_loss(retrained, query, stride, seed) - query_loss(original, query, stride, seed)


class OffTarget:
    """The off-target control: a retrained model's ΔL on queries other than the one whose top-K it lacks.

    A removal that hurts the model in general (images every query leans on, or simply many) raises every query's
    loss; one specific to its query raises that query's only. For each query the next ``n`` queries in order
    (wrapping) are measured with ΔL's noise and timesteps; their mean is ``off_target_delta_loss``. The original
    model's loss on each query is computed once.

    Args:
        queries: every query of the run, in a fixed order.
        n: other queries per removal set (0: the control is off and adds nothing to a record).
        stride, seed: ΔL's timestep stride and noise seed.
    """

    def __init__(self, queries: Sequence[Query], n: int, stride: int = 5, seed: int = 0) -> None:
        require(n < len(queries) or n == 0, f"off_target {n} exceeds the number of other queries ({len(queries) - 1})")
        self.queries, self.n, self.stride, self.seed = list(queries), n, stride, seed
        self._original: dict[tuple[int, str], float] = {}

    @property
    def expect(self) -> dict | None:
        """What a reusable metric record must hold (``leave_k_out``'s ``expect``): None when the control is off."""
        return {"off_target": self.n} if self.n else None

    def others(self, query: Query) -> list[Query]:
        """The ``n`` queries after ``query`` in order, wrapping around."""
        i = [q.id for q in self.queries].index(query.id)
        return [self.queries[(i + j) % len(self.queries)] for j in range(1, self.n + 1)]

    def __call__(self, original: DiffusionModel, retrained: DiffusionModel, query: Query) -> dict:
        """``{"off_target": n, "off_target_delta_loss": mean ΔL over the others}``; empty when off."""
        if not self.n:
            return {}
        values = []
        for other in self.others(query):
            key = (id(original), other.id)
            if key not in self._original:
                self._original[key] = query_loss(original, other, self.stride, self.seed)
            values.append(query_loss(retrained, other, self.stride, self.seed) - self._original[key])
        return {"off_target": self.n, "off_target_delta_loss": sum(values) / len(values)}


def regenerate(model: DiffusionModel, query: Query) -> torch.Tensor:
    """The query regenerated by ``model`` (C,H,W) from its saved noise and sampler settings (:func:`resample`)."""
    return resample(model, query)


def reference_image(reference: DiffusionModel, query: Query, folder: Path) -> torch.Tensor:
    """The reference model's own regeneration of ``query`` (C,H,W), made once and kept in ``folder``."""
    path = folder / f"{query.id}.npy"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        with atomic(path, ".npy") as tmp:  # processes measuring the same query write the same values
            np.save(tmp, resample(reference, query).float().cpu().numpy())
    return torch.from_numpy(np.load(path))


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

            # OpenAI's weights were trained with QuickGELU; open_clip's plain architecture name would run GELU.
            quick = weights == "openai"
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=weights, force_quick_gelu=quick
            )
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


def counterfactual_metrics(
    original: DiffusionModel,
    retrained: DiffusionModel,
    query: Query,
    cfg: EvalConfig,
    clip: ClipSimilarity,
    target: torch.Tensor | None = None,
    off_target: OffTarget | None = None,
) -> dict:
    """ΔL, and the regenerated image's MSE and CLIP similarity against ``target``.

    Args:
        original: θ0 of ΔL (and the decoder of ``target``).
        target: the model input the regeneration is compared with (C,H,W): by default the query's
            image; the reference model's own regeneration when θ0 is not the model that made the query.
        off_target: the off-target control, whose fields join the record (:class:`OffTarget`).
    """
    from common.data import as_numpy_uint8

    regen = regenerate(retrained, query)
    target = query.image if target is None else target
    query_pixels = original.decode(target[None].to(original.device, original.dtype))[0]
    regen_pixels = retrained.decode(regen[None])[0]
    return {
        "delta_loss": delta_loss(original, retrained, query, cfg.loss_stride, cfg.seed),
        "mse": mse(regen_pixels, query_pixels),
        "clip": clip(as_numpy_uint8(regen_pixels), as_numpy_uint8(query_pixels)),
        "clip_note": clip.reason or None,
    } | (off_target(original, retrained, query) if off_target is not None else {})
