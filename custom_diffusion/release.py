"""What AbC ranks for one query: the customized model's exemplars, then the LAION subset.

The LAION side is the authors' release (``sywang/AttributeByUnlearning``, folder ``abc/``, extracted
into the data folder), memory-mapped:

- ``laion_latents.npy``: (2M, 4, 64, 64), SD v1.4 VAE latents (scaled by 0.18215) of the LAION images,
  then of their horizontal flips in the same order;
- ``laion_text_embeddings.npy``: (M, 77, 768), SD v1.4 text conditions of their captions;
- ``sd_fisher.pt``: the diagonal Fisher of SD v1.4 (imported with ``--fisher.file``).

The captions themselves (``laion_subset/captions.txt``, one per line in the order of the sorted image
files, which is the arrays' order) come with the LAION images of ``sywang/GenDataAttribution``; they
are read only for caption-based methods (``clip-text``). When the images are there (``laion_subset/images/``)
their paths are listed in the run outputs beside each score.

The paper ranks the first 100,000 LAION images. The exemplars are images on disk, prepared as the
authors' loader does (shorter side resized to the resolution, bilinear; centre crop; [-1, 1]; the
flip taken after the crop), encoded by the VAE with a posterior sample (seeded here, by image), and
conditioned on the model's training prompt (e.g. "<new1> fish") through its customized text encoder.
Exemplars come first: a ranking's relevant items are positions 0 .. n_exemplars - 1.

The query is the synthesized image, prepared and encoded the same way, conditioned on the prompt
that generated it. (The authors' code leaves the query's latent unscaled by 0.18215 while scaling the
exemplars'; we scale both, as the model was trained.)
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common import keyed_random
from common.data import ArrayTrainingSet, ConcatTrainingSet, Query, query_key
from common.errors import AttributionError, require, require_file
from common.memmap import MemmapTrainingSet, check_sampled_finite, open_array
from custom_diffusion.model import StableDiffusionModel
from custom_diffusion.tasks import Task

LAION_LATENTS = "laion_latents.npy"
LAION_TEXT = "laion_text_embeddings.npy"
SD_FISHER = "sd_fisher.pt"
LAION_CAPTIONS = "laion_subset/captions.txt"
LAION_IMAGES = "laion_subset/images"
LAION_COUNT = 100_000
RESOLUTION = 512


def load_laion(
    root: str | Path, count: int = LAION_COUNT, text_width: int | None = None, captions: bool = False
) -> MemmapTrainingSet:
    """The first ``count`` LAION images with their flips and captions' conditions, memory-mapped and checked.

    Args:
        text_width: the text encoder's width the conditions must have (None: any).
        captions: read the caption strings too (``laion_subset/captions.txt``, required then).
    """
    root = Path(root)
    latents_path, text_path = root / LAION_LATENTS, root / LAION_TEXT
    latents = open_array(latents_path, "LAION latents")
    text = open_array(text_path, "LAION text embeddings")
    require(latents.ndim == 4 and latents.shape[1] == 4, f"{latents_path}: expected (2M, 4, h, w), got {latents.shape}")
    width = text_width or (text.shape[-1] if text.ndim == 3 else 768)
    require(
        text.ndim == 3 and text.shape[1:] == (77, width),
        f"{text_path}: expected (M, 77, {width}) (SD v1.4: 768), got shape {text.shape}",
    )
    require(
        len(latents) == 2 * len(text),
        f"{latents_path} holds {len(latents)} latents, not 2 x {len(text)} (originals then flips) as {text_path.name} "
        f"has {len(text)}; the two files come from different releases or one is partial",
    )
    require(count <= len(text), f"asked for {count} LAION images; {text_path} has {len(text)}")
    folder = root / LAION_IMAGES  # listed as the authors' viewer does: sorted file names, the arrays' order
    paths = [str(folder / name) for name in sorted(os.listdir(folder))[:count]] if folder.is_dir() else None
    require(paths is None or len(paths) == count, f"{folder} holds {len(paths or [])} images, fewer than {count}")
    strings = read_laion_captions(root, count) if captions else None
    check_sampled_finite(latents, latents_path)
    check_sampled_finite(text, text_path)
    data = MemmapTrainingSet(latents, text, count=count, captions=strings, image_paths=paths)
    data.source = f"{latents_path}, {text_path}"
    data.release_pages()  # the blocks the finite check read
    return data


def read_laion_captions(root: Path, count: int) -> list[list[str]]:
    """The first ``count`` captions of ``laion_subset/captions.txt``: one per line, stripped, as the authors read it."""
    path = root / LAION_CAPTIONS
    require_file(path, "LAION captions (bash custom_diffusion/scripts/download.sh DATA with LAION_CAPTIONS=1)")
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f.readlines()]
    require(len(lines) >= count, f"{path} has {len(lines)} captions, fewer than the {count} LAION images ranked")
    blank = next((i for i, line in enumerate(lines[:count]) if not line), None)
    require(blank is None, f"{path}: caption {blank} (line {(blank or 0) + 1}) is blank")
    return [[line] for line in lines[:count]]


def read_image(path: str | Path, resolution: int = RESOLUTION) -> torch.Tensor:
    """Pixels in [-1, 1] (3, R, R): shorter side resized to R (bilinear), centre-cropped, as the authors' loader."""
    try:
        image = Image.open(path).convert("RGB")
    except OSError as err:
        raise AttributionError(f"cannot read image {path} ({err})") from None
    # torchvision's Resize(R) and CenterCrop(R), which the authors use: the long side truncated, the
    # crop offset rounded, an image already at size left alone.
    w, h = image.size
    short, long = min(w, h), max(w, h)
    new_long = int(resolution * long / short)
    size = (resolution, new_long) if w <= h else (new_long, resolution)
    if size != (w, h):
        image = image.resize(size, Image.BILINEAR)
    left, top = int(round((size[0] - resolution) / 2.0)), int(round((size[1] - resolution) / 2.0))
    image = image.crop((left, top, left + resolution, top + resolution))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)
    return pixels / 127.5 - 1


def resolution_of(model: StableDiffusionModel) -> int:
    """Image size the VAE maps to the UNet's latent size (512 for SD v1.4)."""
    factor = 2 ** (len(model.vae.config.block_out_channels) - 1)
    return model.input_shape[-1] * factor


def encode(model: StableDiffusionModel, paths, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled latents of images and of their flips (n,4,h,w) each, one seeded posterior sample per image and flip."""
    resolution = resolution_of(model)
    pixels = torch.stack([read_image(p, resolution) for p in paths])
    out = []
    for flip in (0, 1):
        batch = pixels.flip(-1) if flip else pixels
        rows = [
            model.encode_images(batch[i : i + 1], keyed_random.generator(seed, keyed_random.Purpose.ENCODE, 0, i, flip))
            for i in range(len(paths))
        ]
        out.append(torch.cat(rows))
    return out[0], out[1]


def exemplar_set(model: StableDiffusionModel, task: Task, seed: int = 0) -> ArrayTrainingSet:
    """The model's exemplars, encoded and conditioned on its training prompt (with the new token)."""
    require(
        model.token is not None and model.token in task.train_prompt,
        f"the model's token {model.token!r} is not in the training prompt {task.train_prompt!r}",
    )
    originals, flips = encode(model, task.exemplars, seed)
    text = model.encode_text([task.train_prompt]).expand(len(originals), -1, -1)
    captions = [[task.train_prompt]] * len(originals)
    return ArrayTrainingSet(originals, text, captions, [str(p) for p in task.exemplars], flipped=flips)


def training_set(model: StableDiffusionModel, task: Task, laion: ArrayTrainingSet, seed: int = 0) -> ConcatTrainingSet:
    """Exemplars first, then the LAION images: what a query of ``task`` is ranked over."""
    return ConcatTrainingSet([exemplar_set(model, task, seed), laion])


def task_query(model: StableDiffusionModel, task: Task, seed: int = 0) -> Query:
    """The synthesized image as a query: its scaled latent (a seeded posterior sample) and its prompt's condition."""
    pixels = read_image(task.image, resolution_of(model))[None]
    latent = model.encode_images(
        pixels, keyed_random.generator(seed, keyed_random.Purpose.ENCODE, 1, query_key(task.id))
    )
    text = model.encode_text([task.prompt])[0]
    extra = {"test_case": task.test_case, "kind": task.kind}
    return Query(task.id, latent[0], text, task.prompt, str(task.image), extra=extra)
