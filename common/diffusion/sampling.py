"""Seeded sampling from a denoiser, so a query can be regenerated from its saved noise and seed.

The default is DDPM ancestral sampling over all training steps (the paper's MSCOCO sampler).
Each image's step noise comes from its own generator keyed by ``(seed, image key)``, so an image
regenerates identically in any batch. Images made by a pipeline that drew all its noise for a whole
batch from one torch generator (the original release's queries: one CPU generator, a batch of 500)
are replayed exactly with a :class:`BatchStream`: the batch's noise is drawn whole, in the same
order, and only the rows being regenerated go through the denoiser.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, DDPMScheduler

from common import keyed_random
from common.data import Query
from common.diffusion.ddpm_loss import Denoiser, unet_denoiser
from common.errors import require
from common.model import DiffusionModel
from common.progress import progress_bar

SAMPLERS = ("ddpm", "ddim")


@dataclass(frozen=True)
class BatchStream:
    """The noise of a DDPM pipeline that drew it for a whole batch from one CPU ``torch.Generator``.

    Such a pipeline draws the initial noise of shape (batch_size, C, H, W) first, then one tensor of
    that shape per step with t > 0 (diffusers' ``DDPMScheduler.step``), all from the same generator;
    an image's noise therefore depends on the batch it was made in. Replaying the stream draws each
    tensor whole and keeps ``rows``.

    Attributes:
        seed: the generator's seed.
        batch_size: the batch the pipeline sampled (padding rows included).
        rows: the rows regenerated, one per image of :func:`sample`'s batch.
    """

    seed: int
    batch_size: int
    rows: tuple[int, ...]

    def __post_init__(self) -> None:
        rows = tuple(int(r) for r in self.rows)
        require(len(set(rows)) == len(rows), f"batch stream rows must be distinct, got {rows}")
        require(all(0 <= r < self.batch_size for r in rows), f"rows {rows} lie outside a batch of {self.batch_size}")
        object.__setattr__(self, "rows", rows)

    def start(self, shape: Sequence[int]) -> tuple[torch.Generator, torch.Tensor]:
        """A fresh generator and the rows' initial noise (rows, *shape), drawn as the pipeline drew it."""
        generator = torch.Generator().manual_seed(self.seed)
        noise = torch.randn((self.batch_size, *shape), generator=generator)
        return generator, noise[list(self.rows)]

    def initial_noise(self, shape: Sequence[int]) -> torch.Tensor:
        return self.start(shape)[1]


@torch.no_grad()
def sampling_scheduler(model: DiffusionModel, sampler: str, seed: int, keys: Sequence[int]) -> tuple[object, dict]:
    """The sampler's scheduler, on the model's training betas, and the extra arguments of its step: DDIM with
    eta = 0, or DDPM with one keyed generator per image (its step noise)."""
    if sampler == "ddim":
        config = model.scheduler.config
        return DDIMScheduler.from_config(config, set_alpha_to_one=True, timestep_spacing="trailing"), {"eta": 0.0}
    if sampler == "ddpm":
        generators = [keyed_random.generator(seed, keyed_random.Purpose.SAMPLE, int(k)) for k in keys]
        return DDPMScheduler.from_config(model.scheduler.config), {"generator": generators}
    raise ValueError(f"unknown sampler {sampler!r}; choose from {SAMPLERS}")


def guided_eps(
    denoise: Denoiser,
    x: torch.Tensor,
    t: torch.Tensor,
    text: torch.Tensor,
    null_text: torch.Tensor | None,
    guidance_scale: float,
) -> torch.Tensor:
    """The noise prediction (B,C,H,W) with classifier-free guidance ε_u + w (ε_c − ε_u), w = ``guidance_scale``:
    conditional and unconditional in one batch, as the sampler runs it (w = 1: conditional only, ``null_text``
    unused)."""
    if guidance_scale == 1.0:
        return denoise(x, t, text)
    both = denoise(torch.cat([x, x]), torch.cat([t, t]), torch.cat([text, null_text.expand_as(text)]))
    cond, uncond = both.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


@torch.no_grad()  # never differentiated: a text condition that requires grad would keep every step's graph
def sample(
    model: DiffusionModel,
    text: torch.Tensor,
    noise: torch.Tensor | None,
    keys: Sequence[int],
    seed: int = 0,
    sampler: str = "ddpm",
    num_steps: int = 1000,
    guidance_scale: float = 1.0,
    progress: bool = True,
    trajectory: list | None = None,
    stream: BatchStream | None = None,
) -> torch.Tensor:
    """Generate images (model inputs) from initial noise.

    Args:
        model: the model; its training scheduler's betas are reused.
        text: text conditions (B,L,D).
        noise: initial noise x_T (B,C,H,W).
        keys: one stable integer per image, keying its step noise (DDPM).
        seed: global seed of the step noise.
        sampler: ``ddpm`` (ancestral) or ``ddim`` (deterministic, eta = 0).
        num_steps: sampling steps.
        guidance_scale: classifier-free guidance weight w, eps = eps_u + w (eps_c - eps_u); 1 is none.
        trajectory: when a list, each step appends ``(t, x_t)``: the timestep and the samples (B,C,H,W)
            it started from (JourneyTRAK attributes along this path).
        stream: replay a batch-drawn noise stream instead (DDPM only): ``noise`` must then be None
            or equal the stream's initial rows, and ``keys`` and ``seed`` are unused.
    Returns:
        Samples (B,C,H,W) as the sampler leaves them: with the schedulers' default ``clip_sample`` the
        last step returns the clipped x0 prediction; nothing else clamps them (latents have their own range).
    """
    denoise = unet_denoiser(model.unet)
    null_text = model.null_text().to(text) if guidance_scale != 1.0 else None
    scheduler, extra = sampling_scheduler(model, sampler, seed, keys)
    if stream is not None:
        require(sampler == "ddpm", f"a batch noise stream replays DDPM sampling, not {sampler}")
        generator, initial = stream.start(model.input_shape)
        require(len(initial) == len(text), f"{len(stream.rows)} stream rows for {len(text)} images")
        require(
            noise is None or torch.allclose(noise.float().cpu(), initial),
            "the initial noise given differs from the stream's",
        )
        noise = initial.to(text.device, text.dtype)
    scheduler.set_timesteps(num_steps)
    x = noise
    for t in progress_bar(scheduler.timesteps, desc=f"sample {len(x)}", leave=False, disable=not progress):
        tt = t.expand(len(x)).to(x.device)
        if trajectory is not None:
            trajectory.append((int(t), x.detach().clone()))
        eps = guided_eps(denoise, x, tt, text, null_text, guidance_scale)
        if stream is None:
            x = scheduler.step(eps, t, x, **extra).prev_sample
        else:  # the step on the whole float32 batch, so the generator draws what the pipeline drew; other rows zeros
            rows = list(stream.rows)
            whole_eps, whole_x = (x.new_zeros((stream.batch_size, *x.shape[1:]), dtype=torch.float32) for _ in "ex")
            whole_eps[rows], whole_x[rows] = eps.float(), x.float()
            x = scheduler.step(whole_eps, t, whole_x, generator=generator).prev_sample[rows].to(x.dtype)
    return x


SAMPLER_DEFAULTS = {"seed": 0, "sampler": "ddpm", "num_steps": 1000, "guidance_scale": 1.0}


def query_stream(query: Query) -> BatchStream | None:
    """The batch noise stream a query was sampled in, as one row to replay, if it has one."""
    stream = query.stream
    return BatchStream(stream.seed, stream.batch_size, (stream.row,)) if stream is not None else None


def resample(model: DiffusionModel, query: Query, trajectory: list | None = None) -> torch.Tensor:
    """The query sampled again by ``model`` (C,H,W): its initial noise, prompt and sampler settings
    (``query.extra``: seed, sampler, num_steps, guidance_scale), replaying its batch stream when it has one."""
    stream = query_stream(query)
    require(stream is not None or query.noise is not None, f"query {query.id} has no saved initial noise (noise.npy)")
    settings = {k: query.extra.get(k, default) for k, default in SAMPLER_DEFAULTS.items()}
    return sample(
        model,
        query.text[:1].to(model.device, model.dtype),
        None if stream else query.noise[None].to(model.device, model.dtype),
        [query.key],
        **settings,
        progress=False,
        trajectory=trajectory,
        stream=stream,
    )[0]
