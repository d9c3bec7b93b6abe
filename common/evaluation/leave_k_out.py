"""Leave-K-out evaluation of any registered method: remove its top-K, retrain, measure the query's loss.

For every (ranking source, query, K) the top-K training images of that source's ranking are
removed and a model is retrained from scratch by the benchmark's ``retrain`` function, cached by
the excluded set (a set is never trained twice, whichever method or query asked for it: a query-
independent random baseline is thus shared by every query). Each metric file records the excluded
set and the ranking it came from; when either changed (the query was attributed again), the
metric is recomputed rather than reused.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from common.config import method_config
from common.data import ArrayTrainingSet, Query
from common.errors import require
from common.evaluation.exclusion import exclusion_key, top_k_exclusion
from common.evaluation.tables import build_tables
from common.files import write_json
from common.fingerprints import digest
from common.methods import get_method, methods
from common.methods.base import run_method
from common.methods.candidates import build_method
from common.model import DiffusionModel
from common.outputs import prepare_run_dir


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


def external_sources(
    items: Sequence[str],
    queries: Sequence[Query],
    taken: set[str],
    num_train: int,
    train_fingerprint: str,
    model_fingerprint: str,
    max_k: int,
) -> list[RankingSource]:
    """Rankings made elsewhere, ``LABEL=FOLDER`` each (e.g. a method variant): checked before anything runs.

    Args:
        taken: row labels already used (method names): a label may not repeat one.
    """
    sources: list[RankingSource] = []
    for item in items:
        label, sep, folder = item.partition("=")
        require(bool(sep and label and folder), f"--rankings takes LABEL=FOLDER, got {item!r}")
        require(
            bool(re.fullmatch(r"[A-Za-z0-9_.-]+", label)) and label not in (".", ".."),
            f"--rankings label {label!r}: use letters, digits, '_', '.' or '-'",
        )
        require(
            label not in taken | {s.method for s in sources},
            f"--rankings label {label!r} is a method's name or another row's",
        )
        require(Path(folder).is_dir(), f"--rankings {label}: no folder {folder}")
        missing = [q.id for q in queries if not (Path(folder) / q.id / "ranking.json").exists()]
        require(not missing, f"--rankings {label}: {folder} has no ranking for {', '.join(missing)}")
        source = RankingSource(label, Path(folder))
        for query in queries:
            top_k_exclusion(source.ranking(query), max_k, num_train, train_fingerprint, model_fingerprint)
        sources.append(source)
    return sources


def method_sources(
    names: Sequence[str],
    queries: Sequence[Query],
    root: str | Path,
    random_seeds: int,
    make: Callable[[str, int | None], object],
) -> list[RankingSource]:
    """One source per registered method (``random``: one per seed), its rankings in ``root/<name>[_s<seed>]``.

    Rankings already there are reused (:func:`common.methods.base.run_method` skips finished queries);
    missing ones are made now by ``make(name, seed)``, a method with the run's settings (the seed
    replaced for the random baseline's repeats).
    """
    sources = []
    for name in names:
        for seed in range(random_seeds) if name == "random" else [None]:
            folder = Path(root) / (name if seed is None else f"{name}_s{seed}")
            run_method(make(name, seed), queries, folder, plot=False)
            sources.append(RankingSource(name, folder, seed))
    return sources


def ranking_sources(
    args: argparse.Namespace,
    model: DiffusionModel,
    data: ArrayTrainingSet,
    queries: Sequence[Query],
    root: str | Path,
    max_k: int,
    random_seeds: int,
    **context,
) -> list[RankingSource]:
    """The rows of a leave-K-out table: ``args.methods`` (settings from ``args``) and ``args.rankings``.

    Each registered method is built with the settings its command-line flags give (the random
    baseline once per seed) and ``context`` (``load_model``, ``accelerator``), its cache in
    ``root/cache/<name>``; the ``LABEL=FOLDER`` items are checked before anything runs.
    """
    extra = external_sources(
        args.rankings, queries, set(methods()), len(data), data.fingerprint, model.fingerprint(), max_k
    )

    def make(name: str, seed: int | None):
        cls = get_method(name)
        settings = method_config(cls, args)
        settings = settings if seed is None else replace(settings, seed=seed)
        return build_method(cls, settings, args, model, data, lambda n: Path(root) / "cache" / n, **context)

    return method_sources(args.methods, queries, root, random_seeds, make) + extra


def ranking_id(path: Path) -> str:
    """Identifies a ranking's content (its config and scores), so a re-attributed query is noticed."""
    files = (path.with_name(name) for name in ("config.json", "scores.npy"))
    return digest(*(file.read_bytes() if file.exists() else b"" for file in files))


def _jobs(original: DiffusionModel, num_train: int, train_fingerprint: str, queries: Sequence[Query],
          sources: Sequence[RankingSource], ks: Sequence[int]) -> list[tuple]:  # fmt: skip
    """Every (source, query, K, excluded indices, ranking id), each ranking checked before any retraining."""
    for k in ks:
        require(1 <= k <= num_train, f"K = {k} must lie in [1, {num_train}] (the training-set size)")
    fingerprint = original.fingerprint()
    jobs = []
    for k in ks:
        for source in sources:
            for query in queries:
                path = source.ranking(query)
                excluded = top_k_exclusion(path, k, num_train, train_fingerprint, fingerprint)
                jobs.append((source, query, k, excluded, ranking_id(path)))
    return jobs


def _reusable(path: Path, key: str, rid: str, expect: dict | None) -> bool:
    """Whether the metric file at ``path`` was measured on this removal set and ranking, with ``expect``'s fields."""
    if not path.exists():
        return False
    old = json.loads(path.read_text())
    if old.get("excluded") != key or old.get("ranking") != rid:
        print(f"{path}: its ranking changed since it was measured; measuring again")
        return False
    if all(old.get(field) == value for field, value in (expect or {}).items()):
        return True
    print(f"{path}: measured without {expect}; measuring again")
    return False


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
    rank: int = 0,
    world: int = 1,
    barrier: Callable[[], None] | None = None,
    expect: dict | None = None,
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
        rank, world, barrier: several processes that retrain together (``accelerate launch``): every
            process joins every retraining; job i's metrics are measured and written by process i mod
            ``world``; the main process (rank 0) prepares the folder and, after ``barrier()``, the tables.
        expect: fields a metric file must hold with these values to be reused (e.g. ``{"off_target": 4}``): one
            measured without them is measured again on its cached model, with no retraining.
    """
    out = Path(out)
    main = rank == 0
    if main:
        prepare_run_dir(out, identity, overwrite)
    if barrier is not None:
        barrier()
    jobs = _jobs(original, num_train, train_fingerprint, queries, sources, ks)
    models = out / "models"
    files = []
    for i, (source, query, k, excluded, rid) in enumerate(jobs):
        name = f"k{k}" + (f"_s{source.seed}" if source.seed is not None else "")
        path = out / "metrics" / source.method / query.id / f"{name}.json"
        files.append(path)
        key = exclusion_key(excluded)
        if _reusable(path, key, rid, expect):
            continue
        label = f"{source.method} {query.id} K={k}" + (f" seed {source.seed}" if source.seed is not None else "")
        if main:
            print(f"[{i + 1}/{len(jobs)}] {label}")
        retrained = retrain(excluded, models / key)
        if i % world != rank:
            continue
        record = {"method": source.method, "query": query.id, "k": k, "seed": source.seed}
        record |= {"excluded": key, "ranking": rid} | metrics(original, retrained, query)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, record)
    if barrier is not None:
        barrier()
    if not main:
        return ""
    order = list(dict.fromkeys(s.method for s in sources))
    return build_tables(files, out, order)
