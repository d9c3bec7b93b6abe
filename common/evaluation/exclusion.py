"""Which training images a leave-K-out retraining removes, and a stable name for each such set."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from common.errors import require
from common.fingerprints import digest
from common.outputs import read_ranking


def exclusion_key(indices: Iterable[int]) -> str:
    """A short hash of a set of training indices (order and repeats do not matter)."""
    canon = ",".join(str(i) for i in sorted({int(i) for i in indices}))
    return digest(canon)


def top_k_exclusion(
    ranking_path: str | Path, k: int, num_train: int, train_fingerprint: str, model_fingerprint: str | None = None
) -> list[int]:
    """The top-``k`` training indices of a ranking (both flips of an image go together).

    Uses ``scores.npy`` next to the ranking when ``k`` exceeds the listed top-k.

    Raises:
        AttributionError: ``k`` out of range, or a ranking made for another training set or model.
    """
    ranking = read_ranking(ranking_path)
    require(1 <= k <= num_train, f"K = {k} must lie in [1, {num_train}] (the training-set size)")
    require(
        ranking["num_train"] == num_train and ranking["train_fingerprint"] == train_fingerprint,
        f"{ranking_path} ranks another training set ({ranking['num_train']} images, "
        f"fingerprint {ranking['train_fingerprint']}; expected {num_train}, {train_fingerprint})",
    )
    require(
        model_fingerprint is None or ranking["model_fingerprint"] == model_fingerprint,
        f"{ranking_path} was made on another model (fingerprint {ranking['model_fingerprint']}; "
        f"expected {model_fingerprint})",
    )
    if k <= len(ranking["top_k"]):
        return [int(r["index"]) for r in ranking["top_k"][:k]]
    scores_path = Path(ranking_path).with_name("scores.npy")
    require(
        scores_path.exists(), f"K = {k} exceeds the {len(ranking['top_k'])} listed images and {scores_path} is missing"
    )
    scores = np.load(scores_path).astype(np.float64)
    require(scores.shape == (num_train,), f"{scores_path} holds {scores.shape} scores, expected ({num_train},)")
    return np.lexsort((np.arange(num_train), -scores))[:k].tolist()
