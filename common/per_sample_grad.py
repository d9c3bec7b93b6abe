"""Per-sample gradients of the diffusion loss for a subset of a model's parameters (torch.func)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.func import functional_call, grad, vmap

from common.diffusion import per_sample_loss


def use_classic_attention(model: torch.nn.Module) -> None:
    """Switch diffusers attention to the plain-matmul processor.

    ``torch.func.vmap`` has no batching rule for scaled-dot-product attention on CPU and falls
    back to a slow per-sample loop; the classic processor computes the same thing with batched
    matmuls that vmap handles.
    """
    if hasattr(model, "set_attn_processor"):
        from diffusers.models.attention_processor import AttnProcessor

        model.set_attn_processor(AttnProcessor())


def per_sample_gradients(
    model: torch.nn.Module,
    names: Sequence[str],
    x0: torch.Tensor,
    text: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    alphas_cumprod: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Gradient of each sample's loss with respect to the named parameters.

    Args:
        model: a diffusers ``UNet2DConditionModel`` (or any module with the same call).
        names: parameter names to differentiate.
        x0, text, t, noise: a batch as in :func:`common.diffusion.per_sample_loss`.
    Returns:
        name -> gradients (B, *param.shape).
    """
    params = dict(model.named_parameters())
    selected = {n: params[n].detach() for n in names}

    def loss_one(p: dict[str, torch.Tensor], x: torch.Tensor, c: torch.Tensor, tt: torch.Tensor, e: torch.Tensor):
        def denoise(x_t, t_, c_):
            return functional_call(model, p, (x_t, t_), {"encoder_hidden_states": c_, "return_dict": False})[0]

        return per_sample_loss(denoise, x[None], c[None], tt[None], e[None], alphas_cumprod)[0]

    return vmap(grad(loss_one), in_dims=(None, 0, 0, 0, 0))(selected, x0, text, t, noise)


def mean_gradient(
    model: torch.nn.Module,
    names: Sequence[str],
    x0: torch.Tensor,
    text: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    alphas_cumprod: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Gradient of the batch-mean loss with respect to the named parameters (ordinary autograd)."""
    params = dict(model.named_parameters())
    selected = [params[n] for n in names]
    flags = [p.requires_grad for p in selected]
    for p in selected:
        p.requires_grad_(True)
    try:

        def denoise(x_t, t_, c_):
            return model(x_t, t_, encoder_hidden_states=c_, return_dict=False)[0]

        loss = per_sample_loss(denoise, x0, text, t, noise, alphas_cumprod).mean()
        grads = torch.autograd.grad(loss, selected)
    finally:
        for p, flag in zip(selected, flags):
            p.requires_grad_(flag)
    return dict(zip(names, grads))
