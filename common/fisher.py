"""Diagonal Fisher information of the training loss, for the selected weights only.

F = E[g ⊙ g] over training images, flips, captions, timesteps and noise, with g a per-sample
gradient. Sample j of the estimate visits image ``perm_e[j mod N]`` in epoch ``e = j div N`` and
draws its flip, caption, timestep and noise from generators keyed by ``(seed, j)``, so the estimate
does not depend on the batch size.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from common import keyed_random
from common.data import ArrayTrainingSet
from common.errors import AttributionError, require, require_file
from common.per_sample_grad import per_sample_gradients
from common.selection import select_parameters


@dataclass
class FisherConfig:
    """How the diagonal Fisher is estimated."""

    selection: str = field(default="cross-attn-kv", metadata={"help": "weights to estimate it for"})
    num_samples: int = field(default=10000, metadata={"help": "per-sample gradients (paper MSCOCO: ~5 epochs)"})
    batch_size: int = field(default=64, metadata={"help": "gradients per vmap batch (does not change results)"})
    seed: int = field(default=0, metadata={"help": "seed of images order, flips, timesteps and noise"})
    num_train_timesteps: int = field(default=1000, metadata={"help": "diffusion steps of the model"})

    def __post_init__(self) -> None:
        require(self.num_samples > 0, f"num_samples must be positive, got {self.num_samples}")
        require(self.batch_size > 0, f"batch_size must be positive, got {self.batch_size}")


def _draws(j0: int, j1: int, n: int, n_cap: int, cfg: FisherConfig):
    """Image index, flip, caption and timestep of Fisher samples j0..j1-1."""
    idx, flip, cap, t = [], [], [], []
    perms: dict[int, torch.Tensor] = {}
    for j in range(j0, j1):
        epoch = j // n
        if epoch not in perms:
            perms[epoch] = torch.randperm(n, generator=keyed_random.generator(cfg.seed, keyed_random.FISHER, 0, epoch))
        idx.append(int(perms[epoch][j % n]))
        g = keyed_random.generator(cfg.seed, keyed_random.FISHER, 1, j)
        flip.append(int(torch.randint(2, (), generator=g)))
        cap.append(int(torch.randint(n_cap, (), generator=g)))
        t.append(int(torch.randint(cfg.num_train_timesteps, (), generator=g)))
    return torch.tensor(idx), torch.tensor(flip, dtype=torch.bool), torch.tensor(cap), torch.tensor(t)


def estimate_fisher(
    model: torch.nn.Module,
    data: ArrayTrainingSet,
    alphas_cumprod: torch.Tensor,
    cfg: FisherConfig,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of the selected weights.

    Returns:
        name -> mean squared per-sample gradient, float64, shaped like the parameter.
    """
    names = select_parameters(model, cfg.selection)
    ref = next(model.parameters())
    total = {n: torch.zeros_like(dict(model.named_parameters())[n], dtype=torch.float64) for n in names}
    bar = tqdm(total=cfg.num_samples, desc="fisher", unit="grad", disable=not progress, leave=False)
    for j0 in range(0, cfg.num_samples, cfg.batch_size):
        j1 = min(j0 + cfg.batch_size, cfg.num_samples)
        idx, flip, cap, t = _draws(j0, j1, len(data), data.num_captions, cfg)
        keys = [(cfg.seed, keyed_random.FISHER, 2, j) for j in range(j0, j1)]
        noise = keyed_random.keyed_normal(keys, data.image_shape, dtype=ref.dtype, device=ref.device)
        x0 = data.images(idx, flip).to(ref)
        text = data.text(idx, cap).to(ref)
        grads = per_sample_gradients(model, names, x0, text, t.to(ref.device), noise, alphas_cumprod)
        for n in names:
            total[n] += grads[n].double().pow(2).sum(0)
        bar.update(j1 - j0)
    bar.close()
    fisher = {n: (v / cfg.num_samples).cpu() for n, v in total.items()}
    check_fisher(fisher)
    return fisher


def check_fisher(fisher: dict[str, torch.Tensor]) -> None:
    """Raise a one-line error if any entry is NaN, inf or negative."""
    for name, value in fisher.items():
        require(bool(torch.isfinite(value).all()), f"NaN or inf in the Fisher entry {name}")
        require(bool((value >= 0).all()), f"negative values in the Fisher entry {name}")


def save_fisher(path: str | Path, fisher: dict[str, torch.Tensor], cfg: FisherConfig, model_fingerprint: str) -> None:
    """Write the Fisher as safetensors with its parameter names, sample count and seed as metadata."""
    meta = {
        "config": json.dumps(asdict(cfg), sort_keys=True),
        "model": model_fingerprint,
        "names": json.dumps(list(fisher)),
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file({n: v.contiguous() for n, v in fisher.items()}, str(path), metadata=meta)


def load_fisher(path: str | Path, names: list[str] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a Fisher file; check it is finite, non-negative and covers ``names``.

    Returns:
        (name -> tensor, metadata)
    """
    require_file(path, "Fisher file")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    fisher = load_file(str(path))
    check_fisher(fisher)
    if names is not None:
        missing = [n for n in names if n not in fisher]
        if missing:
            raise AttributionError(f"the Fisher file {path} lacks {len(missing)} selected weights, e.g. {missing[0]}")
    return fisher, meta
