"""Image folders in the Hugging Face ``imagefolder`` layout, resized to the tiny resolution.

A folder holds images and a ``metadata.jsonl`` with one ``{"file_name": ..., "text": ...}`` per
line (``text`` may also be a list of captions). The procedural shapes dataset writes the same
layout, plus each image's ``attributes``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from common.errors import AttributionError, require, require_file
from common.files import read_text


@dataclass
class ImageFolder:
    """Images as pixels in [-1, 1] (N,3,R,R), with captions, file paths and optional attributes."""

    root: Path
    pixels: torch.Tensor
    captions: list[list[str]]
    paths: list[str]
    attributes: list[dict] | None

    def __len__(self) -> int:
        return len(self.paths)


def _read_metadata(root: Path) -> list[dict]:
    meta = root / "metadata.jsonl"
    rows = []
    for lineno, line in enumerate(read_text(meta, "metadata file").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise AttributionError(f"{meta}:{lineno}: not valid JSON") from None
        if not isinstance(row, dict) or not row.get("file_name"):
            raise AttributionError(f"{meta}:{lineno}: no file_name")
        text = row.get("text")
        if isinstance(text, str):
            text = [text]
        if not text or not all(isinstance(t, str) and t.strip() for t in text):
            raise AttributionError(f"{meta}:{lineno}: no text for {row['file_name']}")
        row["text"] = text
        rows.append(row)
    if not rows:
        raise AttributionError(f"{meta} lists no images")
    n_caps = {len(r["text"]) for r in rows}
    if len(n_caps) > 1:
        raise AttributionError(f"{meta}: every image needs the same number of captions, found {sorted(n_caps)}")
    return rows


def load_image(path: Path, resolution: int) -> np.ndarray:
    """An RGB image centre-cropped to a square and resized to (resolution, resolution, 3) uint8."""
    require_file(path, "image")
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            side = min(im.size)
            left, top = (im.width - side) // 2, (im.height - side) // 2
            im = im.crop((left, top, left + side, top + side))
            if im.size != (resolution, resolution):
                im = im.resize((resolution, resolution), Image.BICUBIC)
            return np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as err:
        raise AttributionError(f"unreadable image {path}: {err.__class__.__name__}") from None


def load_image_folder(root: str | Path, resolution: int) -> ImageFolder:
    """Read every image listed in ``root/metadata.jsonl``; a bad entry is reported by name."""
    root = Path(root)
    rows = _read_metadata(root)
    arrays = [load_image(root / r["file_name"], resolution) for r in rows]
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1
    attrs = [r["attributes"] for r in rows] if all("attributes" in r for r in rows) else None
    return ImageFolder(root, pixels, [r["text"] for r in rows], [str(root / r["file_name"]) for r in rows], attrs)


def read_attributes(root: str | Path) -> list[dict]:
    """The shape attributes of every image of a ``tiny.shapes`` folder (one line if it has none)."""
    rows = _read_metadata(Path(root))
    require(all("attributes" in r for r in rows), f"{Path(root) / 'metadata.jsonl'} has no shape attributes")
    return [r["attributes"] for r in rows]


def read_listing(root: str | Path) -> tuple[list[list[str]], list[str]]:
    """Captions and image paths of ``root/metadata.jsonl``, without reading the images."""
    root = Path(root)
    rows = _read_metadata(root)
    return [r["text"] for r in rows], [str(root / r["file_name"]) for r in rows]


def count_duplicates(pixels: torch.Tensor) -> int:
    """How many images are pixel-identical to an earlier one."""
    flat = pixels.flatten(1).numpy()
    return len(flat) - len(np.unique(flat, axis=0))
