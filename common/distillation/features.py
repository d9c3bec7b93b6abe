"""What a distilled attribution model reads: features the diffusion model itself gives, so it runs offline.

FastGDA feeds its network DINO image features and CLIP text features. Without downloaded weights the model's own
parts serve: its text encoder's condition of the caption (mean over tokens, D) and its denoiser's activations of
the image (the UNet's middle block, average-pooled to a ``pool`` x ``pool`` grid, at fixed timesteps, with one
fixed noise per timestep shared by every image and the empty caption as the condition, so the image part depends
on the image alone). A training image is read per orientation; its text part is the mean over its captions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from common import keyed_random
from common.data import ArrayTrainingSet, Query
from common.diffusion.ddpm_loss import add_noise
from common.errors import require
from common.model import DiffusionModel


@dataclass
class FeatureConfig:
    """The model's own features of an image and its caption."""

    timesteps: tuple[int, ...] = field(
        default=(50, 200, 500), metadata={"help": "diffusion timesteps the denoiser reads the image at"}
    )
    pool: int = field(default=2, metadata={"help": "the middle block's activations average-pooled to pool x pool"})
    text: bool = field(default=True, metadata={"help": "include the caption's text condition (mean over tokens)"})
    seed: int = field(default=0, metadata={"help": "seed of the fixed noise per timestep"})

    def __post_init__(self) -> None:
        self.timesteps = tuple(int(t) for t in self.timesteps)
        require(bool(self.timesteps), "features need at least one timestep")
        require(min(self.timesteps) >= 0, f"timesteps must be non-negative, got {self.timesteps}")
        require(len(set(self.timesteps)) == len(self.timesteps), f"timesteps repeat: {self.timesteps}")
        require(self.pool >= 1, f"pool must be positive, got {self.pool}")


class ModelFeatures:
    """Features (B, D) of images and text conditions from a diffusion model's text encoder and denoiser."""

    def __init__(self, model: DiffusionModel, cfg: FeatureConfig) -> None:
        last = max(cfg.timesteps)
        n = model.num_train_timesteps
        require(last < n, f"feature timestep {last} is beyond the model's {n} diffusion steps (0 to {n - 1})")
        self.model, self.cfg = model, cfg
        self.middle = getattr(model.unet, "mid_block", None)
        require(self.middle is not None, "the model's denoiser has no middle block (mid_block) to read features from")
        steps = torch.tensor(cfg.timesteps, dtype=torch.int64)
        keys = keyed_random.key_rows(cfg.seed, keyed_random.Purpose.FEATURES, 0, 0, 0, steps)
        self.noise = keyed_random.keyed_normal(keys, model.input_shape, dtype=model.dtype, device=model.device)
        self.null = model.null_text().to(device=model.device, dtype=model.dtype)  # the condition of every image

    @property
    def dim(self) -> int:
        """The feature size D: channels x pool² per timestep, plus the text condition's width."""
        channels = self.middle.resnets[-1].out_channels if hasattr(self.middle, "resnets") else None
        require(channels is not None, "cannot tell the middle block's width")
        text = self.null.shape[-1] if self.cfg.text else 0
        return channels * self.cfg.pool**2 * len(self.cfg.timesteps) + text

    @torch.no_grad()
    def image(self, x0: torch.Tensor) -> torch.Tensor:
        """The denoiser's pooled middle activations (B, channels x pool² x timesteps) of model inputs (B,C,H,W)."""
        model = self.model
        x0 = x0.to(device=model.device, dtype=model.dtype)
        null = self.null.expand(len(x0), -1, -1)
        seen: list[torch.Tensor] = []
        hook = self.middle.register_forward_hook(lambda _m, _i, out: seen.append(out))
        try:
            for t, noise in zip(self.cfg.timesteps, self.noise):
                steps = torch.full((len(x0),), t, dtype=torch.int64, device=model.device)
                x_t = add_noise(x0, noise.expand_as(x0), steps, model.alphas_cumprod)
                model.unet(x_t, steps, encoder_hidden_states=null, return_dict=False)
        finally:
            hook.remove()
        pooled = [F.adaptive_avg_pool2d(a.float(), self.cfg.pool).flatten(1) for a in seen]
        return torch.cat(pooled, 1).cpu()

    def text(self, conditions: torch.Tensor) -> torch.Tensor:
        """The text part (B, D) of conditions (B, n_captions, L, D): the mean over tokens and captions."""
        return conditions.float().mean((1, 2)).cpu()

    def of(self, x0: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        """Features (B, dim) float32 of model inputs (B,C,H,W) with their conditions (B, n_captions, L, D)."""
        parts = [self.image(x0)] + ([self.text(conditions)] if self.cfg.text else [])
        return torch.cat(parts, 1)

    def query(self, query: Query) -> torch.Tensor:
        """A query's features (1, dim): its image with its prompt."""
        return self.of(query.image[None], query.text[None])

    def training_rows(self, data: ArrayTrainingSet, start: int, stop: int, flips: tuple[bool, ...]) -> np.ndarray:
        """Training images ``start:stop``'s features (n, F, dim), one row per orientation in ``flips``."""
        idx = torch.arange(start, stop)
        texts = torch.stack([data.text(idx, c) for c in range(data.num_captions)], 1)
        cols = [self.of(data.images(idx, f), texts) for f in flips]
        return torch.stack(cols, 1).numpy()
