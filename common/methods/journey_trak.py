"""JourneyTRAK (Georgiev et al. 2023): TRAK scores of the query's own sampling trajectory.

What MadryLab/journey-TRAK does (``diffusion_trak/modelout_functions.py``,
``diffusion_trak/gradient_computers.py``, ``examples/demo_MSCOCO.ipynb``,
``examples/featurize_mscoco_parallel.py``):

- training features are TRAK's (20 random timesteps, one noise draw each), one set for all steps;
- the query is attributed *per sampling step* t: the trajectory is generated once, with the
  attributed model, keeping the model's prediction x̂0(x_t) at every step; at step t the query
  feature is the loss gradient at x̂0(x_t) re-noised to t with fresh noise (20 re-draws), taken by
  every ensemble model; the scores of each model are averaged.

The code gives one score per step and no whole-image score. For the paper's whole-image
comparison, the per-step scores are averaged over ``query_steps`` steps strided over the
trajectory (scores are linear in the query feature, so this is the score of the mean step
feature). ``num_bins`` > 1 goes beyond the release: training features per timestep bin, each
step scored against the kernel of its bin; the default 1 is the release's single set.

The trajectory is regenerated from the query's saved initial noise and sampler settings
(``query.extra``: seed, sampler, num_steps, guidance_scale; the released MSCOCO samples replay the
batch noise stream they were sampled in), with x̂0 from the same guided noise prediction the sampler
used and clipped as the model's scheduler clips. A query without saved noise falls back to x_t = the
final image noised to t with keyed noise; its stats say so (``trajectory: forward-noised``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from common import keyed_random
from common.data import Query
from common.diffusion.ddpm_loss import add_noise, unet_denoiser
from common.diffusion.sampling import guided_eps, query_stream, resample
from common.errors import require
from common.methods.registry import register
from common.methods.trak import Rows, Trak, TrakConfig, window_timesteps
from common.model import DiffusionModel

STEP_ROLE, FORWARD_ROLE = 2, 3  # noise-key roles of the per-step re-noising and the no-saved-noise fallback


@dataclass
class JourneyTrakConfig(TrakConfig):
    """TRAK's settings plus the trajectory steps attributed and the training-feature bins."""

    query_steps: int = field(default=20, metadata={"help": "trajectory steps attributed and averaged"})
    query_draws: int = field(default=20, metadata={"help": "noise re-draws per step (JourneyTRAK: 20)"})
    num_bins: int = field(default=1, metadata={"help": "training-feature timestep bins (JourneyTRAK: 1)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.query_steps >= 1, f"query_steps must be positive, got {self.query_steps}")
        require(self.query_draws >= 1, f"query_draws must be positive, got {self.query_draws}")
        require(self.num_bins >= 1, f"num_bins must be positive, got {self.num_bins}")


@torch.no_grad()
def predicted_x0(model: DiffusionModel, x_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor, guidance: float):
    """The sampler's x̂0 = (x_t − sqrt(1 − ᾱ_t) ε̂) / sqrt(ᾱ_t) (B,C,H,W), ε̂ guided as in sampling."""
    text = text.expand(len(x_t), -1, -1)
    null_text = model.null_text().to(text) if guidance != 1.0 else None
    eps = guided_eps(unet_denoiser(model.unet), x_t, t, text, null_text, guidance)
    a = model.alphas_cumprod.to(x_t)[t].view(-1, 1, 1, 1)
    x0 = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
    config = model.scheduler.config
    if config.get("clip_sample", False):
        limit = config.get("clip_sample_range", 1.0)
        x0 = x0.clamp(-limit, limit)
    return x0


def trajectory_states(model: DiffusionModel, query: Query, targets: list[int], seed: int) -> tuple[list, dict]:
    """(t, x_t (C,H,W)) at the trajectory steps nearest ``targets``, and how they were obtained."""
    device, dtype = model.device, model.dtype
    if query.noise is None and query_stream(query) is None:
        keys = [(seed, keyed_random.Purpose.TRAK, FORWARD_ROLE, query.key, t) for t in targets]
        noise = keyed_random.keyed_normal(keys, query.image.shape, dtype=dtype, device=device)
        image = query.image.to(device=device, dtype=dtype).expand(len(targets), -1, -1, -1)
        x_t = add_noise(image, noise, torch.tensor(targets, device=device), model.alphas_cumprod)
        return list(zip(targets, x_t)), {"trajectory": "forward-noised"}
    path: list = []
    final = resample(model, query, trajectory=path)[None]
    chosen = sorted({min(range(len(path)), key=lambda i: abs(path[i][0] - t)) for t in targets})
    error = float((final[0].cpu().double() - query.image.double()).abs().max())
    return [(path[i][0], path[i][1][0]) for i in chosen], {"trajectory": "regenerated", "regeneration_error": error}


@register
class JourneyTrak(Trak):
    """TRAK scores of x̂0 along the query's sampling trajectory, averaged over steps and models."""

    name = "journey-trak"
    Config = JourneyTrakConfig

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.trajectory_stats: dict = {}

    def windows(self) -> list[tuple[int, int]]:
        total, bins = self.model.num_train_timesteps, self.cfg.num_bins
        return [(b * total // bins, (b + 1) * total // bins) for b in range(bins)]

    def query_rows(self, query: Query) -> tuple[Rows, list[tuple[int, float]]]:
        model, cfg = self.model, self.cfg
        targets = window_timesteps(cfg.query_steps, 0, model.num_train_timesteps)
        states, self.trajectory_stats = trajectory_states(model, query, targets, cfg.seed)
        steps = torch.tensor([t for t, _ in states], device=model.device)
        guidance = float(query.extra.get("guidance_scale", 1.0))
        x0 = predicted_x0(
            model, torch.stack([x for _, x in states]), steps, query.text[:1].to(model.device, model.dtype), guidance
        )
        rows = Rows(
            x0.cpu(),
            query.text[None].expand(len(states), -1, -1, -1),
            steps.cpu()[:, None],
            [(STEP_ROLE, query.key, int(t)) for t in steps],
            cfg.query_draws,
        )
        bins = [next(b for b, (lo, hi) in enumerate(self.windows()) if lo <= int(t) < hi) for t in steps]
        return rows, [(b, 1.0 / len(states)) for b in bins]

    def score_flips(self, query: Query) -> tuple:
        scores, stats = super().score_flips(query)
        return scores, stats | self.trajectory_stats
