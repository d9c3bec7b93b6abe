"""How much two attributions of the same query agree: top-k overlap and Spearman rank correlation.

Used for run-to-run stability (two runs that differ only in their seeds) and for comparing methods.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from common.errors import require
from common.evaluation.tables import mean_se


def average_ranks(scores: np.ndarray) -> np.ndarray:
    """Ranks 1..N of ``scores`` ascending, ties given the mean of the ranks they span."""
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # Boundaries of runs of equal values in the sorted order.
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], len(scores)]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + 1 + e) / 2.0
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (Pearson's on average ranks); NaN when either is constant."""
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(np.sqrt((ra**2).sum() * (rb**2).sum()))
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


def top_k_overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """Share of the k highest-scored indices of ``a`` that are among ``b``'s k highest (stable order on ties)."""
    k = min(k, len(a))
    top_a = set(np.argsort(-a, kind="stable")[:k].tolist())
    top_b = set(np.argsort(-b, kind="stable")[:k].tolist())
    return len(top_a & top_b) / k


def ranking_agreement(a: np.ndarray, b: np.ndarray, ks: tuple[int, ...] = (10, 100)) -> dict[str, float]:
    """Top-k overlaps and Spearman between two score vectors of the same training set."""
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    require(a.shape == b.shape, f"the two attributions score different training sets: {a.shape} vs {b.shape}")
    return {f"top{k}": top_k_overlap(a, b, k) for k in ks} | {"spearman": spearman(a, b)}


def against_exact(exact: np.ndarray, fast: np.ndarray, fraction: float = 0.01) -> dict[str, float]:
    """How well a fast path's scores of one query reproduce the exact ones (the same training set).

    Returns:
        ``top10``: the share of the exact top-10 inside the fast top-10; ``top_fraction``: the same for the top
        ⌈fraction · N⌉; ``spearman_top_fraction``: Spearman between the two over the exact top ⌈fraction · N⌉ images
        (does the fast path order the images that matter as exact does).
    """
    exact, fast = np.asarray(exact, dtype=np.float64).ravel(), np.asarray(fast, dtype=np.float64).ravel()
    require(exact.shape == fast.shape, f"the two attributions score different training sets: {exact.shape} vs "
                                       f"{fast.shape}")  # fmt: skip
    require(0 < fraction <= 1, f"fraction must lie in (0, 1], got {fraction}")
    k = max(1, math.ceil(fraction * len(exact)))
    top = np.argsort(-exact, kind="stable")[:k]
    return {
        "top10": top_k_overlap(exact, fast, 10),
        "top_fraction": top_k_overlap(exact, fast, k),
        "spearman_top_fraction": spearman(exact[top], fast[top]),
    }


def compare_runs(
    a: Path,
    b: Path,
    ks: tuple[int, ...] = (10, 100),
    only: set[str] | None = None,
    measure: Callable[[np.ndarray, np.ndarray], dict[str, float]] | None = None,
) -> dict:
    """Agreement of every query folder (with ``scores.npy``) that two method output folders share.

    Args:
        only: compare only these query names (e.g. the queries of a smaller run, for a like-for-like row).
        measure: (a's scores, b's scores) -> measures of one query; default :func:`ranking_agreement` with ``ks``.
    Returns per-query values and the mean ± SE over queries. Refuses folders with no query in common
    or rankings of different models (``ranking.json``'s ``model_fingerprint``).
    """
    names = sorted(p.parent.name for p in Path(a).glob("*/scores.npy") if (Path(b) / p.parent.name).is_dir())
    names = [n for n in names if (Path(b) / n / "scores.npy").exists() and (only is None or n in only)]
    require(bool(names), f"{a} and {b} have no query folder with scores.npy in common")
    per_query = {}
    for name in names:
        fa, fb = (json.loads((Path(d) / name / "ranking.json").read_text()) for d in (a, b))
        require(
            fa.get("model_fingerprint") == fb.get("model_fingerprint"),
            f"{name}: the two rankings come from different models",
        )
        scores = [np.load(Path(d) / name / "scores.npy") for d in (a, b)]
        per_query[name] = measure(*scores) if measure is not None else ranking_agreement(*scores, ks)
    return {"queries": per_query, "summary": summarize(per_query)}


def summarize(per_query: dict[str, dict[str, float]]) -> dict[str, dict]:
    """Mean ± SE over queries, with the range, of each agreement measure (NaNs left out)."""
    summary = {}
    for key in next(iter(per_query.values())):
        values = [v[key] for v in per_query.values() if np.isfinite(v[key])]
        if values:
            mean, se = mean_se(values)
            summary[key] = {"mean": mean, "se": se, "min": min(values), "max": max(values), "n": len(values)}
    return summary
