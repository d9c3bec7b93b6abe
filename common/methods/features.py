"""Feature similarity: the shared base of the paper's feature baselines (CLIP, CLIP text, DINO, DINOv2, AbC).

Each training image is embedded once per orientation the model was trained on (both flips; the
driver takes the max) by a frozen pretrained encoder, and the raw features (N, K, D) are cached
memory-mapped through :func:`common.cache.cached_array`; a query is then one embedding and one pass
of dot products. The cache's identity is what makes the features: the encoder (its name and input
preprocessing), a fingerprint of its loaded weights, the model (which decodes the inputs) and the
training set. Training images are model inputs, so both they and the query are decoded to viewable
pixels first (identity in pixel space, the VAE for latent models).

Pretrained weights are never replaced by a random network: a missing or unreachable weight is one
line (:class:`AttributionError`) naming it and the flag that provides it. Hub lookups try the local
cache first and only go online when ``HF_HUB_OFFLINE`` is not set, so an offline run fails fast.
"""

from __future__ import annotations

import abc
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from common.cache import cached_array
from common.data import Query
from common.errors import AttributionError, first_line, require
from common.fingerprints import module_fingerprint
from common.methods.base import Method
from common.progress import progress_bar

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# "org/name" as the Hugging Face hub spells repository ids (a path that does not exist is not one).
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# Rows per chunk when scoring from the (possibly larger than memory) cache.
SCORE_CHUNK = 4096


@dataclass(frozen=True)
class Preprocess:
    """Pixels in [-1, 1] at any resolution to an encoder's input, as the encoders' own image transforms do.

    The shorter side is resized to ``resize`` (bicubic, antialiased; the longer side scaled and
    truncated as torchvision's ``Resize(int)`` does), the centre ``crop`` x ``crop`` is cut, values
    are clamped to [0, 1] (as 8-bit images are) and normalised with the encoder's mean and std.
    """

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        require(0 < self.crop <= self.resize, f"crop ({self.crop}) must be positive and at most resize ({self.resize})")

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """Encoder input (B,3,crop,crop) float32 from pixels (B,3,H,W) in [-1, 1]."""
        x = (pixels.float() + 1) / 2
        h, w = x.shape[-2:]
        size = (self.resize, int(self.resize * w / h)) if h <= w else (int(self.resize * h / w), self.resize)
        if size != (h, w):
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
        top, left = round((size[0] - self.crop) / 2), round((size[1] - self.crop) / 2)
        x = x[..., top : top + self.crop, left : left + self.crop].clamp(0, 1)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std


@dataclass
class Encoder:
    """A frozen pretrained encoder: what it is, its weights' fingerprint, and the function that embeds.

    Attributes:
        name: what the features are (architecture, output used), part of the cache identity.
        fingerprint: sha256 of the loaded parameters (the same weights from the hub or a local copy agree).
        dim: feature size D.
        embed: a batch (pixels (B,3,H,W) in [-1, 1], or a list of B strings) -> raw features (B, D) float32 CPU.
        preprocess: the image transform, part of the identity (None for text encoders).
    """

    name: str
    fingerprint: str
    dim: int
    embed: Callable[[Any], torch.Tensor]
    preprocess: Preprocess | None = None

    def identity(self) -> dict:
        prep = asdict(self.preprocess) if self.preprocess is not None else None
        return {"encoder": {"name": self.name, "preprocess": prep}, "weights": self.fingerprint}


def image_encoder(
    name: str,
    net: torch.nn.Module,
    forward: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor],
    dim: int,
    preprocess: Preprocess,
    device: torch.device | str,
) -> Encoder:
    """Wrap a loaded network (float32, frozen, on ``device``) as an :class:`Encoder` of pixels.

    Args:
        forward: ``(net, encoder input (B,3,crop,crop)) -> (B, D)`` features.
    """
    fingerprint = module_fingerprint(net)  # before the move: hashing reads the weights on the CPU
    net = net.to(device=device, dtype=torch.float32).eval().requires_grad_(False)

    @torch.no_grad()
    def embed(pixels: torch.Tensor) -> torch.Tensor:
        return forward(net, preprocess(pixels.to(device))).float().cpu()

    return Encoder(name, fingerprint, dim, embed, preprocess)


def unit(x: torch.Tensor) -> torch.Tensor:
    """``x`` scaled to unit length along its last dimension."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


# ----------------------------------------------------------------------------------------------
# Finding weights without network access


def hub_offline() -> bool:
    """Whether the Hugging Face hub must not be contacted (``HF_HUB_OFFLINE``, read now, not at import)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return bool(constants.HF_HUB_OFFLINE) or env


def unavailable(what: str, weights: str, flag: str, how: str) -> AttributionError:
    return AttributionError(f"{what} weights {weights!r} unavailable (offline?): pass {flag} PATH to {how}")


def load_transformers(
    cls: type, weights: str, what: str, flag: str, optional: Sequence[str] = (), **kwargs: Any
) -> torch.nn.Module:
    """A ``transformers`` model from a local folder (``save_pretrained``) or a hub id, never random.

    A hub id is looked up in the local cache first, then online unless ``HF_HUB_OFFLINE`` is set.
    Any parameter the file lacks (which ``from_pretrained`` would initialise randomly) is refused,
    except those whose names start with ``optional`` (heads the features never use).

    Raises:
        AttributionError: weights missing, unreachable, or not of ``cls``'s architecture; one line.
    """
    how = "a local folder saved with save_pretrained"
    local = Path(weights).expanduser()
    if not local.exists() and not HUB_ID.fullmatch(weights):
        raise AttributionError(f"{what} weights {weights!r} not found: pass {flag} PATH to {how}, or a hub id")
    source = str(local) if local.exists() else weights
    tries = (True,) if local.exists() or hub_offline() else (True, False)
    loaded = None
    for local_only in tries:
        try:
            loaded = cls.from_pretrained(
                source, local_files_only=local_only, dtype=torch.float32, output_loading_info=True, **kwargs
            )
            break
        except OSError as err:  # not cached, unreachable, or not a model folder
            reason = err
        except Exception as err:  # noqa: BLE001 - a folder of another architecture fails in several ways
            raise AttributionError(
                f"{what} weights {weights!r} do not load as {cls.__name__} ({first_line(err)})"
            ) from None
    if loaded is None:
        if local.exists():
            raise AttributionError(f"{what} weights {weights!r} do not load ({first_line(reason)}): {flag} wants {how}")
        raise unavailable(what, weights, flag, how)
    net, info = loaded
    missing = sorted(k for k in info.get("missing_keys", ()) if not k.startswith(tuple(optional)))
    mismatched = list(info.get("mismatched_keys", ()))
    if missing or mismatched:
        example = (missing + [str(m) for m in mismatched])[0]
        raise AttributionError(
            f"{what} weights {weights!r} do not fit {cls.__name__}: {len(missing)} tensors missing, "
            f"{len(mismatched)} of another shape (e.g. {example!r})"
        )
    return net


def hub_file(repo: str, filenames: Sequence[str]) -> str | None:
    """The local path of the first of ``filenames`` in hub repository ``repo``: cache first, then
    online unless offline; None when none can be had."""
    from huggingface_hub import hf_hub_download

    for local_only in (True,) if hub_offline() else (True, False):
        for name in filenames:
            try:
                return hf_hub_download(repo, name, local_files_only=local_only)
            except Exception:  # noqa: BLE001, S112 - not cached / not reachable: try the next candidate
                continue
    return None


# ----------------------------------------------------------------------------------------------
# The method base


class FeatureMethod(Method):
    """Cosine similarity of frozen features between the query and every training image (and its flip).

    Subclasses load their encoder (:meth:`load_encoder`); a method whose training features are not
    the images' (CLIP text) also overrides :meth:`views`, :meth:`embed_training`, :meth:`embed_query`
    and :meth:`columns`; a method that maps features before the cosine (AbC) overrides
    :meth:`train_map` and :meth:`query_map`. Configs have ``weights`` and ``batch_size`` fields.
    """

    uses_noise = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._encoder: Encoder | None = None
        self.features: np.ndarray | None = None  # (N, K, D) raw, memory-mapped when cached
        self.norms: torch.Tensor | None = None  # (N, K) float64 lengths of the mapped training features

    @abc.abstractmethod
    def load_encoder(self) -> Encoder:
        """Load the pretrained encoder (one-line :class:`AttributionError` when its weights are missing)."""

    @property
    def encoder(self) -> Encoder:
        if self._encoder is None:
            self._encoder = self.load_encoder()
        return self._encoder

    def flag(self, field: str) -> str:
        """The command-line flag of a config field (``--clip_text.weights``)."""
        return f"--{self.name.replace('-', '_')}.{field}"

    # -- what is embedded: images in each orientation (overridden for text) --------------------

    def views(self) -> int:
        """K: the features stored per training image (one per orientation)."""
        return len(self.flip_states())

    @torch.no_grad()
    def embed_training(self, start: int, stop: int) -> np.ndarray:
        """Raw features (stop - start, K, D) of training images ``start..stop-1``, one per orientation."""
        idx = torch.arange(start, stop)
        cols = [self.encoder.embed(self.pixels(self.data.images(idx, flip))) for flip in self.flip_states()]
        return torch.stack(cols, 1).numpy()

    @torch.no_grad()
    def embed_query(self, query: Query) -> torch.Tensor:
        """The query's raw feature (D,)."""
        return self.encoder.embed(self.pixels(query.image[None]))[0]

    def pixels(self, inputs: torch.Tensor) -> torch.Tensor:
        """Viewable pixels in [-1, 1] of model inputs (B,C,h,w)."""
        return self.model.decode(inputs.to(device=self.model.device, dtype=self.model.dtype))

    def columns(self, sims: np.ndarray) -> np.ndarray:
        """Scores (N, F) from the similarities to the K stored views (N, K): the orientations themselves."""
        return sims

    # -- optional maps applied before the cosine (AbC's tuned linear layers) --------------------

    def train_map(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(W (D', D), b (D',)) applied to training features before normalising, or None."""
        return None

    def query_map(self, feature: torch.Tensor) -> torch.Tensor:
        """The query feature (D,) float64 as compared (identity by default)."""
        return feature

    # -- preparation and scoring ------------------------------------------------------------

    def cache_identity(self) -> dict:
        """What makes the cached features: encoder, its weights, the decoding model, the training set."""
        return {
            "method": self.name,
            "model": self.model.fingerprint(),
            "data": self.data.fingerprint,
            "views": self.views(),
        } | self.encoder.identity()

    def prepare(self) -> None:
        """Embed the training set (or read it from the cache) and the lengths of its mapped features."""
        if self.features is not None:
            return
        encoder = self.encoder
        shape = (len(self.data), self.views(), encoder.dim)
        path = self.cache_path(f"{self.name}_features.npy")
        what = f"{self.name} features"
        if path is None:
            starts = range(0, shape[0], self.cfg.batch_size)
            batches = progress_bar(starts, desc=what)
            rows = [self.embed_training(s, min(s + self.cfg.batch_size, shape[0])) for s in batches]
            self.features = np.concatenate(rows).astype(np.float32)
        else:
            self.features = cached_array(
                path, self.cache_identity(), shape, np.float32, self.embed_training, self.cfg.batch_size, what
            )
        mapping = self.train_map()
        norms = [self._mapped(s, mapping).norm(dim=-1) for s in range(0, shape[0], SCORE_CHUNK)]
        self.norms = torch.cat(norms).clamp_min(1e-12)

    def _mapped(self, start: int, mapping: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        rows = torch.from_numpy(np.asarray(self.features[start : start + SCORE_CHUNK], dtype=np.float64))
        return rows if mapping is None else rows @ mapping[0].double().T + mapping[1].double()

    def score_flips(self, query: Query) -> tuple[np.ndarray, dict]:
        """Cosine similarities (N, F) between the query's feature and each training image's, per orientation."""
        self.prepare()
        q = unit(self.query_map(self.embed_query(query).double()))
        mapping = self.train_map()
        # <W t + b, q> = <t, W^T q> + <b, q>: a mapped cosine costs one pass over the raw cache.
        u, c = (q, 0.0) if mapping is None else (mapping[0].double().T @ q, float(mapping[1].double() @ q))
        sims = np.empty(self.norms.shape)
        for start in range(0, len(sims), SCORE_CHUNK):
            rows = torch.from_numpy(np.asarray(self.features[start : start + SCORE_CHUNK], dtype=np.float64))
            sims[start : start + SCORE_CHUNK] = ((rows @ u + c) / self.norms[start : start + SCORE_CHUNK]).numpy()
        return self.columns(sims), {}
