"""The authors' MSCOCO release, read as their code reads it, memory-mapped.

Files in the data folder (``sywang/AttributeByUnlearning``, folder ``mscoco/``, after extraction):

- ``coco17_train_latents.npy``: (2N, 4, 16, 16), N = 118,287: VAE latents (scaled by 0.18215) of the
  training images, then of their horizontal flips, in the same image order;
- ``coco17_train_text_embeddings.npy``: (N, 5, 77, 1024): SD2 text embeddings of each image's first
  five captions (~93 GB in float16: never read whole);
- ``coco17_sample_latents.npy`` (Q, 4, 16, 16), ``coco17_sample_text_embeddings.npy`` (Q, 1, 77, 1024),
  ``sample_caption.txt`` (Q lines) and ``sample/{i}.png``: the Q = 110 released queries;
- ``model.bin`` (the UNet) and ``fisher_info.pt`` (its diagonal Fisher, every weight).

Optional, for captions and image paths in the outputs: COCO's ``annotations/captions_train2017.json``
and ``train2017/`` (image order: the annotation file's ``images`` list, as the authors').
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from common.data import NoiseStream, Query
from common.diffusion.sampling import BatchStream
from common.errors import AttributionError, require
from common.files import read_text
from common.memmap import MemmapTrainingSet, check_sampled_finite, open_array

TRAIN_LATENTS = "coco17_train_latents.npy"
TRAIN_TEXT = "coco17_train_text_embeddings.npy"
SAMPLE_LATENTS = "coco17_sample_latents.npy"
SAMPLE_TEXT = "coco17_sample_text_embeddings.npy"
SAMPLE_CAPTIONS = "sample_caption.txt"
MODEL = "model.bin"
FISHER = "fisher_info.pt"
ANNOTATIONS = "annotations/captions_train2017.json"
NUM_TRAIN = 118_287
LATENT_SHAPE = (4, 16, 16)
TEXT_SHAPE = (77, 1024)
# How the authors sampled the released queries (AbU mscoco/generate_samples.py): all 110 captions in one
# batch zero-padded to 500, one CPU generator seeded 0 drawing the initial and every step's noise for the
# whole batch, DDPM over 1,000 steps, guidance 7.5 against the empty prompt.
GENERATION = {"seed": 0, "sampler": "ddpm", "num_steps": 1000, "guidance_scale": 7.5}
GENERATION_BATCH = 500


def check_train_arrays(latents: np.ndarray, text: np.ndarray, latents_path: Path, text_path: Path) -> None:
    """Refuse arrays that do not have the released layout, naming the file and what is wrong."""
    require(
        latents.ndim == 4 and latents.shape[1:] == LATENT_SHAPE,
        f"{latents_path}: expected latents (2N, 4, 16, 16), got shape {latents.shape}",
    )
    require(
        text.ndim == 4 and text.shape[2:] == TEXT_SHAPE,
        f"{text_path}: expected text embeddings (N, captions, 77, 1024), got shape {text.shape}",
    )
    require(
        len(latents) == 2 * len(text),
        f"{latents_path} holds {len(latents)} latents, not 2 x {len(text)} (originals then flips) "
        f"as {text_path.name} has {len(text)} images; the two files come from different releases or one is partial",
    )


def read_captions(data_dir: Path, n: int) -> tuple[list[list[str]] | None, list[str | None] | None]:
    """Each training image's first five captions and its path, in the authors' order (None without COCO)."""
    path = data_dir / ANNOTATIONS
    if not path.exists():
        return None, None
    try:
        ann = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise AttributionError(f"{path} is damaged (not valid JSON); download it again") from None
    images = ann["images"]
    require(len(images) == n, f"{path} lists {len(images)} images, the arrays {n}")
    by_image: dict[int, list[str]] = {}
    for a in ann["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a["caption"].strip())
    captions = [by_image.get(im["id"], [])[:5] for im in images]
    paths = [str(data_dir / "train2017" / im["file_name"]) for im in images]
    return captions, paths


def load_training_set(data_dir: str | Path) -> MemmapTrainingSet:
    """The released training latents and text embeddings, memory-mapped, checked against each other."""
    data_dir = Path(data_dir)
    latents_path, text_path = data_dir / TRAIN_LATENTS, data_dir / TRAIN_TEXT
    latents = open_array(latents_path, "training latents")
    text = open_array(text_path, "training text embeddings")
    check_train_arrays(latents, text, latents_path, text_path)
    check_sampled_finite(latents, latents_path)
    check_sampled_finite(text, text_path)
    captions, paths = read_captions(data_dir, len(text))
    data = MemmapTrainingSet(latents, text, captions=captions, image_paths=paths)
    data.source = f"{latents_path}, {text_path}"
    data.release_pages()  # the blocks the finite check read
    return data


def load_release_queries(data_dir: str | Path, indices: list[int] | None = None) -> list[Query]:
    """The released query samples (``sample{i:03d}``): latent, text embedding, caption and image.

    Each carries how it was sampled (:data:`GENERATION`) and its row of the generation batch, so a
    retrained model regenerates it from the same noise (:class:`common.diffusion.sampling.BatchStream`).
    """
    data_dir = Path(data_dir)
    latents = open_array(data_dir / SAMPLE_LATENTS, "query latents")
    text = open_array(data_dir / SAMPLE_TEXT, "query text embeddings")
    require(
        latents.ndim == 4 and latents.shape[1:] == LATENT_SHAPE,
        f"{data_dir / SAMPLE_LATENTS}: expected (Q, 4, 16, 16), got shape {latents.shape}",
    )
    if text.ndim == 3:
        text = text[:, None]
    require(
        text.ndim == 4 and text.shape[2:] == TEXT_SHAPE and len(text) == len(latents),
        f"{data_dir / SAMPLE_TEXT}: expected ({len(latents)}, 1, 77, 1024), got shape {text.shape}",
    )
    captions_path = data_dir / SAMPLE_CAPTIONS
    captions = read_text(captions_path, "query captions").splitlines()
    require(
        len(captions) >= len(latents),
        f"{captions_path} has {len(captions)} lines for {len(latents)} queries",
    )
    indices = list(range(len(latents))) if indices is None else indices
    for i in indices:
        require(0 <= i < len(latents), f"query {i} is not among the {len(latents)} released samples")
    require(
        len(latents) <= GENERATION_BATCH,
        f"{data_dir / SAMPLE_LATENTS} holds {len(latents)} queries, more than the release's generation batch",
    )
    initial = BatchStream(GENERATION["seed"], GENERATION_BATCH, tuple(indices)).initial_noise(LATENT_SHAPE)
    queries = []
    for i, noise in zip(indices, initial):
        png = data_dir / "sample" / f"{i}.png"
        queries.append(
            Query(
                f"sample{i:03d}",
                torch.from_numpy(np.array(latents[i], dtype=np.float32)),
                torch.from_numpy(np.array(text[i], dtype=np.float32)),
                captions[i].strip(),
                str(png) if png.exists() else None,
                {"release_index": i, **GENERATION},
                noise,
                NoiseStream(GENERATION["seed"], GENERATION_BATCH, i),
            )
        )
    return queries


def export_release_queries(
    data_dir: str | Path, out: str | Path, indices: list[int] | None = None, overwrite: bool = False
) -> list[Path]:
    """The released queries as query folders (``common.queries`` layout) under ``out``; ids already there are
    refused before any is written unless ``overwrite``."""
    from PIL import Image

    from common.queries import check_new_ids, save_query

    folders = []
    queries = load_release_queries(data_dir, indices)
    check_new_ids(out, [q.id for q in queries], overwrite)
    for query in queries:
        image = np.asarray(Image.open(query.image_path).convert("RGB")) if query.image_path else None
        folders.append(save_query(out, query, query.noise, image, dict(query.extra)))
    return folders


def file_report(data_dir: str | Path) -> list[tuple[str, str]]:
    """(file, state) for every released file: its shape and dtype, size, or 'missing'."""
    data_dir = Path(data_dir)
    rows = []
    for name in (TRAIN_LATENTS, TRAIN_TEXT, SAMPLE_LATENTS, SAMPLE_TEXT):
        path = data_dir / name
        if not path.exists():
            rows.append((name, "missing"))
            continue
        try:
            a = np.load(path, mmap_mode="r")
            rows.append((name, f"{a.shape} {a.dtype}"))
        except (ValueError, OSError, EOFError):
            rows.append((name, f"damaged or incomplete ({os.path.getsize(path):,} bytes)"))
    for name in (SAMPLE_CAPTIONS, MODEL, FISHER):
        path = data_dir / name
        rows.append((name, f"{os.path.getsize(path):,} bytes" if path.exists() else "missing"))
    rows.append(("sample/", sample_images_state(data_dir)))
    return rows


def sample_images_state(data_dir: Path) -> str:
    """How many of the released query images ``sample/{i}.png`` are there: one per query latent (a missing one is
    reported as missing, naming the first)."""
    samples = data_dir / "sample"
    if not samples.is_dir():
        return "missing"
    try:
        count = len(np.load(data_dir / SAMPLE_LATENTS, mmap_mode="r"))
    except (ValueError, OSError, EOFError):  # reported on the latents' own row
        return f"{len(list(samples.glob('*.png')))} images"
    absent = [i for i in range(count) if not (samples / f"{i}.png").is_file()]
    if absent:
        return f"missing {len(absent)} of {count} images (first: sample/{absent[0]}.png)"
    return f"{count} images"
