"""Files written whole or not at all, and read back with one clear line when they are missing or damaged.

Every output, cache and checkpoint of the library is written through :func:`atomic`: into a temporary file beside
the target, named by the writing process so that processes writing the same file never share one, then moved over
the target in one step. A run killed mid-write leaves the old file or the new one, never half of one. The readers
turn a missing, truncated or foreign file into an :class:`~common.errors.AttributionError` that names it.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from common.errors import AttributionError, first_line, require, require_file


@contextmanager
def atomic(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """A temporary path to write ``path``'s new contents to; moved over ``path`` when the block ends without error.

    Args:
        path: the file to replace.
        suffix: ending the temporary name must keep for its writer (``".npy"``: ``np.save`` appends one otherwise).
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # left only when the block failed


@contextmanager
def folder_lock(folder: str | Path, take: bool = True) -> Iterator[None]:
    """Hold ``folder/.lock`` while the block runs, so a second run into the same folder stops at once with one line
    instead of doing all the work again beside the first (released when the block ends or the process dies). With
    ``take`` false (another process of the same run holds it) nothing is locked."""
    import fcntl

    if not take:
        yield
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise AttributionError(f"{folder} is being written by another run ({holder}); wait for it to finish, or "
                                   "choose another --out") from None  # fmt: skip
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def replace_folder(folder: str | Path, new: str | Path) -> None:
    """Put the complete folder ``new`` in ``folder``'s place: the old one is moved aside, the new one moved in, then
    the old one removed (a run killed between the two moves leaves both, beside each other, nothing half-written)."""
    folder, new = Path(folder), Path(new)
    aside = folder.with_name(f".{folder.name}.replaced")
    shutil.rmtree(aside, ignore_errors=True)
    if folder.exists():
        os.replace(folder, aside)
    os.replace(new, folder)
    shutil.rmtree(aside, ignore_errors=True)


def write_json(path: str | Path, data: Any, sort_keys: bool = False, indent: int | None = 2) -> None:
    """Write JSON atomically, ending in a newline."""
    with atomic(path) as tmp:
        tmp.write_text(json.dumps(data, indent=indent, sort_keys=sort_keys) + "\n")


def save_tensors(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write tensors (moved to the CPU, made contiguous) as one safetensors file, atomically."""
    from safetensors.torch import save_file

    with atomic(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def read_text(path: str | Path, what: str) -> str:
    """A UTF-8 text file's contents; a missing file or one in another encoding is one line naming it."""
    require_file(path, what)
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise AttributionError(f"{path} is not UTF-8 text (byte {err.start}); save it as UTF-8") from None


def read_json(path: str | Path, what: str, remedy: str = "copy it again") -> Any:
    """A JSON file's contents; a missing or broken file is one line naming it (and ``remedy``)."""
    require_file(path, what)
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise AttributionError(f"{path} is damaged (not valid JSON); {remedy}") from None


def read_safetensors(path: str | Path, what: str = "model weights") -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; a missing, partial or corrupt file is one line naming it."""
    from safetensors.torch import load_file

    require_file(path, what)
    try:
        return load_file(str(path))
    except Exception as err:  # noqa: BLE001 - safetensors raises several types for truncated or corrupt files
        raise AttributionError(
            f"{path} is damaged or incomplete ({err.__class__.__name__}: {str(err)[:80]}); copy it again"
        ) from None


def read_pickle(path: str | Path, what: str = "weights file") -> dict[str, torch.Tensor]:
    """A state dict saved with ``torch.save``, read with ``weights_only=True`` (no code runs); damage is one line."""
    require_file(path, what)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as err:
        raise AttributionError(f"{path} is damaged or incomplete ({first_line(err)}); download it again") from None
    except Exception as err:  # noqa: BLE001 - the weights-only unpickler refuses anything but tensors
        raise AttributionError(f"{path} is not a plain tensor file ({first_line(err)})") from None
    require(
        isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values()),
        f"{path} is not a state dict of tensors",
    )
    return state
