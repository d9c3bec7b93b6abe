"""The MSCOCO model: JourneyTRAK's 128-px latent text-to-image UNet, decoded by SD2's VAE.

The denoiser is the UNet the authors released (``model.bin``, a plain diffusers state dict, trained
on COCO 2017 at 128 px by the JourneyTRAK authors). It works on SD2's 4×16×16 VAE latents, stored
already multiplied by the VAE's scaling factor (0.18215), and is conditioned on SD2's text encoder
(OpenCLIP ViT-H/14's text tower up to its penultimate layer, then the final layer norm; 77 tokens,
1,024 wide). The noise schedule is diffusers' ``DDPMScheduler(num_train_timesteps=1000)`` with its
defaults (linear betas 1e-4 to 0.02, ``clip_sample=True``), as in the original code.

The VAE and text encoder are only needed to look at images and to encode new prompts: scoring uses
the released latents and text embeddings. They load on first use from ``components`` (a hub id or a
local folder with ``vae/``, ``text_encoder/`` and ``tokenizer/`` sub-folders). The SD2 repositories
were withdrawn from the Hugging Face Hub in late 2025, so the default may not resolve: point
``components`` at a local copy or a mirror (e.g. ``Manojb/stable-diffusion-2-1-base``, which the
authors' follow-up uses).
"""

from __future__ import annotations

import json
from pathlib import Path

from diffusers import DDPMScheduler, UNet2DConditionModel

from common.errors import AttributionError, first_line, require_file
from common.files import read_pickle, read_safetensors
from common.latent import LatentDiffusionModel, require_source
from common.model import load_state

# The UNet of the original code (AbU mscoco/models/diffusion/mscoco_t2i.py; JourneyTRAK examples/utils.py).
UNET_CONFIG = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (128, 256, 256, 256),
    "cross_attention_dim": 1024,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "attention_head_dim": 8,  # read by diffusers as 8 heads
}
NUM_TRAIN_TIMESTEPS = 1000
DEFAULT_COMPONENTS = "stabilityai/stable-diffusion-2"


def build_unet(**overrides) -> UNet2DConditionModel:
    """The MSCOCO UNet (random init); ``overrides`` change the config (small widths for tests)."""
    return UNet2DConditionModel(**(UNET_CONFIG | overrides))


def load_unet(source: str | Path) -> UNet2DConditionModel:
    """The denoiser from the release's ``model.bin``, a ``.safetensors`` file, a diffusers folder or a hub id.

    A weights file is loaded strictly into the paper's architecture, or into the one described by a
    diffusers ``config.json`` beside it. Pickles load with ``weights_only=True``: nothing in a data
    file is executed. A missing, partial or mismatched file is one line naming it.
    """
    path = Path(source)
    if path.is_file() or path.suffix in (".bin", ".pt", ".pth", ".safetensors"):
        require_file(path, "UNet weights")
        config = path.parent / "config.json"
        unet = UNet2DConditionModel.from_config(json.loads(config.read_text())) if config.exists() else build_unet()
        state = (
            read_safetensors(path, "UNet weights")
            if path.suffix == ".safetensors"
            else read_pickle(path, "UNet weights")
        )
        load_state(unet, {k: v.float() for k, v in state.items()}, path)
        return unet.eval()
    require_source(source, "UNet folder")
    try:
        is_folder = path.is_dir()
        subfolder = "unet" if is_folder and (path / "unet").is_dir() else None
        return UNet2DConditionModel.from_pretrained(str(source), subfolder=subfolder).eval()
    except (OSError, ValueError) as err:
        raise AttributionError(f"cannot load a UNet from {source!r} ({first_line(err)})") from None


class MscocoModel(LatentDiffusionModel):
    """The released MSCOCO UNet with its DDPM schedule; SD2's VAE and text encoder loaded on demand.

    Args:
        unet: the denoiser (see :func:`load_unet`).
        components: hub id or folder holding ``vae/``, ``text_encoder/`` and ``tokenizer/``.
        vae, text_encoder, tokenizer: already loaded components (instead of ``components``).
    """

    components_hint = (
        "; the SD2 repositories were withdrawn from the Hugging Face Hub in late 2025: pass a local copy or a mirror"
        " as components"
    )

    def __init__(
        self,
        unet: UNet2DConditionModel,
        components: str | Path | None = DEFAULT_COMPONENTS,
        vae=None,
        text_encoder=None,
        tokenizer=None,
    ) -> None:
        self.unet = unet
        self.scheduler = DDPMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS)
        self.flips = True
        self.set_components(components, vae, text_encoder, tokenizer)

    @classmethod
    def load(cls, unet: str | Path, components: str | Path | None = DEFAULT_COMPONENTS) -> MscocoModel:
        return cls(load_unet(unet), components)
