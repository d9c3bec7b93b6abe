"""DINO similarity (Table 1's "DINO", the strongest feature baseline): cosine similarity of DINO ViT-B/16 features.

The feature is the CLS token of the last layer after the final layer norm (768-d): what the
original ``torch.hub.load('facebookresearch/dino:main', 'dino_vitb16')`` returns and what the AbC
benchmark (GenDataAttribution ``models/dino_model.py``) and FastGDA (``feature_extraction/extract.py``)
use. The same weights are loaded with ``transformers.ViTModel`` from the hub id ``facebook/dino-vitb16``
or a folder saved with ``save_pretrained``. Input as in those references: shorter side resized to
256 (bicubic), centre 224 x 224 crop, ImageNet mean and std.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from common.config import no_effect
from common.errors import require
from common.methods.features import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Encoder,
    FeatureMethod,
    Preprocess,
    image_encoder,
    load_transformers,
)
from common.methods.registry import register


@dataclass
class DinoConfig:
    """DINO ViT-B/16 feature similarity."""

    weights: str = field(
        default="facebook/dino-vitb16",
        metadata={"help": "hub id or local folder (save_pretrained) of a transformers ViTModel"},
    )
    resize: int = field(default=256, metadata={"help": "shorter image side before the centre crop (pixels)"})
    crop: int = field(default=224, metadata={"help": "centre crop fed to the encoder (a multiple of the patch size)"})
    batch_size: int = no_effect(64, "images embedded per batch (does not change results)")

    def __post_init__(self) -> None:
        require(bool(self.weights), "weights must name a hub id or a local folder")
        require(0 < self.crop <= self.resize, f"crop ({self.crop}) must be positive and at most resize ({self.resize})")
        require(self.batch_size >= 1, f"batch_size must be positive, got {self.batch_size}")


def vit_cls(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The final-layer-normed CLS token (B, D); position embeddings interpolated for inputs other than 224."""
    return net(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state[:, 0]


def vit_encoder(net, what: str, forward, resize: int, crop: int, device: torch.device | str) -> Encoder:
    """A loaded transformers ViT-family network as an encoder of pixels: its CLS token of the ImageNet-normalised
    ``crop`` (a multiple of the patch size) of the image resized to ``resize``."""
    patch = int(net.config.patch_size)
    require(crop % patch == 0, f"{what} crop {crop} must be a multiple of the patch size {patch}")
    prep = Preprocess(resize, crop, IMAGENET_MEAN, IMAGENET_STD)
    name = f"transformers {type(net).__name__} CLS /{patch}"
    return image_encoder(name, net, forward, int(net.config.hidden_size), prep, device)


def dino_encoder(weights: str, resize: int, crop: int, device: torch.device | str, flag: str) -> Encoder:
    """DINO ViT-B/16 (or any ``ViTModel`` checkpoint) as an encoder of pixels."""
    from transformers import ViTModel

    # DINO checkpoints carry no pooler (it is ViT's classification head): build without one.
    net = load_transformers(ViTModel, weights, "DINO", flag, optional=("pooler.",), add_pooling_layer=False)
    return vit_encoder(net, "DINO", vit_cls, resize, crop, device)


@register
class Dino(FeatureMethod):
    """Cosine similarity of DINO CLS features: query vs each training image and its flip."""

    name = "dino"
    Config = DinoConfig

    def load_encoder(self) -> Encoder:
        return dino_encoder(self.cfg.weights, self.cfg.resize, self.cfg.crop, self.model.device, self.flag("weights"))
