"""Artifacts computed once per (model, training set, settings) and reused: one helper for every method.

Each artifact records what made it (its *identity*: model and data fingerprints and the settings
that change values). A file made under another identity is refused with one line naming what
differs, never silently reused. Two forms:

- :func:`cached_tensors`: a safetensors file (Fisher, pretrained losses, kernels), identity in its metadata;
- :func:`resumable_sums`: sums over many batches (curvature factors), saved as they grow and resumed;
- :func:`cached_array`: a large row-major ``.npy`` (projected gradients, features) written chunk by
  chunk into a memory map and opened with ``mmap_mode="r"``, so it never has to fit in memory;
  an interrupted computation resumes from its last finished chunk.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from common.errors import AttributionError
from common.files import save_tensors, write_json
from common.progress import progress_bar

# How an identity key is named in the refusal message.
WHAT = {"model": "model", "data": "training set", "models": "model ensemble"}


def canonical(identity: dict) -> dict:
    """The identity as JSON would store it (tuples as lists, keys as strings)."""
    return json.loads(json.dumps(identity, sort_keys=True))


def differing(saved: dict, wanted: dict) -> list[str]:
    """Top-level keys whose values differ, named for a person ('model', 'training set', 'settings')."""
    keys = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
    return [WHAT.get(k, f"settings ({k})") for k in keys]


def _refuse(path: Path, what: str, diff: list[str]) -> None:
    raise AttributionError(f"{what} {path} was made with another {', '.join(diff)}; delete it to recompute")


def cached_tensors(
    path: str | Path | None, identity: dict, compute: Callable[[], dict[str, torch.Tensor]], what: str
) -> dict[str, torch.Tensor]:
    """Load the tensors at ``path`` if they were made under ``identity``, else compute and save them.

    Args:
        path: a ``.safetensors`` file, or None to compute without caching.
        identity: JSON-able description of what makes the values (model, data, settings).
        compute: makes the tensors when there is no cache.
        what: how the artifact is named in messages ("Fisher file", "loss cache", ...).
    Raises:
        AttributionError: the file exists but was made under another identity, or is damaged.
    """
    wanted = canonical(identity)
    if path is None:
        return compute()
    path = Path(path)
    if path.exists():
        try:
            with safe_open(str(path), framework="pt") as f:
                saved = json.loads((f.metadata() or {}).get("identity", "{}"))
                diff = differing(saved, wanted)
                if diff:
                    _refuse(path, what, diff)
                return {k: f.get_tensor(k) for k in f.keys()}
        except AttributionError:
            raise
        except Exception as err:  # noqa: BLE001 - truncated or corrupt files raise several types
            raise AttributionError(
                f"{what} {path} is damaged ({err.__class__.__name__}); delete it to recompute"
            ) from None
    tensors = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tensors(path, tensors, metadata={"identity": json.dumps(wanted, sort_keys=True)})
    return tensors


def read_identity(path: str | Path) -> dict | None:
    """The identity stored with a cached artifact (safetensors metadata or ``.npy`` sidecar), if any."""
    path = Path(path)
    if path.suffix == ".npy":
        side = path.with_name(path.name + ".json")
        return json.loads(side.read_text())["identity"] if side.exists() else None
    if not path.exists():
        return None
    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("identity", "{}"))


def cached_array(
    path: str | Path,
    identity: dict,
    shape: tuple[int, ...],
    dtype: np.dtype | str,
    compute_rows: Callable[[int, int], np.ndarray],
    chunk_rows: int,
    what: str,
    progress: bool = True,
) -> np.ndarray:
    """A large array computed in row chunks into a memory-mapped ``.npy``, resumable, opened read-only.

    Args:
        path: the ``.npy`` file; its identity and progress live in ``<path>.json``.
        identity: what makes the values; a finished or partial file of another identity is refused.
        shape: the full array's shape (rows first).
        compute_rows: ``(start, stop) -> rows`` of shape ``(stop - start, *shape[1:])``.
        chunk_rows: rows per chunk: the unit of work that an interruption can lose.
    Returns:
        The array, memory-mapped read-only.
    """
    path = Path(path)
    side = path.with_name(path.name + ".json")
    wanted = canonical(identity)
    shape = tuple(int(s) for s in shape)
    state = {"identity": wanted, "shape": list(shape), "dtype": np.dtype(dtype).str, "rows_done": 0}
    if side.exists():
        saved = json.loads(side.read_text())
        diff = differing(saved["identity"], wanted)
        if diff:
            _refuse(path, what, diff)
        if saved["shape"] != list(shape) or saved["dtype"] != state["dtype"]:
            _refuse(path, what, ["shape or dtype"])
        state["rows_done"] = saved["rows_done"]
    partial = path.with_name(path.name + ".partial")
    if state["rows_done"] >= shape[0] and path.exists():
        return np.load(path, mmap_mode="r")
    path.parent.mkdir(parents=True, exist_ok=True)
    if state["rows_done"] and partial.exists():
        out = np.load(partial, mmap_mode="r+")
    else:
        state["rows_done"] = 0
        out = np.lib.format.open_memmap(partial, mode="w+", dtype=np.dtype(dtype), shape=shape)
    bar = progress_bar(total=shape[0], initial=state["rows_done"], desc=what, disable=not progress, leave=False)
    for start in range(state["rows_done"], shape[0], chunk_rows):
        stop = min(start + chunk_rows, shape[0])
        rows = np.asarray(compute_rows(start, stop))
        if rows.shape != (stop - start, *shape[1:]):
            raise AttributionError(
                f"{what}: computed rows of shape {rows.shape}, expected {(stop - start, *shape[1:])}"
            )
        out[start:stop] = rows
        out.flush()
        state["rows_done"] = stop
        write_json(side, state, sort_keys=True, indent=None)  # after the flush: a recorded chunk is on disk
        bar.update(stop - start)
    bar.close()
    del out
    os.replace(partial, path)
    return np.load(path, mmap_mode="r")


def resumable_sums(
    path: str | Path | None,
    identity: dict,
    jobs: Sequence,
    contribution: Callable[[object], dict[str, torch.Tensor]],
    every: int,
    what: str,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Float64 sums of ``contribution(job)`` over ``jobs``, saved every ``every`` jobs and resumed from there.

    The partial sums live at ``path`` (safetensors; identity and the count of jobs done in its metadata),
    so an interrupted fit continues from its last save; a partial file of another identity is refused.
    The caller deletes ``path`` once it has stored what it derives from the sums.

    Args:
        path: the partial-sums file, or None to sum without saving.
        identity: what makes the sums, including how the jobs were cut (batch size, process share).
        jobs: the units of work in order (e.g. batch starts); ``contribution`` maps one to named tensors.
        every: jobs between saves.
    """
    wanted = canonical(identity)
    sums: dict[str, torch.Tensor] = {}
    done = 0
    path = Path(path) if path is not None else None
    if path is not None and path.exists():
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                saved = json.loads(meta.get("identity", "{}"))
                sums = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as err:  # noqa: BLE001 - truncated or corrupt files raise several types
            raise AttributionError(
                f"{what} {path} is damaged ({err.__class__.__name__}); delete it to restart"
            ) from None
        diff = differing(saved, wanted)
        if diff:
            _refuse(path, what, diff)
        done = int(meta["done"])
    bar = progress_bar(total=len(jobs), initial=done, desc=what, disable=not progress, leave=False)
    for i in range(done, len(jobs)):
        for name, value in contribution(jobs[i]).items():
            value = value.detach().to(torch.float64)
            sums[name] = sums[name].to(value.device) + value if name in sums else value.clone()
        bar.update(1)
        if path is not None and ((i + 1) % every == 0 or i + 1 == len(jobs)):
            path.parent.mkdir(parents=True, exist_ok=True)
            meta = {"identity": json.dumps(wanted, sort_keys=True), "done": str(i + 1)}
            save_tensors(path, sums, metadata=meta)
    bar.close()
    return sums
