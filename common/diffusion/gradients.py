"""Per-sample gradients of a diffusion output for a subset of a model's parameters (torch.func).

Two output functions: ``loss``, the training loss ‖ε_θ(x_t, t, c) − ε‖² (mean over pixels), and
``square``, ‖ε_θ(x_t, t, c)‖² (mean over pixels), D-TRAK's choice.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.func import functional_call, grad, vmap

from common.diffusion.ddpm_loss import add_noise, per_sample_loss
from common.errors import require
from common.model import DiffusionModel

OUTPUTS = ("loss", "square")


def _output(eps: torch.Tensor, noise: torch.Tensor, output: str) -> torch.Tensor:
    dtype = torch.promote_types(eps.dtype, torch.float32)
    target = noise.to(dtype) if output == "loss" else 0.0
    return (eps.to(dtype) - target).pow(2).flatten(1).mean(1)


def per_sample_gradients(
    model: DiffusionModel,
    names: Sequence[str],
    x0: torch.Tensor,
    text: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    output: str = "loss",
) -> dict[str, torch.Tensor]:
    """Gradient of each sample's output with respect to the named parameters.

    Args:
        model: the model (its UNet is differentiated functionally; its own parameters are untouched).
        names: parameter names to differentiate.
        x0: clean samples (B,C,H,W); text (B,L,D); t (B,); noise (B,C,H,W).
        output: ``loss`` or ``square`` (see the module docstring).
    Returns:
        name -> gradients (B, *param.shape).
    """
    require(output in OUTPUTS, f"unknown output function {output!r}; choose from {', '.join(OUTPUTS)}")
    unet, alphas = model.unet, model.alphas_cumprod
    params = dict(unet.named_parameters())
    selected = {n: params[n].detach() for n in names}

    def one(p: dict[str, torch.Tensor], x: torch.Tensor, c: torch.Tensor, tt: torch.Tensor, e: torch.Tensor):
        x_t = add_noise(x[None], e[None], tt[None], alphas)
        eps = functional_call(unet, p, (x_t, tt[None]), {"encoder_hidden_states": c[None], "return_dict": False})[0]
        return _output(eps, e[None], output)[0]

    return vmap(grad(one), in_dims=(None, 0, 0, 0, 0))(selected, x0, text, t, noise)


def mean_gradient(
    model: DiffusionModel,
    names: Sequence[str],
    x0: torch.Tensor,
    text: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Gradient of the batch-mean training loss with respect to the named parameters (ordinary autograd)."""
    unet = model.unet
    params = dict(unet.named_parameters())
    selected = [params[n] for n in names]
    flags = [p.requires_grad for p in selected]
    for p in selected:
        p.requires_grad_(True)
    try:

        def denoise(x_t, t_, c_):
            return unet(x_t, t_, encoder_hidden_states=c_, return_dict=False)[0]

        loss = per_sample_loss(denoise, x0, text, t, noise, model.alphas_cumprod).mean()
        grads = torch.autograd.grad(loss, selected)
    finally:
        for p, flag in zip(selected, flags):
            p.requires_grad_(flag)
    return dict(zip(names, grads))
