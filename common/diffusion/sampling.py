"""Seeded sampling from a denoiser, so a query can be regenerated from its saved noise and seed.

The default is DDPM ancestral sampling over all training steps (the paper's MSCOCO sampler).
Each image's step noise comes from its own generator keyed by ``(seed, image key)``, so an image
regenerates identically in any batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from tqdm.auto import tqdm

from common import keyed_random
from common.diffusion.loss import unet_denoiser
from common.model import DiffusionModel

SAMPLERS = ("ddpm", "ddim")


@torch.no_grad()
def sample(
    model: DiffusionModel,
    text: torch.Tensor,
    noise: torch.Tensor,
    keys: Sequence[int],
    seed: int = 0,
    sampler: str = "ddpm",
    num_steps: int = 1000,
    guidance_scale: float = 1.0,
    progress: bool = True,
    trajectory: list | None = None,
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
    Returns:
        Samples (B,C,H,W) as the sampler leaves them: with the schedulers' default ``clip_sample`` the
        last step returns the clipped x0 prediction; nothing else clamps them (latents have their own range).
    """
    train_scheduler = model.scheduler
    denoise = unet_denoiser(model.unet)
    null_text = model.null_text().to(text) if guidance_scale != 1.0 else None
    if sampler == "ddim":
        scheduler = DDIMScheduler.from_config(
            train_scheduler.config, set_alpha_to_one=True, timestep_spacing="trailing"
        )
        extra = {"eta": 0.0}
    elif sampler == "ddpm":
        scheduler = DDPMScheduler.from_config(train_scheduler.config)
        gens = [keyed_random.generator(seed, keyed_random.SAMPLE, int(k)) for k in keys]
        extra = {"generator": gens}
    else:
        raise ValueError(f"unknown sampler {sampler!r}; choose from {SAMPLERS}")
    scheduler.set_timesteps(num_steps)
    x = noise
    for t in tqdm(scheduler.timesteps, desc=f"sample {len(x)}", leave=False, disable=not progress):
        tt = t.expand(len(x)).to(x.device)
        if trajectory is not None:
            trajectory.append((int(t), x.detach().clone()))
        if guidance_scale == 1.0:
            eps = denoise(x, tt, text)
        else:
            both = denoise(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([text, null_text.expand_as(text)]))
            cond, uncond = both.chunk(2)
            eps = uncond + guidance_scale * (cond - uncond)
        x = scheduler.step(eps, t, x, **extra).prev_sample
    return x
