"""Training sets whose arrays stay on disk: memory-mapped ``.npy`` files, read row by row.

The released training arrays (MSCOCO's 93 GB of text embeddings, AbC's LAION latents) are opened
with ``np.load(mmap_mode="r")`` and never copied whole: rows are read when indexed, fingerprinted by
sampled blocks, and the pages read are let go after each chunk of a pass.
"""

from __future__ import annotations

import hashlib
import mmap
import warnings
from pathlib import Path

import numpy as np
import torch

from common.data import ArrayTrainingSet
from common.errors import AttributionError, require, require_file


def open_array(path: str | Path, what: str) -> np.ndarray:
    """A ``.npy`` file memory-mapped read-only; a missing or truncated file is one line naming it."""
    require_file(path, what)
    try:
        return np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as err:
        raise AttributionError(f"{path} is damaged or incomplete ({str(err)[:100]}); download it again") from None


def as_tensor(array: np.ndarray) -> torch.Tensor:
    """A torch view of a read-only memory map (no copy; nothing writes through it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "The given NumPy array is not writable"
        return torch.from_numpy(array)


def sampled_fingerprint(*arrays: np.ndarray, blocks: int = 64, block_bytes: int = 1 << 20) -> str:
    """A sha256 of each array's shape, dtype and ``blocks`` evenly spaced byte blocks (all of it if smaller).

    Hashing 93 GB would take longer than many scoring runs. Shapes, dtypes and 64 MiB spread over
    each file tell apart different releases, subsets and re-encodings, but not a change confined to
    bytes between the sampled blocks.
    """
    h = hashlib.sha256()
    for a in arrays:
        h.update(f"{a.shape}{a.dtype}".encode())
        require(a.flags.c_contiguous, f"an array of shape {a.shape} is not stored in C order (np.save writes C order)")
        flat = a.reshape(-1).view(np.uint8)
        if flat.size <= blocks * block_bytes:
            h.update(flat.tobytes())
            continue
        for start in np.linspace(0, flat.size - block_bytes, blocks).astype(np.int64):
            h.update(flat[start : start + block_bytes].tobytes())
    return h.hexdigest()[:16]


def check_sampled_finite(array: np.ndarray, path: str | Path, blocks: int = 64, block_bytes: int = 1 << 20) -> None:
    """Refuse a float array with NaN or inf in the blocks :func:`sampled_fingerprint` reads (all of it when smaller),
    naming its file: one line at load instead of a failure deep inside a pass that blames the weights."""
    if array.dtype.kind != "f":
        return
    flat = array.reshape(-1)
    per_block = max(1, block_bytes // array.itemsize)
    starts = [0] if flat.size <= blocks * per_block else np.linspace(0, flat.size - per_block, blocks).astype(np.int64)
    for start in starts:
        values = flat[int(start) : int(start) + (flat.size if len(starts) == 1 else per_block)]
        bad = np.flatnonzero(~np.isfinite(values))
        require(not bad.size, f"{path} holds NaN or inf (element {int(start) + int(bad[0]) if bad.size else 0} of "
                              f"{flat.size:,}): it is damaged; download it again")  # fmt: skip


class MemmapTrainingSet(ArrayTrainingSet):
    """A training set whose arrays stay on disk (memory-mapped); rows are read when indexed.

    The fingerprint hashes sampled blocks (:func:`sampled_fingerprint`), not every byte.

    Args:
        latents: (2M, C, H, W): the originals, then their flips in the same order (the releases' layout).
        text: (M, captions, L, D) or (M, L, D).
        count: keep only the first ``count`` images (and their flips), e.g. AbC's 100k of the LAION subset.
    """

    def __init__(self, latents: np.ndarray, text: np.ndarray, count: int | None = None, **kwargs) -> None:
        m = len(latents) // 2
        count = m if count is None else count
        require(0 < count <= m, f"cannot keep {count} of {m} images")
        require(len(text) == m, f"{len(latents)} latents (2 x {m}) but {len(text)} text embeddings")
        originals, flips = latents[:count], latents[m : m + count]
        self._arrays = (latents, text) if count == m else (originals, flips, text[:count])
        super().__init__(as_tensor(originals), as_tensor(text[:count]), flipped=as_tensor(flips), **kwargs)

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = sampled_fingerprint(*self._arrays)
        return self._fingerprint

    def release_pages(self) -> None:
        """Drop the pages read so far from this process's mappings (``madvise(MADV_DONTNEED)``).

        Rows read from a memory map stay mapped, and counted in the process's resident memory, until
        the kernel needs the memory back: over a pass of the 93 GB text embeddings that is as much as
        the page cache holds. The file's pages stay in the page cache; a later read maps them again.
        """
        for array in self._arrays:
            handle = getattr(array, "_mmap", None)
            if handle is not None and hasattr(mmap, "MADV_DONTNEED"):
                handle.madvise(mmap.MADV_DONTNEED)
