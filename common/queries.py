"""Query folders: one sub-folder per synthesized image.

Layout of ``<queries>/<id>/``:
    query.json           {"id", "prompt", "seed", "sampler", "num_steps", ...}
    image.png            the generated image, for viewing
    input.npy            the model input of the image (C,H,W): pixels in [-1, 1] or a latent
    text_embedding.npy   its text condition (captions,L,D) or (L,D)
    noise.npy            the initial noise x_T it was generated from (C,H,W)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from common.data import Query
from common.errors import AttributionError, require_file
from common.outputs import write_json


def save_query(
    folder: str | Path, query: Query, noise: torch.Tensor | None, image: np.ndarray | None, info: dict
) -> Path:
    """Write one query folder; ``image`` is uint8 (H,W,3)."""
    from PIL import Image

    folder = Path(folder) / query.id
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "input.npy", query.image.detach().cpu().float().numpy())
    np.save(folder / "text_embedding.npy", query.text.detach().cpu().float().numpy())
    if noise is not None:
        np.save(folder / "noise.npy", noise.detach().cpu().float().numpy())
    if image is not None:
        Image.fromarray(image).save(folder / "image.png")
    write_json(folder / "query.json", {"id": query.id, "prompt": query.prompt} | info)
    return folder


def load_query(folder: str | Path) -> Query:
    """Read one query folder; missing files are named in a one-line error."""
    folder = Path(folder)
    for name in ("query.json", "input.npy", "text_embedding.npy"):
        require_file(folder / name, "query file")
    info = json.loads((folder / "query.json").read_text())
    image = torch.from_numpy(np.load(folder / "input.npy"))
    text = torch.from_numpy(np.load(folder / "text_embedding.npy"))
    if image.dim() != 3:
        raise AttributionError(f"{folder / 'input.npy'}: expected (C,H,W), got shape {tuple(image.shape)}")
    png = folder / "image.png"
    noise = torch.from_numpy(np.load(folder / "noise.npy")) if (folder / "noise.npy").exists() else None
    return Query(info["id"], image, text, info.get("prompt", ""), str(png) if png.exists() else None, info, noise)


def load_noise(folder: str | Path) -> torch.Tensor:
    """The initial noise a query was generated from."""
    path = Path(folder) / "noise.npy"
    if not path.exists():
        raise AttributionError(f"query {Path(folder).name} has no saved noise ({path})")
    return torch.from_numpy(np.load(path))


def load_queries(root: str | Path, ids: list[str] | None = None) -> list[Query]:
    """Every query folder under ``root`` (sorted by id), or just ``ids``."""
    root = Path(root)
    require_file(root, "queries folder")
    names = ids if ids else sorted(p.name for p in root.iterdir() if (p / "query.json").exists())
    if not names:
        raise AttributionError(f"no query folders in {root}")
    return [load_query(root / name) for name in names]
