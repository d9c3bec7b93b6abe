"""Run folders and ranking files.

A run folder holds ``config.json`` (the resolved config). A run refuses a folder whose saved
config differs, or a non-empty folder with no config at all, unless told to overwrite.

``ranking.json`` schema (version 2)::

    {"schema": 2,
     "query": {"id": str, "prompt": str, "image": str | null},
     "method": str,                        # e.g. "unlearning", "pixel"
     "num_train": int,                     # training images scored (= len(scores.npy))
     "train_fingerprint": str,             # identifies the training set the indices refer to
     "model_fingerprint": str,             # identifies the model whose training data was ranked
     "top_k": [{"rank": 1, "index": int, "score": float, "caption": str, "image": str | null}, ...],
     "stats": {...}}                       # method-specific numbers (e.g. update size, query loss)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.data import ArrayTrainingSet
from common.errors import AttributionError, require, require_file
from common.files import atomic, write_json

SCHEMA_VERSION = 2
TOP_K_FIELDS = ("rank", "index", "score", "caption", "image")


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _differences(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def config_matches(path: str | Path, config: dict) -> bool:
    """Whether ``path`` holds a ``config.json`` equal to ``config`` (as JSON)."""
    saved = Path(path) / "config.json"
    return saved.exists() and not _differences(json.loads(saved.read_text()), json.loads(json.dumps(config)))


def prepare_run_dir(path: str | Path, config: dict, overwrite: bool = False) -> Path:
    """Create ``path`` with ``config.json``, or accept it if it was made under the same config.

    Raises:
        AttributionError: the folder was made under another config, or holds foreign files.
    """
    path = Path(path)
    config = json.loads(json.dumps(config))  # normalise tuples and numbers as JSON would
    saved = path / "config.json"
    if path.exists() and any(path.iterdir()):
        if overwrite:
            shutil.rmtree(path)
        elif not saved.exists():
            raise AttributionError(f"{path} is not empty and holds no config.json; choose another folder")
        else:
            diff = _differences(json.loads(saved.read_text()), config)
            if diff:
                raise AttributionError(
                    f"{path} was made under a different config ({', '.join(diff[:4])} differ); "
                    "pass --overwrite or choose another folder"
                )
            return path
    path.mkdir(parents=True, exist_ok=True)
    write_json(saved, config)
    return path


def build_ranking(
    query: dict,
    method: str,
    scores: np.ndarray,
    data: ArrayTrainingSet,
    top_k: int = 100,
    stats: dict | None = None,
    model_fingerprint: str = "",
) -> dict:
    """The ranking record: the top-k training images by score, highest first (ties by index)."""
    scores = np.asarray(scores, dtype=np.float64)
    require(scores.shape == (len(data),), f"expected {len(data)} scores, got shape {scores.shape}")
    if not np.isfinite(scores).all():
        bad = int(np.flatnonzero(~np.isfinite(scores))[0])
        if hasattr(data, "images") and not bool(torch.isfinite(data.images(torch.tensor([bad]))).all()):
            source = f" ({data.source})" if getattr(data, "source", None) else ""
            raise AttributionError(f"training image {bad} has NaN or inf in its model input{source}")
        raise AttributionError(f"NaN or inf in the scores (first: training image {bad})")
    order = np.lexsort((np.arange(len(scores)), -scores))[:top_k]
    top = [
        {
            "rank": r + 1,
            "index": int(i),
            "score": float(scores[i]),
            "caption": data.captions[i][0],
            "image": data.image_paths[i],
        }
        for r, i in enumerate(order)
    ]
    return {
        "schema": SCHEMA_VERSION,
        "query": {"id": query["id"], "prompt": query.get("prompt", ""), "image": query.get("image")},
        "method": method,
        "num_train": len(data),
        "train_fingerprint": data.fingerprint,
        "model_fingerprint": model_fingerprint,
        "top_k": top,
        "stats": stats or {},
    }


def write_ranking(folder: str | Path, ranking: dict, scores: np.ndarray) -> None:
    """Write ``scores.npy`` (float32, one per training image) and then ``ranking.json``, each whole or not at all."""
    folder = Path(folder)
    with atomic(folder / "scores.npy", ".npy") as tmp:
        np.save(tmp, np.asarray(scores, dtype=np.float32))
    write_json(folder / "ranking.json", ranking)


def is_finished(folder: str | Path, num_train: int) -> bool:
    """Whether a query's run folder holds complete outputs: a readable ``ranking.json`` and a ``scores.npy`` of
    ``num_train`` finite scores (a zero-byte or truncated file means the query is attributed again)."""
    folder = Path(folder)
    try:
        json.loads((folder / "ranking.json").read_text())
        scores = np.load(folder / "scores.npy")
    except (OSError, ValueError, EOFError):  # missing, truncated, not JSON, not an array
        return False
    return scores.shape == (num_train,) and bool(np.isfinite(scores).all())


def read_ranking(path: str | Path) -> dict:
    """Read and validate a ``ranking.json``."""
    require_file(path, "ranking file")
    try:
        ranking = json.loads(Path(path).read_text())
    except json.JSONDecodeError:
        raise AttributionError(f"{path} is not valid JSON") from None
    require(isinstance(ranking, dict) and "schema" in ranking, f"{path}: missing field 'schema'")
    require(
        ranking["schema"] == SCHEMA_VERSION,
        f"{path}: schema {ranking['schema']} is not {SCHEMA_VERSION} (made by an older version); attribute again",
    )
    for key in ("query", "method", "num_train", "train_fingerprint", "model_fingerprint", "top_k"):
        require(key in ranking, f"{path}: missing field {key!r}")
    prev, seen = float("inf"), set()
    for r, item in enumerate(ranking["top_k"], 1):
        complete = isinstance(item, dict) and all(k in item for k in TOP_K_FIELDS)
        require(complete, f"{path}: top_k entry {r} lacks a field")
        index, score = item["index"], item["score"]
        require(type(index) is int, f"{path}: top_k entry {r} has index {index!r}, not an integer")
        require(isinstance(score, (int, float)) and not isinstance(score, bool), f"{path}: top_k entry {r} has score "
                f"{score!r}, not a number")  # fmt: skip
        require(item["rank"] == r and score <= prev, f"{path}: top_k is not sorted by score")
        require(0 <= index < ranking["num_train"], f"{path}: index {index} out of range")
        require(index not in seen, f"{path}: index {index} is listed twice")
        prev = score
        seen.add(index)
    return ranking


class _Listing:
    """What ``build_ranking`` reads of a training set: captions, image paths, fingerprint, size."""

    def __init__(self, captions: list[list[str]], image_paths: list[str], fingerprint: str) -> None:
        self.captions, self.image_paths, self.fingerprint = captions, image_paths, fingerprint

    def __len__(self) -> int:
        return len(self.captions)


def average_rankings(
    folders: list[Path], out: str | Path, captions: list[list[str]], image_paths: list[str], top_k: int = 100
) -> dict:
    """Average the ``scores.npy`` of several runs of one query into ``out`` (``scores.npy``, ``ranking.json``).

    The runs must rank the same query on the same model and training set (e.g. the same method under
    other seeds); ``captions`` and ``image_paths`` list the training images for the top-k entries.
    """
    rankings = [read_ranking(Path(f) / "ranking.json") for f in folders]
    first = rankings[0]
    for f, r in zip(folders[1:], rankings[1:]):
        for key in ("model_fingerprint", "train_fingerprint", "num_train"):
            require(r[key] == first[key], f"{f}: another {key.replace('_', ' ')} than {folders[0]}")
        require(r["query"]["id"] == first["query"]["id"], f"{f}: another query than {folders[0]}")
    require(len(captions) == first["num_train"], f"{len(captions)} captions for {first['num_train']} training images")
    scores = np.mean([np.load(Path(f) / "scores.npy").astype(np.float64) for f in folders], axis=0)
    listing = _Listing(captions, image_paths, first["train_fingerprint"])
    stats = {"averaged_runs": [str(f) for f in folders]}
    ranking = build_ranking(first["query"], first["method"], scores, listing, top_k, stats, first["model_fingerprint"])
    Path(out).mkdir(parents=True, exist_ok=True)
    write_ranking(out, ranking, scores)
    return ranking
