"""AbC-tuned features: the linear mappers released with the AbC benchmark on top of CLIP or DINO features.

The AbC benchmark (Wang et al., ICCV 2023; GitHub PeterWang512/GenDataAttribution) tunes a pair of
linear layers on frozen features so that synthesized images retrieve their exemplars. Its release
(``weights/download_weights.sh`` -> ``weights/mapper/{clip,dino}_tuned.pth``) holds, per backbone,
a ``torch.save``'d dict read by its ``eval.py``:

    {"real_mapper":  {"weight": (D, D), "bias": (D,)},   # nn.Linear(D, D) for training (real) images
     "synth_mapper": {"weight": (D, D), "bias": (D,)}}   # nn.Linear(D, D) for the synthesized query

with D = 512 for ``clip`` (OpenAI CLIP ViT-B/32 ``encode_image``) and 768 for ``dino`` (DINO
ViT-B/16 CLS token), both initialised to the identity (``networks.LinearProbe``). Features are the
raw (unnormalised) backbone outputs with the backbone's own transform (CLIP: 224 resize + crop,
OpenAI mean/std; DINO: 256 resize, 224 crop, ImageNet mean/std); the score is the cosine of
``real_mapper(training feature)`` and ``synth_mapper(query feature)``. Only this linear layout is
accepted (the release's channel-wise and MLP mappers are ablations); the file is read with
``torch.load(weights_only=True)``, so no pickled code runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.config import no_effect
from common.errors import AttributionError, first_line, require, require_file
from common.fingerprints import fingerprint_tensors
from common.methods.clip_image import clip_image_encoder, load_open_clip
from common.methods.dino import dino_encoder
from common.methods.features import Encoder, FeatureMethod
from common.methods.registry import register

# backbone -> (default weights, feature size D the mapper must have)
BACKBONES = {"clip": ("openai", 512), "dino": ("facebook/dino-vitb16", 768)}
MAPPERS = ("real_mapper", "synth_mapper")


@dataclass
class AbcConfig:
    """AbC-tuned feature similarity (a released linear mapper over CLIP or DINO features)."""

    mapper: str = field(
        default="",
        metadata={"help": "AbC release's mapper file for the backbone (weights/mapper/<backbone>_tuned.pth)"},
    )
    backbone: str = field(default="dino", metadata={"help": "features the mapper was tuned on: clip or dino"})
    weights: str = field(
        default="",
        metadata={"help": "backbone weights (empty: facebook/dino-vitb16 for dino, open_clip tag openai for clip)"},
    )
    batch_size: int = no_effect(64, "images embedded per batch (does not change results)")

    def __post_init__(self) -> None:
        require(self.backbone in BACKBONES, f"backbone must be one of {', '.join(BACKBONES)}, got {self.backbone!r}")
        require(self.batch_size >= 1, f"batch_size must be positive, got {self.batch_size}")


def describe(state: object) -> str:
    """A short account of what a loaded file holds (for the refusal message)."""
    if not isinstance(state, dict):
        return type(state).__name__
    parts = []
    for key, value in list(state.items())[:4]:
        if isinstance(value, dict):
            inner = ", ".join(f"{k} {tuple(v.shape)}" for k, v in value.items() if isinstance(v, torch.Tensor))
            parts.append(f"{key}: {{{inner or type(value).__name__}}}")
        else:
            parts.append(f"{key}: {tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}")
    return "; ".join(parts) + ("; ..." if len(state) > 4 else "")


def load_abc_mapper(path: str | Path, dim: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The released mapper pair {"real_mapper": (W, b), "synth_mapper": (W, b)}, W (D, D), b (D,) float32.

    Raises:
        AttributionError: the file is missing, unreadable without running pickled code, or of another layout.
    """
    require_file(path, "AbC mapper file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - unsafe pickles and damaged files raise several types
        raise AttributionError(f"AbC mapper {path} cannot be read as tensors ({first_line(err)})") from None

    def linear(entry: object) -> bool:
        return (
            isinstance(entry, dict)
            and isinstance(entry.get("weight"), torch.Tensor)
            and isinstance(entry.get("bias"), torch.Tensor)
            and tuple(entry["weight"].shape) == (dim, dim)
            and tuple(entry["bias"].shape) == (dim,)
        )

    require(
        isinstance(state, dict) and all(linear(state.get(k)) for k in MAPPERS),
        f"AbC mapper {path} is not a linear mapper of {dim}-d features: expected real_mapper and synth_mapper, "
        f"each weight ({dim}, {dim}) and bias ({dim},); found {describe(state)}",
    )
    return {k: (state[k]["weight"].float(), state[k]["bias"].float()) for k in MAPPERS}


@register
class AbcFeatures(FeatureMethod):
    """Cosine similarity of AbC-tuned features: real mapper on training images, synth mapper on the query."""

    name = "abc"
    Config = AbcConfig

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        require(
            bool(self.cfg.mapper),
            f"abc needs the AbC release's mapper file: pass {self.flag('mapper')} "
            f"weights/mapper/{self.cfg.backbone}_tuned.pth (GenDataAttribution weights/download_weights.sh)",
        )
        self._mapper: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    @property
    def mapper(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        if self._mapper is None:
            self._mapper = load_abc_mapper(self.cfg.mapper, BACKBONES[self.cfg.backbone][1])
        return self._mapper

    def identity(self) -> dict:
        """The settings plus the mapper's content (a replaced file at the same path changes scores)."""
        weights = [t for pair in self.mapper.values() for t in pair]
        return super().identity() | {"mapper_fingerprint": fingerprint_tensors(*weights)}

    def load_encoder(self) -> Encoder:
        self.mapper  # noqa: B018 - a wrong mapper file fails before the backbone loads
        weights = self.cfg.weights or BACKBONES[self.cfg.backbone][0]
        flag = self.flag("weights")
        if self.cfg.backbone == "clip":
            # The mappers were tuned on OpenAI's CLIP (QuickGELU), through its own 224-pixel transform.
            return clip_image_encoder(
                load_open_clip("ViT-B-32", weights, True, "CLIP", flag), "ViT-B-32", self.model.device
            )
        return dino_encoder(weights, 256, 224, self.model.device, flag)

    def train_map(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mapper["real_mapper"]

    def query_map(self, feature: torch.Tensor) -> torch.Tensor:
        weight, bias = self.mapper["synth_mapper"]
        return weight.double() @ feature + bias.double()
