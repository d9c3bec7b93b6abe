"""The exact empirical Fisher of each selected weight tensor (a full matrix per tensor): the curvature oracle.

F_k = E[vec(g_k) vec(g_k)ᵀ] over the Fisher's keyed draws (:func:`common.unlearning.fisher.fisher_batch`),
g_k a sample's gradient of tensor k; the preconditioned gradient is (F_k + λ·mean diag F_k)⁻¹ vec(v_k) per
tensor, λ the relative damping. It ignores only the curvature between tensors, so it bounds what a better
approximation (diagonal, EK-FAC) of the same blocks can give. A tensor of d weights needs a d×d float64
matrix: the tiny model's K/V (at most 2,048 weights each) fit, Stable Diffusion's do not, and a selection
larger than ``fisher.block_max_gb`` is refused before any work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.cache import cached_tensors, resumable_sums
from common.data import ArrayTrainingSet
from common.diffusion.gradients import per_sample_gradients
from common.diffusion.selection import select_parameters
from common.errors import require
from common.files import read_safetensors
from common.fingerprints import fingerprint_tensors
from common.model import DiffusionModel
from common.processes import rank_world
from common.unlearning.fisher import FisherConfig, curvature_identity, fisher_batch, relative_floor

COUNT = "_num_samples"


def check_block_size(model: DiffusionModel, cfg: FisherConfig) -> list[str]:
    """The selected tensors, if their matrices fit ``block_max_gb`` and the samples can fill them; else one line."""
    params = dict(model.unet.named_parameters())
    names = select_parameters(model.unet, cfg.selection)
    sizes = {n: params[n].numel() for n in names}
    gb = sum(d * d for d in sizes.values()) * 8 / 2**30
    largest = max(sizes, key=sizes.get)
    require(
        gb <= cfg.block_max_gb,
        f"the block Fisher of selection {cfg.selection!r} needs {gb:,.1f} GB ({len(names)} tensors, the largest "
        f"{largest} with {sizes[largest]:,} weights); fisher.block_max_gb is {cfg.block_max_gb:g}: choose a smaller "
        "selection or the ekfac preconditioner",
    )
    require(
        cfg.num_samples >= sizes[largest],
        f"the block Fisher of {largest} ({sizes[largest]:,} weights) needs at least as many Fisher samples; "
        f"fisher.num_samples is {cfg.num_samples}",
    )
    return names


@dataclass
class BlockFisher:
    """Per selected tensor, its damped empirical Fisher matrix (d, d), float64."""

    matrices: dict[str, torch.Tensor]
    _factors: dict = field(default_factory=dict, repr=False)  # (name, damping) -> Cholesky factor

    def fingerprint(self) -> str:
        return "block:" + fingerprint_tensors(*(self.matrices[n] for n in sorted(self.matrices)))

    def damped(self, name: str, damping: float) -> torch.Tensor:
        """F + damping·mean(diag F)·I of one tensor."""
        f = self.matrices[name]
        floor = relative_floor(torch.diagonal(f), damping, f"the block Fisher's diagonal entries of {name}")
        return f + floor * torch.eye(len(f), dtype=f.dtype, device=f.device)

    def direction(self, grads: dict[str, torch.Tensor], damping: float) -> dict[str, torch.Tensor]:
        """(F_k + damping·mean diag F_k)⁻¹ vec(g_k) for each named tensor (a Cholesky solve, factor kept)."""
        missing = [n for n in grads if n not in self.matrices]
        require(not missing, f"the block Fisher lacks {len(missing)} selected weights, e.g. {missing[:1]}")
        out = {}
        for n, g in grads.items():
            key = (n, damping)
            if key not in self._factors:
                self._factors[key] = torch.linalg.cholesky(self.damped(n, damping))
            chol = self._factors[key].to(g.device)
            out[n] = torch.cholesky_solve(g.double().reshape(-1, 1), chol).reshape(g.shape)
        return out


def read_block(path: str | Path, model: DiffusionModel, selection: str) -> BlockFisher:
    """A block Fisher file (e.g. a base model's, for its customized models), checked against the selected tensors.

    Raises:
        AttributionError: a missing or damaged file, a selected tensor missing, a matrix of another size, NaN or inf.
    """
    params = dict(model.unet.named_parameters())
    matrices = read_safetensors(path, "block Fisher file")
    for n in select_parameters(model.unet, selection):
        require(n in matrices, f"block Fisher file {path} lacks the selected weight {n}")
        d = params[n].numel()
        got = tuple(matrices[n].shape)
        require(got == (d, d), f"block Fisher file {path}: {n} is {got}, the model's weight needs ({d}, {d})")
        require(bool(torch.isfinite(matrices[n]).all()), f"NaN or inf in block Fisher file {path}: {n}")
    return BlockFisher({n: matrices[n].double() for n in select_parameters(model.unet, selection)})


def fit_block(
    model: DiffusionModel,
    data: ArrayTrainingSet,
    cfg: FisherConfig,
    partial: str | Path | None = None,
    progress: bool = True,
    accelerator=None,
) -> dict[str, torch.Tensor]:
    """The mean outer product of each selected tensor's per-sample gradients, over the Fisher's draws.

    Process r of W takes batches r, r + W, ... and the sums are added up (the same matrices up to summation
    order); with ``partial`` (a path prefix), each process saves its sums every ``cfg.checkpoint_batches``
    batches and a rerun resumes from them.
    """
    names = check_block_size(model, cfg)
    rank, world = rank_world(accelerator)
    starts = list(range(0, cfg.num_samples, cfg.batch_size))[rank::world]

    def contribution(j0: int) -> dict[str, torch.Tensor]:
        batch = fisher_batch(model, data, cfg, j0, min(j0 + cfg.batch_size, cfg.num_samples))
        grads = per_sample_gradients(model, names, *batch)
        out = {}
        for n in names:
            g = grads[n].double().flatten(1)
            out[n] = g.T @ g
        return out

    identity = curvature_identity(model, data, cfg, "block") | {"batch_size": cfg.batch_size, "share": [rank, world]}
    path = Path(f"{partial}-{rank}of{world}.safetensors") if partial is not None else None
    sums = resumable_sums(path, identity, starts, contribution, cfg.checkpoint_batches, "block Fisher",
                          progress and rank == 0)  # fmt: skip
    params = dict(model.unet.named_parameters())
    device = next(model.unet.parameters()).device
    total = {}
    for n in names:
        d = params[n].numel()
        value = sums[n].to(device) if n in sums else torch.zeros(d, d, dtype=torch.float64, device=device)
        if accelerator is not None and world > 1:
            value = accelerator.reduce(value, reduction="sum")
        total[n] = (value / cfg.num_samples).cpu()
    if path is not None:
        path.unlink(missing_ok=True)
    return total


def cached_block(
    model: DiffusionModel,
    data: ArrayTrainingSet,
    cfg: FisherConfig,
    path: str | Path | None,
    progress: bool = True,
    accelerator=None,
) -> BlockFisher:
    """The block Fisher at ``path`` if it was made from this model, training set and settings; else fit and save it.

    Raises:
        AttributionError: the selection is too large or has too few samples (before any work), or the file was
            made from another model, training set or settings, or is damaged.
    """
    check_block_size(model, cfg)
    partial = f"{path}.partial" if path is not None else None
    matrices = cached_tensors(
        path,
        curvature_identity(model, data, cfg, "block"),
        lambda: fit_block(model, data, cfg, partial, progress, accelerator),
        "block Fisher file",
    )
    return BlockFisher(matrices)
