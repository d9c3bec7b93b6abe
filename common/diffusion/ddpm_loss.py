"""Per-sample DDPM losses with explicit noise and timesteps.

Randomness is an argument: callers pass ``noise`` and ``timesteps`` (drawn with
:mod:`common.keyed_random`), so the same sample gets the same loss in any batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# eps = denoiser(x_t, t, text) with x_t (B,C,H,W), t (B,), text (B,L,D)
Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def unet_denoiser(unet: torch.nn.Module) -> Denoiser:
    """Adapt a diffusers ``UNet2DConditionModel`` (epsilon prediction) to the :data:`Denoiser` call."""

    def denoise(x_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return unet(x_t, t, encoder_hidden_states=text, return_dict=False)[0]

    return denoise


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Forward diffusion ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps``.

    Args:
        x0: clean samples (B,C,H,W).
        noise: standard normal noise (B,C,H,W).
        t: integer timesteps (B,).
        alphas_cumprod: cumulative alpha products (T,).
    """
    a = alphas_cumprod.to(device=x0.device, dtype=x0.dtype)[t].view(-1, *([1] * (x0.dim() - 1)))
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def per_sample_loss(
    denoise: Denoiser,
    x0: torch.Tensor,
    text: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    alphas_cumprod: torch.Tensor,
) -> torch.Tensor:
    """Epsilon-prediction MSE of each sample, averaged over its pixels.

    Args:
        denoise: the model.
        x0: clean samples (B,C,H,W).
        text: text conditions (B,L,D).
        t: timesteps (B,).
        noise: the noise added to each sample (B,C,H,W).
        alphas_cumprod: the training noise schedule (T,).
    Returns:
        Losses (B,).
    """
    x_t = add_noise(x0, noise, t, alphas_cumprod)
    eps = denoise(x_t, t, text)
    dtype = torch.promote_types(eps.dtype, torch.float32)  # half-precision models still get a float32 loss
    return (eps.to(dtype) - noise.to(dtype)).pow(2).flatten(1).mean(1)


def strided_timesteps(num: int, num_train_timesteps: int = 1000, first: int = 0) -> list[int]:
    """``num`` evenly strided timesteps ``first, first + T/num, ...`` (paper: 0, 50, ..., 950 for 20)."""
    if num < 1 or num > num_train_timesteps or num_train_timesteps % num:
        raise ValueError(f"num_timesteps must divide {num_train_timesteps}, got {num}")
    stride = num_train_timesteps // num
    if not 0 <= first < stride:
        raise ValueError(f"first_timestep must lie in [0, {stride}), got {first}")
    return list(range(first, num_train_timesteps, stride))
