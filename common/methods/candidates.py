"""Candidate re-ranking: a cheap method ranks every training image, the exact method scores only its top M.

The final ranking puts the M candidates first, by their exact scores, and the other images after them in the cheap
method's order. Several cheap methods (``pixel+text-condition``) take turns: their rankings are interleaved, first
place of each, then second place of each, skipping images already placed (:func:`interleaved`), so the candidates
hold the top of every one of them. Which cheap method finds the exact method's top images depends on the model
(docs/results/tiny_fast_paths.md): pixel similarity on one tiny model, the text condition on another.

Exact scores of the candidates are those a full pass gives at the same indices: their noise is keyed by the training
index (:mod:`common.keyed_random`), whichever images are scored beside them.

``scores.npy`` keeps one value per image so that every reader of rankings (retrieval, leave-K-out, plots) sees the
merged order: the candidates' exact scores, and for the others placeholders below every candidate (the lowest
candidate score minus one minus the image's place in the cheap order). ``ranking.json`` records which images were
scored exactly (``stats["candidates"]``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.errors import require


@dataclass
class CandidatesConfig:
    """Which images the exact method scores (default: all of them)."""

    method: str = field(
        default="",
        metadata={
            "help": "a registered method that ranks every image, or several joined by '+' (their rankings "
            "interleaved); the exact method scores only the top `count` (empty: every image is scored exactly)"
        },
    )
    count: float = field(
        default=0.0, metadata={"help": "candidates per query: a number of images (>= 1) or a fraction of them (< 1)"}
    )

    def __post_init__(self) -> None:
        if not self.method:
            return
        names = self.methods
        require(all(names), f"candidates.method {self.method!r} has an empty name (methods are joined by '+')")
        require(len(set(names)) == len(names), f"candidates.method {self.method!r} names a method twice")
        require(self.count > 0, f"candidates.count must be positive, got {self.count:g}")
        require(
            self.count < 1 or float(self.count).is_integer(),
            f"candidates.count is a whole number of images (>= 1) or a fraction (< 1), got {self.count:g}",
        )

    @property
    def enabled(self) -> bool:
        return bool(self.method)

    @property
    def methods(self) -> list[str]:
        """The cheap methods' names, in their turn order."""
        return self.method.split("+") if self.method else []

    def size(self, n: int) -> int:
        """The number of candidates M among ``n`` training images; refused when it is not in [1, n]."""
        m = math.ceil(self.count * n) if self.count < 1 else int(self.count)
        require(1 <= m <= n, f"candidates.count {self.count:g} gives {m} candidates of {n} training images")
        return m


def top_candidates(cheap: np.ndarray, m: int) -> np.ndarray:
    """The ``m`` images the cheap scores (N,) rank highest, as ascending training indices (M,) (ties by index)."""
    order = np.argsort(-np.asarray(cheap, dtype=np.float64), kind="stable")
    return np.sort(order[:m])


def interleaved(scores: list[np.ndarray]) -> np.ndarray:
    """One cheap score per image (N,) whose descending order takes the methods' rankings in turns: each method's first
    image, then each one's second, and so on, an image keeping its earliest turn (ties within a method by index).
    For one method its order is that method's own.

    Args:
        scores: each cheap method's score of every image (N,), in turn order.
    Returns:
        float64 (N,): minus each image's place in the interleaved order (0 for the first).
    """
    require(len(scores) > 0 and len({len(s) for s in scores}) == 1, "cheap scores of differing lengths")
    n, k = len(scores[0]), len(scores)
    turn = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
    for j, cheap in enumerate(scores):
        order = np.argsort(-np.asarray(cheap, dtype=np.float64), kind="stable")
        place = np.empty(n, dtype=np.int64)
        place[order] = np.arange(n)
        turn = np.minimum(turn, place * k + j)
    out = np.empty(n, dtype=np.float64)
    out[np.argsort(turn, kind="stable")] = -np.arange(n, dtype=np.float64)
    return out


def merged_scores(exact: np.ndarray, candidates: np.ndarray, cheap: np.ndarray) -> np.ndarray:
    """Per-orientation scores (N, F) whose flip-max ranks the candidates first by their exact scores, then the others
    by the cheap scores.

    Args:
        exact: the candidates' exact per-orientation scores (M, F).
        candidates: their training indices (M,), distinct.
        cheap: the cheap method's score of every image (N,).
    Returns:
        float64 (N, F): the exact scores at the candidates; elsewhere the same placeholder in every column, below
        every candidate's flip-max and falling in the cheap order.
    """
    exact = np.asarray(exact, dtype=np.float64)
    candidates = np.asarray(candidates, dtype=np.int64)
    n = len(cheap)
    require(exact.shape[0] == len(candidates), f"{exact.shape[0]} exact scores for {len(candidates)} candidates")
    require(len(np.unique(candidates)) == len(candidates), "candidate indices repeat")
    require(bool(np.isfinite(exact).all()), "exact candidate scores are not finite")
    out = np.empty((n, exact.shape[1]), dtype=np.float64)
    out[candidates] = exact
    rest = np.setdiff1d(np.arange(n), candidates)
    if len(rest):
        order = rest[np.argsort(-np.asarray(cheap, dtype=np.float64)[rest], kind="stable")]
        floor = exact.max(axis=1).min() - 1.0
        out[order] = (floor - np.arange(len(order), dtype=np.float64))[:, None]
    return out


def build_method(cls: type, cfg, args, model, data, cache_for: Callable[[str], Path | None], **context):
    """``cls(cfg, ...)`` with its candidate methods attached when ``cfg.candidates`` names them (each built from the
    same flags ``args`` with :func:`common.config.method_config`, on the same model and training set).

    Args:
        cache_for: a method's name -> its cache folder (None: in memory).
        context: ``load_model`` and ``accelerator``, passed to both methods.
    """
    from common.config import method_config
    from common.methods.registry import get_method

    method = cls(cfg, model, data, cache_for(cls.name), **context)
    candidates = getattr(cfg, "candidates", None)
    if candidates is not None and candidates.enabled:
        cheap = []
        for name in candidates.methods:
            cheap_cls = get_method(name)
            cheap.append(cheap_cls(method_config(cheap_cls, args), model, data, cache_for(cheap_cls.name), **context))
        method.use_candidates(*cheap)
    return method
