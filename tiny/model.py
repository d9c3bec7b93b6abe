"""The tiny text-to-image model: a frozen random CLIP text encoder and a small pixel-space UNet.

The UNet has no attention at the top (16x16) resolution: attention there costs ~10x on a CPU.
Cross-attention (``attn2``) lives at 8x8 and 4x4 and in the middle block, so the paper's
weight selection (cross-attention keys and values) has the same meaning as in Stable Diffusion.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from common.errors import AttributionError, require
from common.files import read_safetensors
from common.model import DiffusionModel, load_state, read_model_json, set_token_embedding

# open_clip's BPE vocabulary (shipped inside the package, nothing downloaded).
VOCAB_SIZE = 49408
SOT, EOT = 49406, 49407


@dataclass
class TinyModelConfig:
    """Architecture of the tiny model."""

    resolution: int = field(default=16, metadata={"help": "image side in pixels"})
    channels: tuple[int, ...] = field(default=(16, 32, 64), metadata={"help": "UNet block widths"})
    layers_per_block: int = field(default=1, metadata={"help": "resnet layers per UNet block"})
    heads: int = field(default=2, metadata={"help": "attention heads"})
    text_dim: int = field(default=32, metadata={"help": "text embedding width"})
    text_layers: int = field(default=2, metadata={"help": "text encoder layers"})
    context_length: int = field(default=20, metadata={"help": "tokens per caption (longer ones are cut)"})
    num_train_timesteps: int = field(default=1000, metadata={"help": "DDPM steps"})
    beta_schedule: str = field(
        default="linear", metadata={"help": "noise schedule: linear (as the paper's models) or squaredcos_cap_v2"}
    )
    text_seed: int = field(default=1234, metadata={"help": "seed of the frozen random text encoder"})

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        if len(self.channels) < 2:
            raise AttributionError("the tiny UNet needs at least two blocks")
        if self.resolution % (2 ** (len(self.channels) - 1)):
            raise AttributionError(f"resolution {self.resolution} is not divisible by the UNet's downsampling")


def build_unet(cfg: TinyModelConfig) -> UNet2DConditionModel:
    n = len(cfg.channels)
    return UNet2DConditionModel(
        sample_size=cfg.resolution,
        in_channels=3,
        out_channels=3,
        block_out_channels=cfg.channels,
        layers_per_block=cfg.layers_per_block,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        cross_attention_dim=cfg.text_dim,
        attention_head_dim=cfg.heads,  # diffusers reads this as the number of heads here
        norm_num_groups=8,
    )


def build_text_encoder(cfg: TinyModelConfig) -> CLIPTextModel:
    """A randomly initialised, frozen CLIP text transformer (seeded, so it is reproducible)."""
    config = CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=cfg.text_dim,
        intermediate_size=4 * cfg.text_dim,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=2,
        max_position_embeddings=cfg.context_length,
        bos_token_id=SOT,
        eos_token_id=EOT,
        pad_token_id=0,
    )
    with torch.random.fork_rng():
        torch.manual_seed(cfg.text_seed)
        model = CLIPTextModel(config)
    return model.eval().requires_grad_(False)


def build_scheduler(cfg: TinyModelConfig) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule)


@functools.cache
def _bpe():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def tokenize(captions: list[str], context_length: int, added: Mapping[str, int] | None = None) -> torch.Tensor:
    """Token ids (B, context_length) from open_clip's offline BPE tokenizer.

    ``added`` maps new tokens (e.g. ``"<new1>"``) to their ids: each occurrence becomes that one id and
    the text around it is encoded as usual (without ``added`` this is open_clip's ``tokenize``).
    """
    bpe = _bpe()
    longest_first = sorted(added or (), key=len, reverse=True)  # "<new10>" before "<new1>"
    pattern = re.compile("(" + "|".join(re.escape(t) for t in longest_first) + ")") if added else None
    out = torch.zeros(len(captions), context_length, dtype=torch.long)
    for row, caption in enumerate(captions):
        pieces = pattern.split(caption) if pattern else [caption]
        ids = [i for p in pieces for i in ([added[p]] if added and p in added else bpe.encode(p))]
        ids = [SOT, *ids[: context_length - 2], EOT]  # cut as open_clip does: the end token stays
        out[row, : len(ids)] = torch.tensor(ids)
    return out


class TinyTextToImage(DiffusionModel):
    """The text encoder, UNet and noise schedule, saved and loaded together (pixel space: decoding is the identity).

    Args:
        flips: whether the model was trained with random horizontal flips (from its recipe).
    """

    pixel_space = True

    def __init__(
        self,
        cfg: TinyModelConfig,
        unet: UNet2DConditionModel | None = None,
        text_encoder: CLIPTextModel | None = None,
        flips: bool = True,
    ) -> None:
        self.cfg = cfg
        self.unet = unet if unet is not None else build_unet(cfg)
        self.text_encoder = text_encoder if text_encoder is not None else build_text_encoder(cfg)
        self.scheduler = build_scheduler(cfg)
        self.flips = flips
        self.added_tokens: dict[str, int] = {}  # new tokens (customization) and their embedding rows

    def token_ids(self, captions: list[str]) -> torch.Tensor:
        return tokenize(captions, self.cfg.context_length, self.added_tokens)

    def has_token(self, token: str) -> bool:
        words = _bpe().encoder
        return token in self.added_tokens or token in words or f"{token}</w>" in words

    def token_row(self, token: str) -> int:
        require(token in self.added_tokens, f"{token!r} is not a token added to this model")
        return self.added_tokens[token]

    def add_token(self, token: str, embedding: torch.Tensor) -> None:
        require(not self.has_token(token), f"token {token!r} already exists in the tokenizer")
        require(token.strip() == token and token, f"a new token must be a non-empty word, not {token!r}")
        row = VOCAB_SIZE + len(self.added_tokens)
        set_token_embedding(self.text_encoder, row + 1, row, embedding)
        self.added_tokens[token] = row

    @torch.no_grad()
    def encode_text(self, captions: list[str], batch_size: int = 256) -> torch.Tensor:
        """Text conditions (B, context_length, text_dim): the encoder's last hidden states."""
        device = next(self.text_encoder.parameters()).device
        out = []
        for i in range(0, len(captions), batch_size):
            ids = self.token_ids(captions[i : i + batch_size]).to(device)
            out.append(self.text_encoder(input_ids=ids).last_hidden_state.float().cpu())
        return torch.cat(out) if out else torch.empty(0, self.cfg.context_length, self.cfg.text_dim)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Pixel space: the model input is the image."""
        return x.float().clamp(-1, 1)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> TinyTextToImage:
        self.unet.to(device=device)
        if dtype is not None:
            self.unet.to(dtype=dtype)
        self.text_encoder.to(device=device)
        return self

    def save(self, folder: str | Path, extra: dict | None = None) -> None:
        """Write ``model.safetensors`` (UNet + text encoder) and ``model.json`` (architecture + extra)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"unet.{k}": v.detach().cpu().contiguous() for k, v in self.unet.state_dict().items()}
        tensors |= {f"text.{k}": v.detach().cpu().contiguous() for k, v in self.text_encoder.state_dict().items()}
        save_file(tensors, str(folder / "model.safetensors"))
        info = {"model": asdict(self.cfg)} | ({"added_tokens": self.added_tokens} if self.added_tokens else {})
        info |= extra or {}
        (folder / "model.json").write_text(json.dumps(info, indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> TinyTextToImage:
        """A saved model; a missing, partial or damaged file is one line naming it."""
        folder = Path(folder)
        info = read_model_json(folder / "model.json")
        require("model" in info, f"{folder / 'model.json'} is damaged (no 'model' entry)")
        try:
            cfg = TinyModelConfig(**info["model"])
        except TypeError as err:
            raise AttributionError(f"{folder / 'model.json'} is damaged ({err})") from None
        flips = bool(info.get("recipe", {}).get("train", {}).get("flips", True))
        model = cls(cfg, flips=flips)
        path = folder / "model.safetensors"
        tensors = read_safetensors(path)
        load_state(model.unet, {k[5:]: v for k, v in tensors.items() if k.startswith("unet.")}, path)
        for token in info.get("added_tokens", {}):  # rows in order: each token gets its saved row
            model.add_token(token, torch.zeros(cfg.text_dim))
        require(
            model.added_tokens == info.get("added_tokens", {}),
            f"{folder / 'model.json'} is damaged (added_tokens out of order)",
        )
        text = {k[5:]: v for k, v in tensors.items() if k.startswith("text.")}
        load_state(model.text_encoder, text, path, strict=False)
        model.unet.eval()
        return model
