"""The model contract: what any benchmark's text-to-image model gives the library.

kronfluence asks its users for a small ``Task``; this library asks each benchmark (tiny, MSCOCO,
Stable Diffusion) for one :class:`DiffusionModel`: the denoiser, its noise schedule, text encoding,
decoding a model input to viewable pixels, a fingerprint, and getting ready for per-sample
gradients. Library functions take the contract, never a benchmark's type or a loose schedule, and
the number of diffusion steps comes from the model (settings are checked against it).
"""

from __future__ import annotations

import abc
import copy
from pathlib import Path

import torch
from diffusers import DDPMScheduler

from common.errors import AttributionError, require
from common.files import read_json
from common.fingerprints import module_fingerprint


def use_classic_attention(unet: torch.nn.Module) -> None:
    """Switch diffusers attention to the plain-matmul processor.

    ``torch.func.vmap`` has no batching rule for scaled-dot-product attention on CPU and falls
    back to a slow per-sample loop; the classic processor computes the same thing with batched
    matmuls that vmap handles.
    """
    if hasattr(unet, "set_attn_processor"):
        from diffusers.models.attention_processor import AttnProcessor

        unet.set_attn_processor(AttnProcessor())


class DiffusionModel(abc.ABC):
    """An epsilon-prediction text-to-image diffusion model, as the library uses it.

    Attributes:
        unet: a diffusers ``UNet2DConditionModel`` (or any module with its call signature).
        scheduler: the DDPM scheduler the model was trained with.
        flips: whether training used random horizontal flips. When true, every method scores a
            training image as itself and flipped and keeps the max (the paper's setting); when
            false only the original orientation is scored.
        token: the new token a customized model learned (None for a base model).
        pixel_space: its inputs are pixels in [-1, 1] (not latents): a query outside the range is refused.
    """

    unet: torch.nn.Module
    scheduler: DDPMScheduler
    flips: bool = True
    token: str | None = None  # a customized model's new token (e.g. "<new1>")
    pixel_space: bool = False

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """Cumulative products of the noise schedule (T,)."""
        return self.scheduler.alphas_cumprod

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape (C,H,W) of one model input (pixels or latents), from the UNet's config."""
        config = self.unet.config
        size = config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return (int(config.in_channels), int(height), int(width))

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @abc.abstractmethod
    def encode_text(self, captions: list[str]) -> torch.Tensor:
        """Text conditions (B,L,D), float32 on the CPU."""

    def null_text(self) -> torch.Tensor:
        """The empty caption's condition (L,D): the unconditional input of classifier-free guidance."""
        return self.encode_text([""])[0]

    @abc.abstractmethod
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Viewable pixels in [-1, 1] (B,3,H,W) float32 from model inputs (B,C,h,w) (identity in pixel space)."""

    # The text side, for models that can learn a new token (customization): ``text_encoder`` is a
    # transformers CLIP text model fed the ids of :meth:`token_ids`.
    def token_ids(self, captions: list[str]) -> torch.Tensor:
        """Token ids (B,L) of ``captions``, as :meth:`encode_text` feeds them to ``text_encoder``."""
        raise AttributionError(f"{type(self).__name__} has no tokenizer that can learn a new token")

    def has_token(self, token: str) -> bool:
        """Whether ``token`` is already one piece of the vocabulary."""
        raise AttributionError(f"{type(self).__name__} has no tokenizer that can learn a new token")

    def token_row(self, token: str) -> int:
        """The row of ``token`` in the text encoder's input embeddings."""
        raise AttributionError(f"{type(self).__name__} has no tokenizer that can learn a new token")

    def add_token(self, token: str, embedding: torch.Tensor) -> None:
        """Add ``token`` to the vocabulary and its input ``embedding`` (D,) to ``text_encoder``."""
        raise AttributionError(f"{type(self).__name__} has no tokenizer that can learn a new token")

    def fingerprint(self) -> str:
        """Identifies the denoiser's weights (for caches and rankings)."""
        return module_fingerprint(self.unet)

    def with_unet(self, unet: torch.nn.Module) -> DiffusionModel:
        """The same model (schedule, text encoder, decoder) around another denoiser, e.g. an unlearned copy."""
        other = copy.copy(self)
        other.unet = unet
        return other

    def prepare_for_gradients(self, device: torch.device | str | None = None) -> DiffusionModel:
        """Frozen, eval mode, on ``device``, with an attention processor that ``torch.func.vmap`` can batch."""
        if device is not None:
            self.unet.to(device)
        use_classic_attention(self.unet)
        self.unet.requires_grad_(False).eval()
        return self

    def check_timesteps(self, value: int, what: str) -> None:
        """Refuse a setting that needs more diffusion steps than the model has."""
        require(
            1 <= value <= self.num_train_timesteps,
            f"{what} = {value} does not fit the model's {self.num_train_timesteps} diffusion steps",
        )


def set_token_embedding(text_encoder, vocab_size: int, row: int, embedding: torch.Tensor) -> None:
    """Grow a transformers text encoder's input embeddings to ``vocab_size`` rows; set ``row`` to ``embedding`` (D,)."""
    text_encoder.resize_token_embeddings(vocab_size, mean_resizing=False)  # the row is set right after
    table = text_encoder.get_input_embeddings()
    with torch.no_grad():
        table.weight[row] = embedding.to(table.weight)


def read_model_json(path: str | Path) -> dict:
    """A model's JSON description; a missing or broken file is one line naming it."""
    info = read_json(path, "model config", "copy it again or retrain")
    require(isinstance(info, dict), f"{path} is damaged (expected a JSON object)")
    return info


def state_mismatch(module: torch.nn.Module, state: dict[str, torch.Tensor], strict: bool = True) -> str | None:
    """How ``state`` differs from ``module``'s weights, in a few words (counts and one example of each kind); None
    when it fits."""
    own = module.state_dict()
    missing = [k for k in own if k not in state] if strict else []
    unexpected = [k for k in state if k not in own] if strict else []
    shapes = [k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} of the model's {len(own)} weights missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} of its {len(state)} tensors unknown to the model (e.g. {unexpected[0]})")
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} of other shapes (e.g. {k}: {tuple(state[k].shape)}, the model's "
                     f"{tuple(own[k].shape)})")  # fmt: skip
    return "; ".join(parts) or None


def load_state(module: torch.nn.Module, state: dict[str, torch.Tensor], path: str | Path, strict: bool = True) -> None:
    """``module.load_state_dict`` with a one-line error naming the file when the tensors do not fit: how many weights
    are missing, unknown or of other shapes, with one example each (not every key)."""
    problem = state_mismatch(module, state, strict)
    if problem is not None:
        raise AttributionError(f"{path} does not fit this architecture: {problem}")
    try:
        module.load_state_dict(state, strict=strict)
    except RuntimeError as err:
        raise AttributionError(f"{path} does not fit this architecture ({str(err).splitlines()[0][:120]})") from None
