"""Stable Diffusion v1.4 and the Custom Diffusion models of the AbC benchmark.

The base model loads from a hub id (``CompVis/stable-diffusion-v1-4``) or a local folder laid out
like a diffusers pipeline (``unet/``, ``scheduler/``, ``vae/``, ``text_encoder/``, ``tokenizer/``).
A Custom Diffusion model is two files in a folder, as the authors' release stores them:

- ``pytorch_custom_diffusion_weights.pt``: the fine-tuned cross-attention key/value weights, a state
  dict under the UNet's own parameter names (``...attn2.to_k.weight``); diffusers' attention-processor
  names (``...attn2.processor.to_k_custom_diffusion.weight``) are read too. The authors load it
  non-strictly, which would silently skip a misnamed key; here every key must be a UNet weight.
- ``<new1>.bin``: ``{token: embedding (D,)}``, the new token's input embedding, added to the
  tokenizer and the text encoder (a token the tokenizer already has is refused).

Both are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from common.diffusion.selection import select_parameters
from common.errors import AttributionError, first_line, require
from common.files import read_pickle
from common.latent import LatentDiffusionModel, require_source
from common.model import DiffusionModel, load_state

SD_V14 = "CompVis/stable-diffusion-v1-4"
CUSTOM_WEIGHTS = "pytorch_custom_diffusion_weights.pt"
TOKEN_FILE = "<new1>.bin"


class StableDiffusionModel(LatentDiffusionModel):
    """Stable Diffusion's UNet and training schedule; VAE, text encoder and tokenizer from the same source.

    Args:
        unet: the denoiser.
        scheduler: its DDPM training schedule (SD v1.4: 1,000 steps, scaled-linear betas 0.00085-0.012).
        components: hub id or folder with ``vae/``, ``text_encoder/`` and ``tokenizer/``.
    """

    def __init__(self, unet: UNet2DConditionModel, scheduler: DDPMScheduler, components: str | Path | None) -> None:
        self.unet = unet
        self.scheduler = scheduler
        self.flips = True  # SD's training flips; the paper scores both orientations and keeps the max
        self.set_components(components)

    @classmethod
    def load(cls, source: str | Path = SD_V14, device: torch.device | str = "cpu") -> StableDiffusionModel:
        """The base model from a hub id or a pipeline folder; one line naming the source when it cannot load."""
        require_source(source, "Stable Diffusion folder")
        try:
            unet = UNet2DConditionModel.from_pretrained(str(source), subfolder="unet")
            scheduler = DDPMScheduler.from_pretrained(str(source), subfolder="scheduler")
        except (OSError, ValueError) as err:
            raise AttributionError(f"cannot load Stable Diffusion from {str(source)!r} ({first_line(err)})") from None
        return cls(unet.eval().to(device), scheduler, source)

    def with_custom(self, folder: str | Path) -> StableDiffusionModel:
        """This base model customized by the Custom Diffusion model in ``folder`` (see :func:`apply_custom`)."""
        return apply_custom(self, folder)


def apply_custom(model: DiffusionModel, folder: str | Path) -> DiffusionModel:
    """``model`` customized by the Custom Diffusion model in ``folder``: its two files applied, all checked first.

    The UNet's K/V weights and the text encoder's embeddings change in place: load a fresh base model
    for each customized one. Sets ``model.token`` to the new token.
    """
    folder = Path(folder)
    require(folder.is_dir(), f"missing Custom Diffusion folder {folder}")
    for name in (CUSTOM_WEIGHTS, TOKEN_FILE):
        require((folder / name).is_file(), f"Custom Diffusion folder {folder} lacks {name}")
    state = unet_names(read_pickle(folder / CUSTOM_WEIGHTS, "Custom Diffusion weights"))
    own = model.unet.state_dict()
    unknown = sorted(set(state) - set(own))
    require(
        not unknown, f"{folder / CUSTOM_WEIGHTS} has {len(unknown)} key(s) the UNet does not have, e.g. {unknown[:1]}"
    )
    missing = sorted(set(select_parameters(model.unet, "cross-attn-kv")) - set(state))
    require(
        not missing,
        f"{folder / CUSTOM_WEIGHTS} lacks {len(missing)} of the cross-attention K/V weights, e.g. {missing[:1]}",
    )
    for key in (k for k, v in state.items() if v.shape != own[k].shape):
        raise AttributionError(
            f"{folder / CUSTOM_WEIGHTS}: {key} is {tuple(state[key].shape)}, the UNet's is {tuple(own[key].shape)}"
        )
    token, embedding = read_token(folder / TOKEN_FILE, model)  # checked before anything changes
    dtype = next(model.unet.parameters()).dtype
    load_state(model.unet, {k: v.to(dtype) for k, v in state.items()}, folder / CUSTOM_WEIGHTS, strict=False)
    model.add_token(token, embedding)
    model.token = token
    return model


def unet_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys of diffusers' Custom Diffusion processors renamed to the UNet parameters they replace."""
    pattern = re.compile(r"\.processor\.(to_[kv])_custom_diffusion\.")
    return {pattern.sub(r".\1.", k): v for k, v in state.items()}


def read_token(path: Path, model: DiffusionModel) -> tuple[str, torch.Tensor]:
    """The new token and its embedding from a ``{token: embedding (D,)}`` file, checked against ``model``'s text."""
    entry = read_pickle(path, "token embedding")
    require(len(entry) == 1, f"{path} should hold one token's embedding, not {len(entry)}")
    ((token, embedding),) = entry.items()
    width = model.text_encoder.get_input_embeddings().embedding_dim
    require(
        embedding.shape == (width,),
        f"{path}: embedding of shape {tuple(embedding.shape)} for a text encoder of width {width}",
    )
    require(not model.has_token(token), f"{path}: token {token!r} already exists in the tokenizer")
    return token, embedding


def save_custom(model: DiffusionModel, folder: str | Path, selection: str = "cross-attn-kv") -> None:
    """Write ``model``'s fine-tuned weights and new token (``model.token``) as the release's two files."""
    token = getattr(model, "token", None)
    require(token is not None, "the model has no new token to save")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    params = dict(model.unet.named_parameters())
    torch.save({n: params[n].detach().cpu().clone() for n in select_parameters(model.unet, selection)},
               folder / CUSTOM_WEIGHTS)  # fmt: skip
    row = model.text_encoder.get_input_embeddings().weight[model.token_row(token)]
    torch.save({token: row.detach().cpu().clone()}, folder / TOKEN_FILE)
