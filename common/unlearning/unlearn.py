"""Unlearning a synthesized image: a Fisher-preconditioned Newton step on the selected weights.

Newton (the paper's method):  θ ← θ + (α / N) · (F + λ·mean(F))⁻¹ ∇L(ẑ, θ)
SGD (the paper's ablation):   θ ← θ + α · ∇L(ẑ, θ)

F is the diagonal Fisher (the paper's AbU), EK-FAC factors (AbU+) or the exact Fisher of each tensor
(``preconditioner``: :mod:`common.unlearning.curvature`); each is damped relative to its own scale.

∇L(ẑ, θ) is the mean over ``batch_size × accumulations`` (noise, timestep) draws on the query,
keyed by (seed, step, accumulation, draw); timesteps do not repeat within a batch. The damping λ is
relative to the Fisher's mean, so it scales with the model instead of sitting below (or above) all
entries, and a zero entry cannot produce inf or NaN.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from common import keyed_random
from common.data import Query
from common.diffusion.gradients import mean_gradient
from common.diffusion.selection import check_selection, select_parameters
from common.errors import require
from common.model import DiffusionModel
from common.progress import progress_bar
from common.unlearning.curvature import PRECONDITIONERS, precondition

METHODS = ("newton", "sgd")


@dataclass
class UnlearnConfig:
    """The unlearning update (defaults: the paper's MSCOCO setting, except the step size, see README)."""

    method: str = field(default="newton", metadata={"help": "newton (Fisher-preconditioned) or sgd (ablation)"})
    preconditioner: str = field(
        default="diagonal",
        metadata={
            "help": "curvature of the newton step: diagonal (the paper's), ekfac (AbU+) or block (exact per tensor)"
        },
    )
    selection: str = field(default="cross-attn-kv", metadata={"help": "weights to update"})
    step_size: float = field(default=0.01, metadata={"help": "α (paper: 0.01 MSCOCO, 0.1 AbC)"})
    steps: int = field(default=1, metadata={"help": "update steps (paper: 1 MSCOCO, 100 AbC)"})
    batch_size: int = field(default=80, metadata={"help": "query draws per batch, distinct timesteps"})
    accumulations: int = field(default=625, metadata={"help": "batches averaged per step"})
    num_train: int = field(default=0, metadata={"help": "N in α/N; 0 means the training-set size"})
    damping: float = field(
        default=1e-3,
        metadata={
            "help": "curvature damping, relative to its mean (diagonal: all entries; ekfac: per module, "
            "FastGDA 0.1; block: per tensor's diagonal)"
        },  # fmt: skip
    )
    seed: int = field(default=0, metadata={"help": "seed of the query draws"})

    def __post_init__(self) -> None:
        check_selection(self.selection)
        require(self.method in METHODS, f"unknown unlearning method {self.method!r}; choose from {', '.join(METHODS)}")
        require(
            self.preconditioner in PRECONDITIONERS,
            f"unknown preconditioner {self.preconditioner!r}; choose from {', '.join(PRECONDITIONERS)}",
        )
        require(self.step_size > 0, f"step_size must be positive, got {self.step_size}")
        require(self.steps >= 1 and self.accumulations >= 1, "steps and accumulations must be at least 1")
        require(self.batch_size >= 1, f"batch_size must be positive, got {self.batch_size}")
        require(self.damping >= 0, f"damping must be non-negative, got {self.damping}")
        require(self.num_train >= 0, f"num_train must be non-negative, got {self.num_train}")


def query_draws(
    query: Query, cfg: UnlearnConfig, step: int, acc: int, num_train_timesteps: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Timesteps (distinct within the batch) and caption indices of one batch of query draws, on ``device``."""
    key = keyed_random.key_rows(cfg.seed, keyed_random.Purpose.QUERY, query.key, step, acc)[None]
    u = keyed_random.keyed_uniform(key, num_train_timesteps + cfg.batch_size, device)[0]
    t = torch.argsort(u[:num_train_timesteps], stable=True)[: cfg.batch_size]  # a keyed random permutation's prefix
    return t, keyed_random.below(u[num_train_timesteps:], query.text.shape[0])


def query_gradient(
    model: DiffusionModel, names: list[str], query: Query, cfg: UnlearnConfig, step: int
) -> dict[str, torch.Tensor]:
    """∇L(ẑ, θ) at the model's current weights: mean over the step's keyed draws (float64)."""
    model.check_timesteps(cfg.batch_size, "unlearn.batch_size (timesteps do not repeat within a batch)")
    ref = next(model.unet.parameters())
    params = dict(model.unet.named_parameters())
    total = {n: torch.zeros_like(params[n], dtype=torch.float64) for n in names}
    text = query.text.to(ref)
    for acc in range(cfg.accumulations):
        t, cap = query_draws(query, cfg, step, acc, model.num_train_timesteps, ref.device)
        keys = keyed_random.key_rows(
            cfg.seed, keyed_random.Purpose.QUERY, query.key, step, acc, torch.arange(cfg.batch_size)
        )
        noise = keyed_random.keyed_normal(keys, query.image.shape, dtype=ref.dtype, device=ref.device)
        x0 = query.image[None].expand(cfg.batch_size, *query.image.shape).to(ref)
        grads = mean_gradient(model, names, x0, text[cap], t, noise)
        for n in names:
            total[n] += grads[n].double()
    return {n: v / cfg.accumulations for n, v in total.items()}


@dataclass
class UnlearnResult:
    """The unlearned model and the size of the change."""

    model: DiffusionModel  # the same model around the unlearned UNet
    relative_update: float  # ‖θ − θ0‖ / ‖θ0‖ over the selected weights
    max_tensor_relative_update: float


def unlearn(
    model: DiffusionModel,
    query: Query,
    cfg: UnlearnConfig,
    fisher=None,
    num_train: int | None = None,
    progress: bool = True,
) -> UnlearnResult:
    """Unlearn ``query`` from a copy of ``model``; only the selected weights change.

    Args:
        model: the pretrained model (left untouched).
        query: the synthesized image.
        cfg: step size, steps, draws.
        fisher: the curvature of the selected weights (required for ``newton``): a diagonal Fisher (name ->
            tensor) or a fitted curvature (:func:`common.unlearning.curvature.load_curvature`).
        num_train: N in α/N when ``cfg.num_train`` is 0.
    """
    names = select_parameters(model.unet, cfg.selection)
    n = cfg.num_train or num_train
    if cfg.method == "newton":
        require(fisher is not None, "the newton update needs a Fisher")
        require(bool(n), "the newton update needs the training-set size N")
    unet = copy.deepcopy(model.unet).requires_grad_(False)
    unlearned = model.with_unet(unet)
    params = dict(unet.named_parameters())
    start = {k: params[k].detach().clone() for k in names}
    for step in progress_bar(range(cfg.steps), desc="unlearn", disable=not progress or cfg.steps == 1, leave=False):
        grads = query_gradient(unlearned, names, query, cfg, step)
        if cfg.method == "newton":
            direction, scale = precondition(grads, fisher, cfg.damping), cfg.step_size / n
        else:
            direction, scale = grads, cfg.step_size
        with torch.no_grad():
            for k in names:
                params[k].add_((scale * direction[k]).to(params[k]))  # ascent: the query's loss must rise
    require(
        all(torch.isfinite(params[k]).all() for k in names),
        f"NaN or inf after unlearning query {query.id}: its gradient or the curvature is not finite",
    )
    return UnlearnResult(unlearned, *update_size(start, {k: params[k].detach() for k in names}))


def update_size(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> tuple[float, float]:
    """‖θ − θ0‖ / ‖θ0‖ over all the named weights, and its largest value for one tensor."""
    diff = {k: after[k].double() - before[k].double() for k in after}
    total = sum(float(d.pow(2).sum()) for d in diff.values()) ** 0.5
    norm = sum(float(before[k].double().pow(2).sum()) for k in after) ** 0.5
    per = [float(d.norm() / before[k].double().norm().clamp_min(1e-30)) for k, d in diff.items()]
    return total / max(norm, 1e-30), max(per)
