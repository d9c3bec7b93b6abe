"""The dataset interface every benchmark implements: training images, text conditions, queries.

Training images are stored as model inputs (pixels or VAE latents). Flipped copies are either
computed (pixel space: a flip of the pixels) or given (latent space: the latent of the flipped
image, stacked after the originals as in the released MSCOCO arrays).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from common.errors import AttributionError, require
from common.fingerprints import digest, fingerprint_tensors


class ArrayTrainingSet:
    """Training set held as arrays.

    Args:
        images: model inputs (N,C,H,W).
        text: text conditions (N,n_captions,L,D), or (N,L,D) for one caption each.
        captions: per image, its caption strings (in outputs, and read by caption-based methods).
        image_paths: per image, a path or None (used in outputs only).
        flipped: inputs of the horizontally flipped images (N,C,H,W); ``None`` flips ``images``.
    """

    source: str | None = None  # where the arrays come from, named in errors about their values (e.g. their files)

    def __init__(
        self,
        images: torch.Tensor,
        text: torch.Tensor,
        captions: Sequence[Sequence[str]] | None = None,
        image_paths: Sequence[str | None] | None = None,
        flipped: torch.Tensor | None = None,
    ) -> None:
        if text.dim() == 3:
            text = text[:, None]
        require(images.dim() == 4, f"images must be (N,C,H,W), got shape {tuple(images.shape)}")
        require(text.dim() == 4, f"text embeddings must be (N,captions,L,D), got shape {tuple(text.shape)}")
        require(
            len(images) == len(text),
            f"latents and text embeddings differ in count: {len(images)} images vs {len(text)} text embeddings",
        )
        require(len(images) > 0, "the training set is empty")
        if flipped is not None:
            require(flipped.shape == images.shape, "flipped images must have the same shape as the originals")
        self._images = images
        self._flipped = flipped
        self._text = text
        self.captions = [list(c) for c in captions] if captions is not None else [[""] for _ in range(len(images))]
        self.image_paths = list(image_paths) if image_paths is not None else [None] * len(images)
        require(len(self.captions) == len(images), "captions and images differ in count")
        require(len(self.image_paths) == len(images), "image paths and images differ in count")
        self._fingerprint: str | None = None

    @classmethod
    def from_stacked(cls, latents: torch.Tensor, text: torch.Tensor, **kwargs) -> ArrayTrainingSet:
        """From latents (2N,C,H,W) with the flipped copies stacked after the originals (MSCOCO release)."""
        require(len(latents) % 2 == 0, f"stacked latents must have an even count, got {len(latents)}")
        n = len(latents) // 2
        require(
            n == len(text),
            f"latents and text embeddings differ in count: {n} images (2x{n} latents) vs {len(text)} text embeddings",
        )
        return cls(latents[:n], text, flipped=latents[n:], **kwargs)

    def __len__(self) -> int:
        return len(self._images)

    @property
    def num_captions(self) -> int:
        return self._text.shape[1]

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self._images.shape[1:])

    def release_pages(self) -> None:
        """Let go of what reading rows mapped into memory (memory-mapped sets); in-memory arrays keep theirs."""

    @property
    def fingerprint(self) -> str:
        """Identifies the training set's contents (inputs and text) for caches and rankings."""
        if self._fingerprint is None:
            flipped = [self._flipped] if self._flipped is not None else []
            self._fingerprint = fingerprint_tensors(self._images, self._text, *flipped)
        return self._fingerprint

    def images(self, indices: torch.Tensor, flips: torch.Tensor | bool = False) -> torch.Tensor:
        """Inputs (B,C,H,W) of ``indices`` (B,), each flipped where ``flips`` (B,) is true."""
        indices = torch.as_tensor(indices, dtype=torch.long)
        flips = torch.as_tensor(flips, dtype=torch.bool).expand(indices.shape)
        orig = self._images[indices]
        flip = self._flipped[indices] if self._flipped is not None else orig.flip(-1)
        return torch.where(flips.view(-1, 1, 1, 1), flip, orig)

    def text(self, indices: torch.Tensor, captions: torch.Tensor | int = 0) -> torch.Tensor:
        """Text conditions (B,L,D) of ``indices`` (B,), caption ``captions`` (B,) of each."""
        indices = torch.as_tensor(indices, dtype=torch.long)
        captions = torch.as_tensor(captions, dtype=torch.long).expand(indices.shape)
        return self._text[indices, captions]

    def subset(self, keep: Sequence[int]) -> ArrayTrainingSet:
        """The training set restricted to ``keep`` (positions in this set)."""
        keep_t = torch.as_tensor(list(keep), dtype=torch.long)
        return ArrayTrainingSet(
            self._images[keep_t],
            self._text[keep_t],
            [self.captions[i] for i in keep],
            [self.image_paths[i] for i in keep],
            self._flipped[keep_t] if self._flipped is not None else None,
        )


class ConcatTrainingSet(ArrayTrainingSet):
    """Training sets one after another, indexed as one (AbC: a model's exemplars, then the LAION subset).

    Args:
        parts: training sets with the same input shape, caption count and text shape.
    """

    def __init__(self, parts: Sequence[ArrayTrainingSet]) -> None:
        require(len(parts) > 0, "no training sets to join")
        first = parts[0]
        for part in parts[1:]:
            require(part.image_shape == first.image_shape, f"inputs {part.image_shape} and {first.image_shape} differ")
            require(part.num_captions == first.num_captions, "the joined sets differ in captions per image")
            require(part._text.shape[2:] == first._text.shape[2:], "the joined sets' text conditions differ in shape")
        self.parts = list(parts)
        self.source = ", ".join(p.source for p in parts if p.source) or None
        self.starts = np.cumsum([0] + [len(p) for p in parts])
        self.captions = [c for p in parts for c in p.captions]
        self.image_paths = [q for p in parts for q in p.image_paths]
        self._text = first._text  # for the text shape only
        self._fingerprint = None
        # One dtype for every batch, whichever parts it draws from (e.g. float32 exemplars, float16 LAION).
        probe = torch.tensor([0])
        self._dtypes = {
            kind: functools.reduce(torch.promote_types, [read(p, probe).dtype for p in parts])
            for kind, read in (("images", lambda p, i: p.images(i)), ("text", lambda p, i: p.text(i)))
        }

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def num_captions(self) -> int:
        return self.parts[0].num_captions

    @property
    def image_shape(self) -> tuple[int, ...]:
        return self.parts[0].image_shape

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = digest("+".join(p.fingerprint for p in self.parts))
        return self._fingerprint

    def release_pages(self) -> None:
        for part in self.parts:
            part.release_pages()

    def _gather(self, indices: torch.Tensor, read, dtype: torch.dtype) -> torch.Tensor:
        """Rows of ``indices`` (B,) from each part, by ``read(part, local positions, mask)``, in order."""
        indices = torch.as_tensor(indices, dtype=torch.long)
        require(bool(((indices >= 0) & (indices < len(self))).all()), f"indices outside 0..{len(self) - 1}")
        out = None
        for k, part in enumerate(self.parts):
            mask = (indices >= int(self.starts[k])) & (indices < int(self.starts[k + 1]))
            if mask.any() or (out is None and k == len(self.parts) - 1):  # an empty batch keeps the row shape
                rows = read(part, indices[mask] - int(self.starts[k]), mask)
                out = rows.new_empty((len(indices), *rows.shape[1:]), dtype=dtype) if out is None else out
                out[mask] = rows.to(dtype)
        return out

    def images(self, indices: torch.Tensor, flips: torch.Tensor | bool = False) -> torch.Tensor:
        indices = torch.as_tensor(indices, dtype=torch.long)
        flips = torch.as_tensor(flips, dtype=torch.bool).expand(indices.shape)
        return self._gather(indices, lambda part, pos, mask: part.images(pos, flips[mask]), self._dtypes["images"])

    def text(self, indices: torch.Tensor, captions: torch.Tensor | int = 0) -> torch.Tensor:
        indices = torch.as_tensor(indices, dtype=torch.long)
        captions = torch.as_tensor(captions, dtype=torch.long).expand(indices.shape)
        return self._gather(indices, lambda part, pos, mask: part.text(pos, captions[mask]), self._dtypes["text"])

    def subset(self, keep: Sequence[int]) -> ArrayTrainingSet:
        keep_t = torch.as_tensor(list(keep), dtype=torch.long)
        return ArrayTrainingSet(
            self.images(keep_t),
            torch.stack([self.text(keep_t, c) for c in range(self.num_captions)], 1),
            [self.captions[i] for i in keep],
            [self.image_paths[i] for i in keep],
            self.images(keep_t, True),
        )


def query_key(query_id: str) -> int:
    """The 56-bit integer that keys a query's noise, derived from its id."""
    return int.from_bytes(hashlib.sha256(query_id.encode()).digest()[:7], "little")


@dataclass(frozen=True)
class NoiseStream:
    """The batch noise stream a query was sampled in: row ``row`` of a pipeline's batch of ``batch_size`` images
    whose noise came from one generator seeded ``seed`` (the released MSCOCO queries). Regeneration and JourneyTRAK
    replay it (:class:`common.diffusion.sampling.BatchStream`); it is part of the query's identity."""

    seed: int
    batch_size: int
    row: int

    def __post_init__(self) -> None:
        for name in ("seed", "batch_size", "row"):
            value = getattr(self, name)
            require(isinstance(value, int) and not isinstance(value, bool) and value >= 0,
                    f"a query's noise stream needs a non-negative integer {name}, got {value!r}")  # fmt: skip
        require(self.row < self.batch_size, f"noise stream row {self.row} lies outside a batch of {self.batch_size}")

    @classmethod
    def from_json(cls, value: object, where: str) -> NoiseStream:
        """The stream a query folder records (``{"seed", "batch_size", "row"}``); anything else is one line."""
        fields = {"seed", "batch_size", "row"}
        require(isinstance(value, dict) and set(value) == fields,
                f"{where}: 'stream' must hold exactly seed, batch_size and row, got {value!r}")  # fmt: skip
        return cls(value["seed"], value["batch_size"], value["row"])

    def as_json(self) -> dict[str, int]:
        return {"seed": self.seed, "batch_size": self.batch_size, "row": self.row}


@dataclass
class Query:
    """A synthesized image to attribute.

    Attributes:
        id: a stable name (used for its output folder and its noise keys).
        image: the model input of the image (C,H,W).
        text: its text condition (n_captions,L,D).
        prompt: the prompt it was generated from.
        image_path: a viewable image file, if any.
        extra: what else its folder records (sampler settings, attributes).
        noise: the initial noise x_T (C,H,W) it was generated from, when saved.
        stream: the batch noise stream it was sampled in, when its noise depended on its batch.
    """

    id: str
    image: torch.Tensor
    text: torch.Tensor
    prompt: str = ""
    image_path: str | None = None
    extra: dict = field(default_factory=dict)
    noise: torch.Tensor | None = None
    stream: NoiseStream | None = None

    def __post_init__(self) -> None:
        if self.text.dim() == 2:
            self.text = self.text[None]
        if not self.id or any(c in self.id for c in "/\\") or self.id.startswith("."):
            raise AttributionError(f"query id {self.id!r} is not a valid folder name")

    @property
    def key(self) -> int:
        """A stable integer for keyed noise, derived from the id."""
        return query_key(self.id)

    def as_training_set(self) -> ArrayTrainingSet:
        return ArrayTrainingSet(self.image[None], self.text[None], [[self.prompt]], [self.image_path])


def as_numpy_uint8(image: torch.Tensor) -> np.ndarray:
    """Pixels in [-1, 1] (C,H,W) as a uint8 (H,W,C) array for viewing."""
    arr = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte()
    return arr.permute(1, 2, 0).numpy()


__all__ = ["ArrayTrainingSet", "NoiseStream", "Query", "AttributionError", "as_numpy_uint8"]
