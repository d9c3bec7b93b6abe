"""Diagonal Fisher information of the training loss, for the selected weights only.

F = E[g ⊙ g] over training images, flips, captions, timesteps and noise, with g a per-sample
gradient. Sample j of the estimate visits image ``perm_e[j mod N]`` in epoch ``e = j div N`` and
draws its flip, caption, timestep and noise from generators keyed by ``(seed, j)``, so the estimate
does not depend on the batch size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from common import keyed_random
from common.cache import cached_tensors
from common.config import identity_settings, no_effect
from common.data import ArrayTrainingSet
from common.diffusion.gradients import per_sample_gradients
from common.diffusion.selection import check_selection, select_parameters
from common.errors import AttributionError, require
from common.files import read_pickle, read_safetensors
from common.model import DiffusionModel
from common.processes import rank_world
from common.progress import progress_bar


@dataclass
class FisherConfig:
    """How the diagonal Fisher is estimated."""

    selection: str = field(default="cross-attn-kv", metadata={"help": "weights to estimate it for"})
    num_samples: int = field(default=10000, metadata={"help": "per-sample gradients (paper MSCOCO: ~5 epochs)"})
    batch_size: int = no_effect(64, "gradients per vmap batch (does not change results)")
    seed: int = field(default=0, metadata={"help": "seed of images order, flips, timesteps and noise"})
    file: str = field(
        default="",
        metadata={
            "help": "import a released curvature instead of estimating: a diagonal Fisher file, or an EK-FAC factor "
            "folder in kronfluence's layout (checked against the weights)"
        },
    )
    checkpoint_batches: int = no_effect(50, "EK-FAC and block fits: batches between saved partial sums (resume unit)")
    block_max_gb: float = no_effect(8.0, "largest block Fisher (all selected tensors' matrices, float64) to build")

    def __post_init__(self) -> None:
        check_selection(self.selection)
        require(self.num_samples > 0, f"num_samples must be positive, got {self.num_samples}")
        require(self.batch_size > 0, f"batch_size must be positive, got {self.batch_size}")
        require(self.checkpoint_batches > 0, f"checkpoint_batches must be positive, got {self.checkpoint_batches}")
        require(self.block_max_gb > 0, f"block_max_gb must be positive, got {self.block_max_gb}")


# Where a curvature comes from (a released file), not what a fitted one holds: left out of a fit's identity.
WHERE = ("file",)


def _draws(j0: int, j1: int, n: int, n_cap: int, cfg: FisherConfig, num_train_timesteps: int, flips: bool):
    """Image index, flip, caption and timestep of Fisher samples j0..j1-1 (keyed by the sample number j)."""
    j = torch.arange(j0, j1)
    epochs = j // n
    idx = torch.empty_like(j)
    for epoch in epochs.unique().tolist():  # each epoch visits the images in its own seeded order
        perm = torch.randperm(n, generator=keyed_random.generator(cfg.seed, keyed_random.Purpose.FISHER, 0, epoch))
        idx[epochs == epoch] = perm[j[epochs == epoch] % n]
    u = keyed_random.keyed_uniform(keyed_random.key_rows(cfg.seed, keyed_random.Purpose.FISHER, 1, j), 3)
    flip = (u[:, 0] < 0.5) & flips  # drawn either way: the other draws stay the same
    return idx, flip, keyed_random.below(u[:, 1], n_cap), keyed_random.below(u[:, 2], num_train_timesteps)


def fisher_batch(
    model: DiffusionModel, data: ArrayTrainingSet, cfg: FisherConfig, j0: int, j1: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Model inputs (B,C,H,W), text (B,L,D), timesteps (B,) and noise (B,C,H,W) of Fisher samples j0..j1-1.

    Every curvature (diagonal, EK-FAC, block) is estimated from these same keyed draws.
    """
    ref = next(model.unet.parameters())
    idx, flip, cap, t = _draws(j0, j1, len(data), data.num_captions, cfg, model.num_train_timesteps, model.flips)
    keys = keyed_random.key_rows(cfg.seed, keyed_random.Purpose.FISHER, 2, torch.arange(j0, j1))
    noise = keyed_random.keyed_normal(keys, data.image_shape, dtype=ref.dtype, device=ref.device)
    return data.images(idx, flip).to(ref), data.text(idx, cap).to(ref), t.to(ref.device), noise


def estimate_fisher(
    model: DiffusionModel,
    data: ArrayTrainingSet,
    cfg: FisherConfig,
    progress: bool = True,
    accelerator=None,
) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of the selected weights; flips are drawn only for models trained with them.

    With an ``accelerate.Accelerator`` of several processes, process r takes batches r, r + W, ...
    and the sums are added up across processes: the same Fisher, up to summation order.

    Returns:
        name -> mean squared per-sample gradient, float64, shaped like the parameter (on every process).
    """
    names = select_parameters(model.unet, cfg.selection)
    params = dict(model.unet.named_parameters())
    total = {n: torch.zeros_like(params[n], dtype=torch.float64) for n in names}
    rank, world = rank_world(accelerator)
    starts = list(range(0, cfg.num_samples, cfg.batch_size))[rank::world]
    mine = sum(min(cfg.batch_size, cfg.num_samples - j0) for j0 in starts)
    bar = progress_bar(total=mine, desc="fisher", unit="grad", disable=not progress or rank != 0, leave=False)
    for j0 in starts:
        j1 = min(j0 + cfg.batch_size, cfg.num_samples)
        grads = per_sample_gradients(model, names, *fisher_batch(model, data, cfg, j0, j1))
        for n in names:
            total[n] += grads[n].double().pow(2).sum(0)
        bar.update(j1 - j0)
    bar.close()
    if world > 1:
        total = {n: accelerator.reduce(v, reduction="sum") for n, v in total.items()}
    return {n: (v / cfg.num_samples).cpu() for n, v in total.items()}


def fisher_identity(model: DiffusionModel, data: ArrayTrainingSet, cfg: FisherConfig) -> dict:
    """What a Fisher depends on: the model, the training set, the flips and the settings (not the batch size)."""
    settings = {k: v for k, v in identity_settings(cfg).items() if k not in WHERE}
    return {
        "model": model.fingerprint(),
        "data": data.fingerprint,
        "flips": model.flips,
        "noise": keyed_random.NOISE,
        "settings": settings,
    }


def curvature_identity(model: DiffusionModel, data: ArrayTrainingSet, cfg: FisherConfig, kind: str) -> dict:
    """What a curvature of ``kind`` (ekfac, block) depends on: as the Fisher's, and its kind."""
    return fisher_identity(model, data, cfg) | {"curvature": kind}


def relative_floor(values: torch.Tensor, damping: float, what: str) -> float:
    """damping × mean(values): the damping of a curvature, relative to its scale; undamped needs positive values."""
    mean = float(values.double().mean())
    floor = damping * mean if mean > 0 else damping
    if floor == 0:
        zeros = int((values <= 0).sum())
        require(zeros == 0, f"{what} have {zeros} zero entries and damping is 0: set unlearn.damping > 0")
    return floor


def cached_fisher(
    model: DiffusionModel,
    data: ArrayTrainingSet,
    cfg: FisherConfig,
    path: str | Path | None,
    progress: bool = True,
    accelerator=None,
) -> dict[str, torch.Tensor]:
    """The Fisher at ``path`` if it was made from this model, training set and settings; else estimate and save it.

    With several processes every one must call it: they estimate it together (:func:`estimate_fisher`).

    Raises:
        AttributionError: the file was made from another model, training set or settings, or is damaged.
    """
    fisher = cached_tensors(
        path,
        fisher_identity(model, data, cfg),
        lambda: estimate_fisher(model, data, cfg, progress, accelerator),
        "Fisher file",
    )
    check_fisher(fisher, select_parameters(model.unet, cfg.selection), path)
    return fisher


def check_fisher(fisher: dict[str, torch.Tensor], names: list[str] | None = None, path: object = None) -> None:
    """Raise a one-line error if any entry is NaN, inf or negative, or a selected weight is missing."""
    where = f" of {path}" if path is not None else ""
    for name, value in fisher.items():
        require(bool(torch.isfinite(value).all()), f"NaN or inf in the Fisher entry {name}{where}")
        require(bool((value >= 0).all()), f"negative values in the Fisher entry {name}{where}")
    missing = [n for n in names or [] if n not in fisher]
    if missing:
        raise AttributionError(f"the Fisher{where} lacks {len(missing)} selected weights, e.g. {missing[0]}")


def import_fisher(path: str | Path, model: DiffusionModel, selection: str, prefix: str = "") -> dict[str, torch.Tensor]:
    """A released Fisher file (e.g. the authors' ``fisher_info.pt``), checked against the weights it must cover.

    Reads safetensors, or a ``torch.save`` file with ``weights_only=True`` (no code runs). Entries may
    carry a name ``prefix`` (e.g. ``unet.``), which is stripped.

    Raises:
        AttributionError: missing or unreadable file; it lacks a selected weight or holds one of another
            shape; NaN, inf or negative entries.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        raw = read_safetensors(path, "Fisher file")
    else:
        raw = read_pickle(path, "Fisher file")
    fisher = {k[len(prefix) :] if prefix and k.startswith(prefix) else k: v for k, v in raw.items()}
    names = select_parameters(model.unet, selection)
    params = dict(model.unet.named_parameters())
    check_fisher({n: fisher[n] for n in names if n in fisher}, names, path)
    for n in names:
        want = tuple(params[n].shape)
        require(
            tuple(fisher[n].shape) == want,
            f"{path}: entry {n} has shape {tuple(fisher[n].shape)}, the model's weight has {want}",
        )
    return {n: fisher[n].double() for n in names}


def newton_direction(
    grads: dict[str, torch.Tensor], fisher: dict[str, torch.Tensor], damping: float
) -> dict[str, torch.Tensor]:
    """(F + damping·mean(F))⁻¹ g for each named tensor; the mean is over all selected entries."""
    missing = [n for n in grads if n not in fisher]
    if missing:
        raise AttributionError(f"the Fisher lacks {len(missing)} selected weights, e.g. {missing[0]}")
    count = sum(fisher[n].numel() for n in grads)
    mean = sum(float(fisher[n].double().sum()) for n in grads) / count
    floor = damping * mean if mean > 0 else damping
    if floor == 0:  # undamped, as the original release: every entry must be positive
        zeros = sum(int((fisher[n] <= 0).sum()) for n in grads)
        require(zeros == 0, f"the Fisher has {zeros} zero entries and damping is 0: set unlearn.damping > 0")
    return {n: g / (fisher[n].to(g) + floor) for n, g in grads.items()}
