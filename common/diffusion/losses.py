"""Loss passes over a dataset with keyed noise: the quantity that loss-deviation scores compare.

Each (image, flip, caption, timestep) gets noise from a generator keyed by
``(seed, purpose, sample id, flip, caption, timestep)``. Two passes with the same
:class:`LossConfig`, whatever their batch sizes or data order, use identical noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from common import keyed_random
from common.data import ArrayTrainingSet
from common.diffusion.loss import per_sample_loss, strided_timesteps, unet_denoiser
from common.errors import AttributionError, require
from common.model import DiffusionModel


@dataclass
class LossConfig:
    """How a sample's loss is measured for scoring."""

    seed: int = field(default=0, metadata={"help": "seed of the scoring noise"})
    num_timesteps: int = field(default=10, metadata={"help": "evenly strided timesteps (paper: 20 MSCOCO, 10 AbC)"})
    first_timestep: int = field(default=0, metadata={"help": "first strided timestep (paper: 0)"})
    flips: bool = field(default=True, metadata={"help": "also score the horizontally flipped image"})
    batch_size: int = field(default=512, metadata={"help": "samples per forward pass (does not change results)"})

    def __post_init__(self) -> None:
        require(self.num_timesteps >= 1, f"num_timesteps must be positive, got {self.num_timesteps}")
        require(self.first_timestep >= 0, f"first_timestep must be non-negative, got {self.first_timestep}")
        require(self.batch_size >= 1, f"batch_size must be positive, got {self.batch_size}")

    def timesteps(self, num_train_timesteps: int) -> list[int]:
        """The strided scoring timesteps for a model with ``num_train_timesteps`` diffusion steps."""
        try:
            return strided_timesteps(self.num_timesteps, num_train_timesteps, self.first_timestep)
        except ValueError as err:
            raise AttributionError(f"{err} (the model has {num_train_timesteps} diffusion steps)") from None

    def identity_dict(self) -> dict:
        """The settings that change loss values (the batch size does not)."""
        return {k: v for k, v in asdict(self).items() if k != "batch_size"}


@torch.no_grad()
def dataset_losses(
    model: DiffusionModel,
    data: ArrayTrainingSet,
    cfg: LossConfig,
    *,
    sample_ids: Sequence[int] | None = None,
    purpose: int = keyed_random.SCORE,
    flips: bool | None = None,
    progress: str | None = None,
) -> torch.Tensor:
    """Per-timestep losses of every sample, averaged over captions, on the model's device and dtype.

    Args:
        model: the model.
        data: the samples.
        cfg: timesteps, flips and the noise seed.
        sample_ids: the id of each sample in the noise keys (default: its position); pass the
            global training index when ``data`` is a shard so shards and the whole agree.
        purpose: noise stream (see :mod:`common.keyed_random`).
        flips: score the flipped images too; default ``cfg.flips and model.flips`` (a model trained
            without flips is scored without them).
        progress: a tqdm label, or None for no bar.
    Returns:
        float64 losses (N, F, T), F = 2 with flips (original, flipped) else 1, T = cfg.num_timesteps.
    """
    ids = list(range(len(data))) if sample_ids is None else [int(i) for i in sample_ids]
    if len(ids) != len(data):
        raise AttributionError(f"got {len(ids)} sample ids for {len(data)} samples")
    use_flips = cfg.flips and model.flips if flips is None else flips
    flips_ = (0, 1) if use_flips else (0,)
    steps = cfg.timesteps(model.num_train_timesteps)
    device, dtype, denoise = model.device, model.dtype, unet_denoiser(model.unet)
    n_cap = data.num_captions
    # One row per (sample, flip, caption, timestep slot); batches are slices of this list.
    grid = torch.cartesian_prod(
        torch.arange(len(data)), torch.tensor(flips_), torch.arange(n_cap), torch.arange(len(steps))
    ).view(-1, 4)
    out = torch.zeros(len(data), len(flips_), len(steps), dtype=torch.float64)
    t_all = torch.tensor(steps)
    bar = tqdm(total=len(grid), desc=progress, disable=progress is None, unit="loss", leave=False)
    for start in range(0, len(grid), cfg.batch_size):
        rows = grid[start : start + cfg.batch_size]
        pos, flip, cap, slot = rows.unbind(1)
        t = t_all[slot]
        keys = [
            (cfg.seed, purpose, ids[p], f, c, s)
            for p, f, c, s in zip(pos.tolist(), flip.tolist(), cap.tolist(), t.tolist())
        ]
        noise = keyed_random.keyed_normal(keys, data.image_shape, dtype=dtype, device=device)
        x0 = data.images(pos, flip.bool()).to(device=device, dtype=dtype)
        text = data.text(pos, cap).to(device=device, dtype=dtype)
        loss = per_sample_loss(denoise, x0, text, t.to(device), noise, model.alphas_cumprod).double().cpu()
        if not torch.isfinite(loss).all():
            raise AttributionError("NaN or inf in the losses: the model weights are broken (step size too large?)")
        out.index_put_((pos, flip if len(flips_) == 2 else torch.zeros_like(flip), slot), loss / n_cap, accumulate=True)
        bar.update(len(rows))
    bar.close()
    return out
