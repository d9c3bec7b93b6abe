"""CLIP image similarity (Table 1's "CLIP"): cosine similarity of open_clip ViT-B/32 image embeddings.

The feature is ``encode_image`` (the projected image embedding, 512-d for ViT-B/32) before its
normalisation; the input is the model's own transform: the shorter side resized to 224 (bicubic),
the centre 224 x 224 crop, OpenAI's mean and std. This is what the AbC benchmark
(GenDataAttribution ``models/clip_model.py``) and FastGDA (``feature_extraction/extract.py``)
compute with OpenAI's ``clip.load("ViT-B/32")``, whose weights open_clip serves as the tag ``openai``.

OpenAI's CLIP was trained with QuickGELU activations, while open_clip's ``ViT-B-32`` config uses
exact GELU and only *warns* when the ``openai`` tag is loaded into it; ``quick_gelu`` (default on)
makes the activation follow the weights, and a tag whose training setting disagrees is refused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.config import no_effect
from common.errors import AttributionError, first_line, require
from common.methods.features import Encoder, FeatureMethod, Preprocess, hub_file, image_encoder
from common.methods.registry import register

CHECKPOINT_HOW = "an open_clip checkpoint file (open_clip_model.safetensors or open_clip_pytorch_model.bin)"


@dataclass
class ClipConfig:
    """CLIP image-embedding similarity."""

    weights: str = field(
        default="openai",
        metadata={"help": f"open_clip pretrained tag of the architecture (from the hub cache) or {CHECKPOINT_HOW}"},
    )
    arch: str = field(default="ViT-B-32", metadata={"help": "open_clip architecture"})
    quick_gelu: bool = field(
        default=True, metadata={"help": "QuickGELU activations, as OpenAI's CLIP weights were trained (must match)"}
    )
    batch_size: int = no_effect(64, "images embedded per batch (does not change results)")

    def __post_init__(self) -> None:
        require(bool(self.weights), "weights must name an open_clip tag or a checkpoint file")
        require(self.batch_size >= 1, f"batch_size must be positive, got {self.batch_size}")


def load_open_clip(arch: str, weights: str, quick_gelu: bool, what: str, flag: str) -> torch.nn.Module:
    """An open_clip model (float32, CPU) from a checkpoint file or a pretrained tag, never random.

    A tag is resolved to its file in the hub cache first, then online unless ``HF_HUB_OFFLINE`` is set.

    Raises:
        AttributionError: one line naming the missing weights and ``flag``.
    """
    import open_clip

    if Path(weights).expanduser().is_file():
        checkpoint = str(Path(weights).expanduser())
    else:
        tag = open_clip.get_pretrained_cfg(arch, weights)
        if not tag:
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(arch)[:6])
            raise AttributionError(
                f"{what} weights {weights!r} not found: neither a file nor an open_clip tag of {arch} "
                f"(e.g. {tags}); pass {flag} PATH to {CHECKPOINT_HOW}"
            )
        trained = bool(tag.get("quick_gelu", False))
        require(
            trained == quick_gelu,
            f"open_clip tag {weights!r} of {arch} was trained {'with' if trained else 'without'} QuickGELU: "
            f"set quick_gelu to {trained} to match it",
        )
        # open_clip's convention: "org/name/" (default file name) or "org/name/file".
        repo, filename = os.path.split(tag.get("hf_hub", ""))
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        checkpoint = hub_file(repo, names) if repo else None
        if checkpoint is None:
            raise AttributionError(
                f"{what} weights {arch}/{weights} unavailable (offline?): pass {flag} PATH to {CHECKPOINT_HOW}"
            )
    try:
        model = open_clip.create_model(
            arch, pretrained=checkpoint, force_quick_gelu=quick_gelu, weights_only=True, require_pretrained=True
        )
    except Exception as err:  # noqa: BLE001 - a wrong file fails in several ways; say which, in one line
        raise AttributionError(
            f"{what} weights {weights!r} are not an open_clip {arch} checkpoint ({first_line(err)})"
        ) from None
    return model.float().eval()


def clip_preprocess(model: torch.nn.Module) -> Preprocess:
    """open_clip's evaluation transform of ``model`` (shorter side to the input size, centre crop, its mean/std)."""
    cfg = model.visual.preprocess_cfg
    size = cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][0]
    return Preprocess(resize=size, crop=size, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]))


def clip_image_encoder(model: torch.nn.Module, arch: str, device: torch.device | str) -> Encoder:
    """The image tower of a loaded open_clip model: unnormalised ``encode_image`` features."""
    return image_encoder(
        f"open_clip {arch} encode_image",
        model,
        lambda net, x: net.encode_image(x),
        int(model.visual.output_dim),
        clip_preprocess(model),
        device,
    )


@register
class ClipImage(FeatureMethod):
    """Cosine similarity of CLIP image embeddings: query vs each training image and its flip."""

    name = "clip"
    Config = ClipConfig

    def load_encoder(self) -> Encoder:
        model = load_open_clip(self.cfg.arch, self.cfg.weights, self.cfg.quick_gelu, "CLIP", self.flag("weights"))
        return clip_image_encoder(model, self.cfg.arch, self.model.device)
