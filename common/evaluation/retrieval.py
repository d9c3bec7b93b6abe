"""Retrieval metrics of a ranking against known relevant items (the AbC benchmark's exemplars).

A query's scores rank every candidate (exemplars and the pretraining set); the relevant items are
the customized model's exemplars. Recall@K is the share of them among the K highest scores; average
precision is the mean, over the relevant items, of the precision at each one's rank (AbC's
``eval.py``: sum of i / rank_i over the i-th relevant item, divided by their number).

Ties are ranked pessimistically: a relevant item tied with irrelevant ones is placed after them, so
a method that gives everything the same score is credited nothing (the original sorts with an
unstable argsort, which breaks ties arbitrarily). Scores that are not finite are refused.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from common.errors import require


def relevant_ranks(scores: np.ndarray, relevant: Sequence[int]) -> np.ndarray:
    """1-based ranks of the relevant items, ties broken against them, ascending.

    Args:
        scores: one score per candidate (N,), higher ranks first.
        relevant: indices of the relevant candidates (distinct).
    Returns:
        int64 ranks (R,), sorted.
    """
    scores = np.asarray(scores, dtype=np.float64)
    rel = np.asarray(relevant, dtype=np.int64)
    require(scores.ndim == 1 and np.isfinite(scores).all(), "scores must be a finite vector (one per candidate)")
    require(len(rel) > 0, "no relevant items to rank")
    require(len(np.unique(rel)) == len(rel), "relevant items repeat")
    require(bool(((rel >= 0) & (rel < len(scores))).all()), f"relevant items outside 0..{len(scores) - 1}")
    is_rel = np.zeros(len(scores), dtype=bool)
    is_rel[rel] = True
    # Sorted by score (descending), then irrelevant before relevant: the pessimistic tie order.
    order = np.lexsort((is_rel, -scores))
    return np.sort(np.flatnonzero(is_rel[order]) + 1)


def recall_at_k(scores: np.ndarray, relevant: Sequence[int], k: int) -> float:
    """Share of the relevant items among the ``k`` highest scores."""
    require(k >= 1, f"K must be at least 1, got {k}")
    ranks = relevant_ranks(scores, relevant)
    return float((ranks <= k).sum() / len(ranks))


def average_precision(scores: np.ndarray, relevant: Sequence[int]) -> float:
    """Mean over the relevant items of the precision at each one's rank (the full ranking)."""
    ranks = relevant_ranks(scores, relevant)
    return float(np.mean(np.arange(1, len(ranks) + 1) / ranks))
