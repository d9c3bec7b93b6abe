"""Loss passes over a dataset with keyed noise: the quantity that loss-deviation scores compare.

Each (image, flip, caption, timestep) gets noise from a generator keyed by
``(seed, purpose, sample id, flip, caption, timestep)``. Two passes with the same
:class:`LossConfig`, whatever their batch sizes or data order, use identical noise.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from tqdm.std import tqdm

from common import keyed_random
from common.config import no_effect
from common.data import ArrayTrainingSet
from common.diffusion.ddpm_loss import per_sample_loss, strided_timesteps, unet_denoiser
from common.errors import AttributionError, require
from common.model import DiffusionModel
from common.progress import progress_bar


@dataclass
class LossConfig:
    """How a sample's loss is measured for scoring."""

    seed: int = field(default=0, metadata={"help": "seed of the scoring noise"})
    num_timesteps: int = field(default=10, metadata={"help": "evenly strided timesteps (paper: 20 MSCOCO, 10 AbC)"})
    first_timestep: int = field(default=0, metadata={"help": "first strided timestep (paper: 0)"})
    flips: bool = field(default=True, metadata={"help": "also score the horizontally flipped image"})
    batch_size: int = no_effect(512, "samples per forward pass (does not change results)")

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


PRECISIONS = ("fp32", "bf16")


@contextmanager
def swapped_weights(unet: torch.nn.Module, weights: Mapping[str, torch.Tensor] | None) -> Iterator[None]:
    """Within the block, ``unet`` uses ``weights`` (name -> tensor) in place of its own; restored on exit.

    Copies in place (cheap for a selection such as cross-attention K/V), so a forward pass runs at
    the plain module's speed, unlike ``torch.func.functional_call``.
    """
    if not weights:
        yield
        return
    params = dict(unet.named_parameters())
    missing = [n for n in weights if n not in params]
    require(not missing, f"the weights name {len(missing)} tensors the model lacks, e.g. {missing[:1]}")
    saved = {n: params[n].detach().clone() for n in weights}
    try:
        with torch.no_grad():
            for n, w in weights.items():
                params[n].copy_(w)
        yield
    finally:
        with torch.no_grad():
            for n, w in saved.items():
                params[n].copy_(w)


def compiled(unet: torch.nn.Module) -> torch.nn.Module:
    """``torch.compile`` of ``unet``, made once per module: weights swapped in place keep it valid.

    Kept in the module's ``__dict__`` (not as a submodule: its state dict stays the UNet's), so it
    goes with the module.
    """
    if "_compiled" not in unet.__dict__:
        unet.__dict__["_compiled"] = torch.compile(unet)
    return unet.__dict__["_compiled"]


@torch.no_grad()
def image_losses(
    model: DiffusionModel,
    data: ArrayTrainingSet,
    positions: torch.Tensor,
    ids: torch.Tensor,
    cfg: LossConfig,
    *,
    weight_sets: Mapping[str, Mapping[str, torch.Tensor] | None] | None = None,
    purpose: keyed_random.Purpose = keyed_random.Purpose.SCORE,
    flips: bool = True,
    precision: str = "fp32",
    bar: tqdm | None = None,
    compile: bool = False,
) -> dict[str, torch.Tensor]:
    """Per-timestep losses of the images at ``positions``, averaged over captions, under each weight set.

    Each group of images is read once and scored under every weight set (e.g. the unlearned weights
    of several queries); noise is drawn on the model's device, keyed by ``ids``; losses stay there.

    Args:
        positions: indices into ``data`` (n,).
        ids: each image's id in the noise keys (n,) (its global training index).
        weight_sets: name -> weights replacing the model's (None: its own); default ``{"": None}``.
        flips: score the flipped images too.
        precision: fp32, or bf16 (autocast; losses computed and kept in float32 or wider).
        bar: a progress bar advanced by the loss rows done.
        compile: run the UNet through ``torch.compile`` (:func:`compiled`).
    Returns:
        name -> float64 losses (n, F, T) on the model's device.
    """
    require(precision in PRECISIONS, f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    weight_sets = {"": None} if weight_sets is None else weight_sets
    device, dtype = model.device, model.dtype
    steps = torch.tensor(cfg.timesteps(model.num_train_timesteps), device=device)
    flip_values = (0, 1) if flips else (0,)
    n, n_f, n_c, n_t = len(positions), len(flip_values), data.num_captions, len(steps)
    per_image = n_f * n_c * n_t
    group = max(1, cfg.batch_size // per_image)  # images whose rows fit one forward pass
    denoise = unet_denoiser(compiled(model.unet) if compile else model.unet)
    out = {name: torch.empty(n, n_f, n_c, n_t, dtype=torch.float64, device=device) for name in weight_sets}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    ids = torch.as_tensor(ids, dtype=torch.int64).to(device)
    flip_t = torch.tensor(flip_values, device=device)
    for g0 in range(0, n, group):
        pos = torch.as_tensor(positions[g0 : g0 + group], dtype=torch.long)
        m = len(pos)
        images = torch.stack([data.images(pos, bool(f)) for f in flip_values], 1).to(device=device, dtype=dtype)
        caps = torch.arange(n_c).repeat(m)
        text = data.text(pos.repeat_interleave(n_c), caps).to(device=device, dtype=dtype)
        text = text.view(m, n_c, *text.shape[1:])
        # One row per (image, flip, caption, timestep), in that order; forward passes take slices of it.
        grid = torch.cartesian_prod(*(torch.arange(k, device=device) for k in (m, n_f, n_c, n_t))).view(-1, 4)
        for r0 in range(0, len(grid), cfg.batch_size):
            p, f, c, s = grid[r0 : r0 + cfg.batch_size].unbind(1)
            keys = keyed_random.key_rows(cfg.seed, purpose, ids[g0 + p], flip_t[f], c, steps[s])
            noise = keyed_random.keyed_normal(keys, data.image_shape, dtype=dtype, device=device)
            x0, cond, t = images[p, f], text[p, c], steps[s]
            for name, weights in weight_sets.items():
                with swapped_weights(model.unet, weights), autocast:
                    loss = per_sample_loss(denoise, x0, cond, t, noise, model.alphas_cumprod)
                out[name][g0 + p, f, c, s] = loss.double()
            if bar is not None:
                bar.update(len(p))
    return {name: v.mean(2) for name, v in out.items()}


def check_finite(losses: torch.Tensor, data: ArrayTrainingSet | None = None, positions=None) -> None:
    """Refuse losses with NaN or inf, naming the cause: a training image whose input or text condition is not finite
    (with ``data`` and the ``positions`` of the loss rows: the arrays are at fault), else the weights."""
    finite = torch.isfinite(losses.flatten(1)).all(1)
    if bool(finite.all()):
        return
    if data is not None:
        positions = torch.as_tensor(positions if positions is not None else range(len(data)))
        for i in positions[~finite.cpu()].tolist():
            image, text = data.images(torch.tensor([i])), data.text(torch.tensor([i]))
            part = "model input" if not bool(torch.isfinite(image).all()) else None
            part = part or ("text condition" if not bool(torch.isfinite(text).all()) else None)
            if part is not None:
                source = f" ({data.source})" if getattr(data, "source", None) else ""
                raise AttributionError(f"training image {i} has NaN or inf in its {part}{source}")
    raise AttributionError("NaN or inf in the losses: the model weights are broken (step size too large?)")


@torch.no_grad()
def dataset_losses(
    model: DiffusionModel,
    data: ArrayTrainingSet,
    cfg: LossConfig,
    *,
    sample_ids: Sequence[int] | None = None,
    purpose: keyed_random.Purpose = keyed_random.Purpose.SCORE,
    flips: bool | None = None,
    progress: str | None = None,
    weights: Mapping[str, torch.Tensor] | None = None,
    precision: str = "fp32",
) -> torch.Tensor:
    """Per-timestep losses of every sample, averaged over captions (in memory; :mod:`passes` for large sets).

    Args:
        model: the model.
        data: the samples.
        cfg: timesteps, flips and the noise seed.
        sample_ids: the id of each sample in the noise keys (default: its position); pass the
            global training index when ``data`` is a shard so shards and the whole agree.
        purpose: noise stream (see :mod:`common.keyed_random`).
        flips: score the flipped images too; default ``cfg.flips and model.flips`` (a model trained
            without flips is scored without them).
        progress: a progress bar label, or None for no bar.
        weights: weights (name -> tensor) used in place of the model's (e.g. unlearned ones).
        precision: fp32, or bf16 (autocast).
    Returns:
        float64 losses (N, F, T) on the CPU, F = 2 with flips (original, flipped) else 1, T = cfg.num_timesteps.
    """
    ids = list(range(len(data))) if sample_ids is None else [int(i) for i in sample_ids]
    if len(ids) != len(data):
        raise AttributionError(f"got {len(ids)} sample ids for {len(data)} samples")
    use_flips = cfg.flips and model.flips if flips is None else flips
    rows = len(data) * (2 if use_flips else 1) * data.num_captions * cfg.num_timesteps
    with progress_bar(total=rows, desc=progress, disable=progress is None, unit="loss", leave=False) as bar:
        losses = image_losses(
            model,
            data,
            torch.arange(len(data)),
            torch.tensor(ids),
            cfg,
            weight_sets={"": weights},
            purpose=purpose,
            flips=use_flips,
            precision=precision,
            bar=bar,
        )[""]
    check_finite(losses, data)
    return losses.cpu()
