"""Query folders: one sub-folder per synthesized image.

Layout of ``<queries>/<id>/``:
    query.json           {"id", "prompt", "seed", "sampler", "num_steps", ...}
    image.png            the generated image, for viewing
    input.npy            the model input of the image (C,H,W): pixels in [-1, 1] or a latent
    text_embedding.npy   its text condition (captions,L,D) or (L,D)
    noise.npy            the initial noise x_T it was generated from (C,H,W)
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from common import keyed_random
from common.data import NoiseStream, Query, query_key
from common.errors import AttributionError, first_line, require, require_file
from common.files import read_json, replace_folder, write_json
from common.model import DiffusionModel


def save_query(
    folder: str | Path, query: Query, noise: torch.Tensor | None, image: np.ndarray | None, info: dict
) -> Path:
    """Write one query folder whole (into a staging folder, then moved in place of any earlier one); ``image`` is
    uint8 (H,W,3)."""
    from PIL import Image

    folder = Path(folder) / query.id
    staging = folder.with_name(f".{query.id}.new")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    np.save(staging / "input.npy", query.image.detach().cpu().float().numpy())
    np.save(staging / "text_embedding.npy", query.text.detach().cpu().float().numpy())
    if noise is not None:
        np.save(staging / "noise.npy", noise.detach().cpu().float().numpy())
    if image is not None:
        Image.fromarray(image).save(staging / "image.png")
    stream = {"stream": query.stream.as_json()} if query.stream is not None else {}
    write_json(staging / "query.json", {"id": query.id, "prompt": query.prompt} | info | stream)
    replace_folder(folder, staging)
    return folder


def check_new_ids(out: str | Path, ids: list[str], overwrite: bool) -> None:
    """Refuse, before any work, to write query ids that ``out`` already holds (unless ``overwrite``): a second
    generation would replace some of the first's queries and leave a mix of the two."""
    taken = [i for i in ids if (Path(out) / i).exists()]
    more = f" (and {len(taken) - 1} more)" if len(taken) > 1 else ""
    require(
        overwrite or not taken,
        f"{out} already holds query {taken[0] if taken else ''}{more}: pass --overwrite to replace them, or choose "
        "another folder",
    )


def load_query(folder: str | Path) -> Query:
    """Read one query folder; missing files are named in a one-line error."""
    folder = Path(folder)
    for name in ("query.json", "input.npy", "text_embedding.npy"):
        require_file(folder / name, "query file")
    info = read_json(folder / "query.json", "query file", "generate the query again")
    require(isinstance(info, dict) and "id" in info, f"{folder / 'query.json'} has no query id")
    image = read_array(folder / "input.npy")
    text = read_array(folder / "text_embedding.npy")
    if image.dim() != 3:
        raise AttributionError(f"{folder / 'input.npy'}: expected (C,H,W), got shape {tuple(image.shape)}")
    png = folder / "image.png"
    noise = read_array(folder / "noise.npy") if (folder / "noise.npy").exists() else None
    stream = NoiseStream.from_json(info.pop("stream"), str(folder / "query.json")) if "stream" in info else None
    return Query(info["id"], image, text, info.get("prompt", ""), str(png) if png.exists() else None, info, noise,
                 stream)  # fmt: skip


def read_array(path: Path) -> torch.Tensor:
    """A numeric ``.npy`` array of a query folder; a zero-byte, truncated or non-numeric file is one line naming it."""
    try:
        array = np.load(path)
    except (ValueError, OSError, EOFError) as err:  # empty, truncated, or an object array (no pickles are read)
        raise AttributionError(f"{path} is damaged or not a numeric array ({first_line(err)[:60]})") from None
    require(array.dtype.kind in "biuf", f"{path} holds {array.dtype} values, not numbers")
    return torch.from_numpy(array)


def load_noise(folder: str | Path) -> torch.Tensor:
    """The initial noise a query was generated from."""
    path = Path(folder) / "noise.npy"
    if not path.exists():
        raise AttributionError(f"query {Path(folder).name} has no saved noise ({path})")
    return read_array(path)


def load_queries(root: str | Path, ids: list[str] | None = None) -> list[Query]:
    """Every query folder under ``root`` (sorted by id), or just ``ids``."""
    root = Path(root)
    require_file(root, "queries folder")
    names = ids if ids else sorted(p.name for p in root.iterdir() if (p / "query.json").exists())
    if not names:
        raise AttributionError(f"no query folders in {root}")
    return [load_query(root / name) for name in names]


def generate_queries(
    model: DiffusionModel,
    prompts: list[tuple[str, dict]],
    out: str | Path,
    seed: int = 0,
    sampler: str = "ddpm",
    num_steps: int = 1000,
    prefix: str = "q",
    guidance_scale: float = 1.0,
    batch_size: int = 64,
    overwrite: bool = False,
) -> list[Path]:
    """Sample one image per prompt from keyed initial noise and save each as a query folder ``<prefix><i>``.

    Each folder keeps the model input, the decoded image, the text embedding and the initial noise,
    so the query can be regenerated (leave-K-out regeneration) from the same noise and seed. Ids already in ``out``
    are refused before any sampling unless ``overwrite``.
    """
    from common.data import as_numpy_uint8
    from common.diffusion.sampling import sample

    ids = [f"{prefix}{i:03d}" for i in range(len(prompts))]
    check_new_ids(out, ids, overwrite)
    folders = []
    for start in range(0, len(prompts), batch_size):
        batch, names = prompts[start : start + batch_size], ids[start : start + batch_size]
        keys = [query_key(i) for i in names]
        noise = keyed_random.keyed_normal([(seed, keyed_random.Purpose.SAMPLE, k) for k in keys], model.input_shape)
        text = model.encode_text([p for p, _ in batch])
        device, dtype = model.device, model.dtype
        images = sample(
            model, text.to(device, dtype), noise.to(device, dtype), keys, seed, sampler, num_steps, guidance_scale
        ).cpu()
        pixels = model.decode(images)
        for qid, (prompt, attrs), img, pix, emb, eps in zip(names, batch, images, pixels, text, noise):
            query = Query(qid, img, emb[None], prompt)
            info = {"seed": seed, "sampler": sampler, "num_steps": num_steps, "guidance_scale": guidance_scale}
            info["attributes"] = attrs
            folders.append(save_query(out, query, eps, as_numpy_uint8(pix), info))
    return folders


def check_queries(model: DiffusionModel, queries: list[Query]) -> None:
    """Refuse, before any work, a query the model cannot take, in one line naming it (and its folder): two queries of
    one id; a model input of another dtype, shape or range (pixel models take [-1, 1]) or with NaN or inf; a text
    condition of another width or with NaN or inf."""
    width = model.unet.config.cross_attention_dim
    seen: dict[str, str] = {}
    for q in queries:
        where = f"query {q.id}" + (f" ({Path(q.image_path).parent})" if q.image_path else "")
        require(q.id not in seen, f"two queries share the id {q.id}: {seen.get(q.id)} and {where} (a copied folder?)")
        seen[q.id] = where
        kind = "pixels in [-1, 1]" if model.pixel_space else "latents"
        require(q.image.is_floating_point(), f"{where}: its input holds {q.image.dtype}, not floats ({kind})")
        shape = tuple(q.image.shape)
        require(shape == tuple(model.input_shape), f"{where}: its input has shape {shape}; the model takes "
                                                   f"{tuple(model.input_shape)}")  # fmt: skip
        require(bool(torch.isfinite(q.image).all()), f"{where}: NaN or inf in its input")
        peak = float(q.image.abs().max()) if q.image.numel() else 0.0
        require(not model.pixel_space or peak <= 1 + 1e-3, f"{where}: its pixels reach {peak:.3g}, outside [-1, 1]")
        require(q.text.shape[-1] == width, f"{where}: its text condition is {q.text.shape[-1]} wide; the model's is "
                                           f"{width}")  # fmt: skip
        require(bool(torch.isfinite(q.text).all()), f"{where}: NaN or inf in its text condition")
