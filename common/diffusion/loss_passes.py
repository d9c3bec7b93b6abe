"""Loss passes over large training sets: sharded over processes, saved in chunks, resumable.

A pass computes every training image's per-timestep losses (N, F, T) under one or several weight
sets (the pretrained model; each query's unlearned weights: each batch of images is read once and
scored under all of them). The images are cut into chunks of ``chunk_images``; process r of W takes
chunks r, r + W, ...; each finished chunk is written atomically (``chunks/{c:06d}.safetensors``) into
a folder whose ``pass.json`` records what makes the values. A run killed at any point continues
from its finished chunks, and because every loss is keyed by the image's training index, the
result is the same for any number of processes, batch size or interruption.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from common import keyed_random
from common.cache import canonical, differing
from common.config import identity_settings, no_effect
from common.data import ArrayTrainingSet
from common.diffusion.keyed_losses import PRECISIONS, LossConfig, check_finite, image_losses
from common.errors import AttributionError, require
from common.files import save_tensors, write_json
from common.fingerprints import fingerprint_tensors, weight_set_fingerprint
from common.model import DiffusionModel
from common.processes import barrier, rank_world
from common.progress import progress_bar


@dataclass
class PassConfig:
    """How a loss pass is cut up and computed (the chunk size is still part of a pass folder's identity: the
    folder's files are its chunks)."""

    chunk_images: int = no_effect(2048, "training images per saved chunk (resume unit)")
    precision: str = field(default="fp32", metadata={"help": "fp32 or bf16 (autocast; losses in float32+)"})
    compile: bool = no_effect(
        False, "torch.compile the UNet (slower first batches; results equal up to float rounding)"
    )

    def __post_init__(self) -> None:
        require(self.chunk_images >= 1, f"chunk_images must be positive, got {self.chunk_images}")
        require(
            self.precision in PRECISIONS, f"unknown precision {self.precision!r}; choose from {', '.join(PRECISIONS)}"
        )


def _open_folder(folder: Path, identity: dict, rank: int, accelerator) -> None:
    """Check ``pass.json`` against ``identity`` (every process), write it if absent (main), then sync."""
    saved = folder / "pass.json"
    if saved.exists():
        try:
            old = json.loads(saved.read_text())
        except json.JSONDecodeError:
            raise AttributionError(f"{saved} is damaged; delete the folder to recompute") from None
        diff = differing(old, identity)
        if diff:
            raise AttributionError(
                f"loss pass {folder} was made with another {', '.join(diff)}; delete it to recompute"
            )
    elif rank == 0:
        shutil.rmtree(folder / "chunks", ignore_errors=True)  # chunks without their identity are never trusted
        folder.mkdir(parents=True, exist_ok=True)
        write_json(saved, identity, sort_keys=True)
    if rank == 0:
        (folder / "chunks").mkdir(exist_ok=True)
    barrier(accelerator)


def _chunk_path(folder: Path, c: int) -> Path:
    return folder / "chunks" / f"{c:06d}.safetensors"


def _chunk_ready(path: Path, names: list[str]) -> bool:
    """Whether a saved chunk holds every weight set's losses (a zero-byte or damaged file is computed again)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return {f"w:{n}" for n in names} <= set(f.keys())
    except Exception:  # noqa: BLE001 - missing, empty, truncated or not safetensors: not finished
        return False


def pass_identity(
    model: DiffusionModel,
    data: ArrayTrainingSet,
    cfg: LossConfig,
    pass_cfg: PassConfig,
    weight_sets: Mapping[str, Mapping[str, torch.Tensor] | None],
    flips: bool,
    purpose: keyed_random.Purpose,
    positions: torch.Tensor | None = None,
) -> dict:
    """What a pass folder's losses depend on, and how it is cut into chunks (its files)."""
    subset = {} if positions is None else {"positions": fingerprint_tensors(positions.to(torch.int64))}
    return canonical(
        subset
        | {
            "model": model.fingerprint(),
            "data": data.fingerprint,
            "flips": flips,
            "noise": keyed_random.NOISE,
            "purpose": purpose,
            "loss": identity_settings(cfg),
            "precision": pass_cfg.precision,
            "chunk_images": pass_cfg.chunk_images,
            "weights": {name: weight_set_fingerprint(w) for name, w in weight_sets.items()},
        }
    )


def loss_pass(
    model: DiffusionModel,
    data: ArrayTrainingSet,
    cfg: LossConfig,
    folder: str | Path,
    *,
    weight_sets: Mapping[str, Mapping[str, torch.Tensor] | None] | None = None,
    pass_cfg: PassConfig | None = None,
    accelerator=None,
    purpose: keyed_random.Purpose = keyed_random.Purpose.SCORE,
    progress: str | None = None,
    on_chunk: Callable[[int], None] | None = None,
    positions: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Every training image's losses under each weight set, computed in resumable chunks across processes.

    Args:
        model: the model (its own weights are the ``None`` weight set).
        data: the training set (memory-mapped is fine: chunks are read in index order).
        cfg: scoring timesteps, flips and noise seed (as :func:`common.diffusion.keyed_losses.dataset_losses`).
        folder: where the chunks and ``pass.json`` live; a finished chunk is never recomputed.
        weight_sets: name -> replacement weights (e.g. a query's unlearned K/V); default the model's own as "".
        accelerator: an ``accelerate.Accelerator`` to split the chunks over its processes (None: one).
        on_chunk: called with a chunk's number once it is saved.
        positions: only these training indices (M,), in this order (e.g. a query's candidates); each keeps its noise
            keys, so its losses equal the whole pass's rows at those indices.
    Returns:
        name -> float64 losses (N, F, T) on the CPU, on every process ((M, F, T) with ``positions``).
    Raises:
        AttributionError: the folder was made for another model, training set, settings or weight sets.
    """
    pass_cfg = pass_cfg or PassConfig()
    weight_sets = {"": None} if weight_sets is None else dict(weight_sets)
    require(bool(weight_sets), "no weight sets to score")
    flips = bool(cfg.flips and model.flips)
    folder = Path(folder)
    rank, world = rank_world(accelerator)
    if positions is not None:
        positions = torch.as_tensor(positions, dtype=torch.long).flatten()
        require(len(positions) > 0, "no training indices to score")
        inside = bool(((positions >= 0) & (positions < len(data))).all())
        require(inside, f"training indices must lie in [0, {len(data)})")
        require(len(positions.unique()) == len(positions), "training indices to score repeat")
    identity = pass_identity(model, data, cfg, pass_cfg, weight_sets, flips, purpose, positions)
    _open_folder(folder, identity, rank, accelerator)
    everything = torch.arange(len(data)) if positions is None else positions
    n, chunk = len(everything), pass_cfg.chunk_images
    chunks = list(range((n + chunk - 1) // chunk))
    todo = [c for c in chunks[rank::world] if not _chunk_ready(_chunk_path(folder, c), list(weight_sets))]
    rows = sum(min(chunk, n - c * chunk) for c in todo) * (2 if flips else 1) * data.num_captions * cfg.num_timesteps
    quiet = progress is None or rank != 0
    with progress_bar(total=rows, desc=progress, disable=quiet, unit="loss", leave=False) as bar:
        for c in todo:
            indices = everything[c * chunk : min(n, (c + 1) * chunk)]
            how = {"precision": pass_cfg.precision, "bar": bar, "compile": pass_cfg.compile}
            losses = image_losses(model, data, indices, indices, cfg, weight_sets=weight_sets, purpose=purpose,
                                  flips=flips, **how)  # fmt: skip
            for v in losses.values():
                check_finite(v, data, indices)
            save_tensors(_chunk_path(folder, c), {f"w:{k}": v for k, v in losses.items()})
            data.release_pages()  # memory-mapped rows read for this chunk: resident memory stays flat in N
            if on_chunk is not None:
                on_chunk(c)
    barrier(accelerator)
    parts = [load_file(str(_chunk_path(folder, c))) for c in chunks]
    return {name: torch.cat([p[f"w:{name}"] for p in parts]) for name in weight_sets}
