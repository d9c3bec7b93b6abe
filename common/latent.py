"""Latent diffusion models: a UNet on VAE latents, conditioned by a CLIP text encoder.

The MSCOCO model (SD2's VAE and text encoder around a 128-px UNet) and Stable Diffusion (v1.4, for
the customized-model benchmark) share everything but the denoiser and its schedule: the VAE, the
text encoder and the tokenizer come from one source, a hub id or a local folder laid out like a
diffusers pipeline (``vae/``, ``text_encoder/``, ``tokenizer/``), loaded on first use. Latents are
stored and used multiplied by the VAE's scaling factor, as in Stable Diffusion's training.
"""

from __future__ import annotations

from pathlib import Path

import torch

from common.errors import AttributionError, first_line, require
from common.model import DiffusionModel, set_token_embedding


def require_source(source: str | Path, what: str) -> None:
    """A source that names a local folder (absolute, relative with ./, or deeper than owner/name) must exist."""
    text = str(source)
    local = text.startswith(("/", ".", "~")) or len(Path(text).parts) > 2
    require(Path(text).exists() or not local, f"missing {what}: {text}")


class LatentDiffusionModel(DiffusionModel):
    """A denoiser on scaled VAE latents with a CLIP text encoder; the components load on demand.

    Subclasses set ``unet`` and ``scheduler`` and call :meth:`set_components`.

    Attributes:
        components: hub id or folder holding ``vae/``, ``text_encoder/`` and ``tokenizer/`` (None: none).
        components_hint: appended to the error when a component cannot be loaded.
    """

    text_length = 77
    components_hint = ""

    def set_components(self, components: str | Path | None, vae=None, text_encoder=None, tokenizer=None) -> None:
        self.components = str(components) if components is not None else None
        self._vae, self._text_encoder, self._tokenizer = vae, text_encoder, tokenizer

    def _component(self, subfolder: str):
        """Load ``vae``, ``text_encoder`` or ``tokenizer`` from ``self.components``; one line naming the source."""
        require(
            self.components is not None,
            f"this model has no {subfolder} (pass components: a hub id or folder with {subfolder}/)",
        )
        require_source(self.components, "components folder (vae/, text_encoder/, tokenizer/)")
        try:
            if subfolder == "vae":
                from diffusers import AutoencoderKL

                return AutoencoderKL.from_pretrained(self.components, subfolder=subfolder).eval().to(self.device)
            if subfolder == "text_encoder":
                from transformers import CLIPTextModel

                return CLIPTextModel.from_pretrained(self.components, subfolder=subfolder).eval().to(self.device)
            from transformers import CLIPTokenizer

            return CLIPTokenizer.from_pretrained(self.components, subfolder=subfolder)
        except (OSError, ValueError) as err:
            raise AttributionError(
                f"cannot load the {subfolder} from {self.components!r} ({first_line(err)}){self.components_hint}"
            ) from None

    @property
    def vae(self):
        if self._vae is None:
            self._vae = self._component("vae")
        return self._vae

    @property
    def text_encoder(self):
        if self._text_encoder is None:
            self._text_encoder = self._component("text_encoder")
        return self._text_encoder

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = self._component("tokenizer")
        return self._tokenizer

    def token_ids(self, captions: list[str]) -> torch.Tensor:
        """Token ids (B,77), padded to the full length (as SD's training)."""
        return self.tokenizer(
            captions, padding="max_length", max_length=self.text_length, truncation=True, return_tensors="pt"
        ).input_ids

    def has_token(self, token: str) -> bool:
        return token in self.tokenizer.get_vocab()

    def token_row(self, token: str) -> int:
        return int(self.tokenizer.convert_tokens_to_ids(token))

    def add_token(self, token: str, embedding: torch.Tensor) -> None:
        require(not self.has_token(token), f"token {token!r} already exists in the tokenizer")
        self.tokenizer.add_tokens(token)
        set_token_embedding(self.text_encoder, len(self.tokenizer), self.token_row(token), embedding)

    @torch.no_grad()
    def encode_text(self, captions: list[str], batch_size: int = 64) -> torch.Tensor:
        """Conditions (B,77,D): ``last_hidden_state`` of the padded tokens, no attention mask (as SD's training)."""
        encoder = self.text_encoder
        device = next(encoder.parameters()).device
        out = [
            encoder(input_ids=self.token_ids(captions[i : i + batch_size]).to(device)).last_hidden_state.float().cpu()
            for i in range(0, len(captions), batch_size)
        ]
        return torch.cat(out) if out else torch.empty(0, self.text_length, self.unet.config.cross_attention_dim)

    @torch.no_grad()
    def decode(self, x: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        """Pixels in [-1, 1] (B,3,H,W) from scaled latents (B,4,h,w) through the VAE."""
        vae = self.vae
        device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
        scale = float(vae.config.scaling_factor)
        out = [
            vae.decode(x[i : i + batch_size].to(device=device, dtype=dtype) / scale).sample.float().clamp(-1, 1).cpu()
            for i in range(0, len(x), batch_size)
        ]
        return torch.cat(out)

    @torch.no_grad()
    def encode_images(
        self, pixels: torch.Tensor, generator: torch.Generator | None = None, batch_size: int = 16
    ) -> torch.Tensor:
        """Scaled latents (B,4,h,w) float32 on the CPU from pixels in [-1, 1] (B,3,H,W).

        With ``generator`` a sample of the VAE's posterior (as Stable Diffusion's training and the
        AbC release encode images), drawn on the CPU image by image, so any device and batch size
        give the same latents; without, its mean.
        """
        vae = self.vae
        device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
        scale = float(vae.config.scaling_factor)
        out = []
        for i in range(0, len(pixels), batch_size):
            dist = vae.encode(pixels[i : i + batch_size].to(device=device, dtype=dtype)).latent_dist
            z = dist.mean.float().cpu()
            if generator is not None:
                eps = torch.stack([torch.randn(z.shape[1:], generator=generator) for _ in z])  # any batch size
                z = z + dist.std.float().cpu() * eps
            out.append(z * scale)
        return torch.cat(out)
