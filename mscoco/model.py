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

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from common.errors import AttributionError, first_line, require, require_file
from common.model import DiffusionModel, load_state, read_pickle, read_safetensors

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
TEXT_LENGTH = 77


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


def require_source(source: str | Path, what: str) -> None:
    """A source that names a local folder (absolute, relative with ./, or deeper than owner/name) must exist."""
    text = str(source)
    local = text.startswith(("/", ".", "~")) or len(Path(text).parts) > 2
    require(Path(text).exists() or not local, f"missing {what}: {text}")


class MscocoModel(DiffusionModel):
    """The released MSCOCO UNet with its DDPM schedule; SD2's VAE and text encoder loaded on demand.

    Args:
        unet: the denoiser (see :func:`load_unet`).
        components: hub id or folder holding ``vae/``, ``text_encoder/`` and ``tokenizer/``.
        vae, text_encoder, tokenizer: already loaded components (instead of ``components``).
    """

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
        self.components = str(components) if components is not None else None
        self._vae, self._text_encoder, self._tokenizer = vae, text_encoder, tokenizer

    @classmethod
    def load(cls, unet: str | Path, components: str | Path | None = DEFAULT_COMPONENTS) -> MscocoModel:
        return cls(load_unet(unet), components)

    def _component(self, kind: str, subfolder: str):
        """Load a component from ``self.components`` with a one-line error naming the source."""
        require(
            self.components is not None,
            f"this MSCOCO model has no {subfolder} (pass components: a hub id or folder with {subfolder}/)",
        )
        require_source(self.components, "components folder (vae/, text_encoder/, tokenizer/)")
        try:
            if kind == "vae":
                from diffusers import AutoencoderKL

                return AutoencoderKL.from_pretrained(self.components, subfolder=subfolder).eval().to(self.device)
            if kind == "text_encoder":
                from transformers import CLIPTextModel

                return CLIPTextModel.from_pretrained(self.components, subfolder=subfolder).eval().to(self.device)
            from transformers import CLIPTokenizer

            return CLIPTokenizer.from_pretrained(self.components, subfolder=subfolder)
        except (OSError, ValueError) as err:
            raise AttributionError(
                f"cannot load the {subfolder} from {self.components!r} ({first_line(err)}); the SD2 repositories "
                "were withdrawn from the Hugging Face Hub in late 2025: pass a local copy or a mirror as components"
            ) from None

    @property
    def vae(self):
        if self._vae is None:
            self._vae = self._component("vae", "vae")
        return self._vae

    @torch.no_grad()
    def encode_text(self, captions: list[str], batch_size: int = 64) -> torch.Tensor:
        """SD2 conditions (B,77,1024): ``last_hidden_state`` of the padded tokens, no attention mask."""
        if self._tokenizer is None:
            self._tokenizer = self._component("tokenizer", "tokenizer")
        if self._text_encoder is None:
            self._text_encoder = self._component("text_encoder", "text_encoder")
        encoder = self._text_encoder
        device = next(encoder.parameters()).device
        out = []
        for i in range(0, len(captions), batch_size):
            ids = self._tokenizer(
                captions[i : i + batch_size],
                padding="max_length",
                max_length=TEXT_LENGTH,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            out.append(encoder(input_ids=ids.to(device)).last_hidden_state.float().cpu())
        return torch.cat(out) if out else torch.empty(0, TEXT_LENGTH, self.unet.config.cross_attention_dim)

    @torch.no_grad()
    def decode(self, x: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        """Pixels in [-1, 1] (B,3,128,128) from scaled latents (B,4,16,16) through the VAE."""
        vae = self.vae
        device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
        scale = float(vae.config.scaling_factor)
        out = [
            vae.decode(x[i : i + batch_size].to(device=device, dtype=dtype) / scale).sample.float().clamp(-1, 1).cpu()
            for i in range(0, len(x), batch_size)
        ]
        return torch.cat(out)
