"""DINOv2 similarity (Table 1's "DINOv2"): cosine similarity of DINOv2 ViT-L/14 (with registers) features.

The feature is the CLS token after the final layer norm (1024-d; ``pooler_output`` of
``transformers.Dinov2WithRegistersModel``, ``x_norm_clstoken`` of the original torch.hub model,
whose default forward returns it). None of the reference repositories (GenDataAttribution,
AttributeByUnlearning, FastGDA) contains DINOv2 code, so the choice follows DINO's baseline there
(its CLS token) and the model's own default output; the CLS + mean-patch concatenation belongs to
DINOv2's linear classification heads. Weights: hub id ``facebook/dinov2-with-registers-large`` or
a folder saved with ``save_pretrained``. Input as DINOv2's image processor: shorter side resized to
256 (bicubic), centre 224 x 224 crop (16 x 16 patches of 14 pixels; the position embeddings,
trained at 518, are interpolated by the model), ImageNet mean and std.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from common.config import no_effect
from common.errors import AttributionError
from common.methods.dino import DinoConfig, vit_encoder
from common.methods.features import Encoder, FeatureMethod, load_transformers
from common.methods.registry import register


@dataclass
class Dinov2Config(DinoConfig):
    """DINOv2 ViT-L/14 with registers feature similarity."""

    weights: str = field(
        default="facebook/dinov2-with-registers-large",
        metadata={"help": "hub id or local folder (save_pretrained) of a transformers Dinov2WithRegistersModel"},
    )
    batch_size: int = no_effect(32, "images embedded per batch (does not change results)")


def dinov2_cls(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The final-layer-normed CLS token (B, D) (the model always interpolates its position embeddings)."""
    return net(pixel_values=x).last_hidden_state[:, 0]


def dinov2_encoder(weights: str, resize: int, crop: int, device: torch.device | str, flag: str) -> Encoder:
    """DINOv2 with registers as an encoder of pixels."""
    try:
        from transformers import Dinov2WithRegistersModel
    except ImportError:
        import transformers

        raise AttributionError(
            f"transformers {transformers.__version__} lacks Dinov2WithRegistersModel: install transformers>=4.48"
        ) from None
    # mask_token only serves masked-image pre-training; checkpoints may leave it out.
    net = load_transformers(Dinov2WithRegistersModel, weights, "DINOv2", flag, optional=("embeddings.mask_token",))
    return vit_encoder(net, "DINOv2", dinov2_cls, resize, crop, device)


@register
class Dinov2(FeatureMethod):
    """Cosine similarity of DINOv2 (registers) CLS features: query vs each training image and its flip."""

    name = "dinov2"
    Config = Dinov2Config

    def load_encoder(self) -> Encoder:
        return dinov2_encoder(self.cfg.weights, self.cfg.resize, self.cfg.crop, self.model.device, self.flag("weights"))
