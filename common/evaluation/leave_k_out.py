"""Leave-K-out evaluation of any registered method: remove its top-K, retrain, measure the query's loss.

For every (ranking source, query, K) the top-K training images of that source's ranking are
removed and a model is retrained from scratch by the benchmark's ``retrain`` function, cached by
the excluded set (a set is never trained twice, whichever method or query asked for it: a query-
independent random baseline is thus shared by every query). Each metric file records the excluded
set and the ranking it came from; when either changed (the query was attributed again), the
metric is recomputed rather than reused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from common.data import Query
from common.errors import require
from common.evaluation.exclusion import exclusion_key, top_k_exclusion
from common.evaluation.tables import build_tables
from common.model import DiffusionModel
from common.outputs import prepare_run_dir, write_json


@dataclass
class RankingSource:
    """Rankings of one method run: ``folder/<query id>/ranking.json``.

    Attributes:
        method: the row label in the table (e.g. ``unlearning``, ``random``).
        folder: the run's output folder (as written by :func:`common.methods.base.run_method`).
        seed: the repeat number of a seeded baseline (random), None otherwise.
    """

    method: str
    folder: Path
    seed: int | None = None

    def ranking(self, query: Query) -> Path:
        return Path(self.folder) / query.id / "ranking.json"


def ranking_id(path: Path) -> str:
    """Identifies a ranking's content (its config and scores), so a re-attributed query is noticed."""
    h = hashlib.sha256()
    for name in ("config.json", "scores.npy"):
        file = path.with_name(name)
        h.update(file.read_bytes() if file.exists() else b"")
    return h.hexdigest()[:16]


def leave_k_out(
    original: DiffusionModel,
    num_train: int,
    train_fingerprint: str,
    queries: Sequence[Query],
    sources: Sequence[RankingSource],
    ks: Sequence[int],
    retrain: Callable[[list[int], Path], DiffusionModel],
    metrics: Callable[[DiffusionModel, DiffusionModel, Query], dict],
    out: str | Path,
    identity: dict,
    overwrite: bool = False,
) -> str:
    """Run every (source, query, K), write ``out/metrics/...`` and the tables; return the Markdown table.

    Args:
        original: the model the rankings were made on.
        num_train, train_fingerprint: its training set (rankings of another set or model are refused).
        retrain: ``(excluded indices, model folder) -> model`` trained from scratch without them; it
            must reuse a finished model in the folder and resume an interrupted one.
        metrics: ``(original, retrained, query) -> {"delta_loss": ..., "mse": ..., ...}``.
        identity: what the retrained models and metrics depend on (recipe, metric settings); an
            output folder made under another identity is refused unless ``overwrite``.
    """
    out = Path(out)
    prepare_run_dir(out, identity, overwrite)
    for k in ks:
        require(1 <= k <= num_train, f"K = {k} must lie in [1, {num_train}] (the training-set size)")
    fingerprint = original.fingerprint()
    jobs = []  # (source, query, k, excluded, ranking id): all checked before any retraining
    for k in ks:
        for source in sources:
            for query in queries:
                path = source.ranking(query)
                excluded = top_k_exclusion(path, k, num_train, train_fingerprint, fingerprint)
                jobs.append((source, query, k, excluded, ranking_id(path)))
    models = out / "models"
    files = []
    for i, (source, query, k, excluded, rid) in enumerate(jobs):
        name = f"k{k}" + (f"_s{source.seed}" if source.seed is not None else "")
        path = out / "metrics" / source.method / query.id / f"{name}.json"
        files.append(path)
        key = exclusion_key(excluded)
        if path.exists():
            old = json.loads(path.read_text())
            if old.get("excluded") == key and old.get("ranking") == rid:
                continue
            print(f"{path}: its ranking changed since it was measured; measuring again")
        label = f"{source.method} {query.id} K={k}" + (f" seed {source.seed}" if source.seed is not None else "")
        print(f"[{i + 1}/{len(jobs)}] {label}")
        retrained = retrain(excluded, models / key)
        record = {"method": source.method, "query": query.id, "k": k, "seed": source.seed}
        record |= {"excluded": key, "ranking": rid} | metrics(original, retrained, query)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, record)
    order = list(dict.fromkeys(s.method for s in sources))
    return build_tables(files, out, order)
