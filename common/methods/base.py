"""What every attribution method is, and the driver that runs any of them over a list of queries.

A method prepares once per (model, training set) — a Fisher, pretrained losses, features or
projected gradients, each through :mod:`common.cache` — and then scores a query into one value per
training image and orientation. The driver takes the max over the orientations (the paper's
flip-max; models trained without flips score only the original) and writes the same outputs for
every method: ``config.json``, ``scores.npy``, ``ranking.json`` and ``top10.png``.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from common import keyed_random
from common.config import identity_settings
from common.data import ArrayTrainingSet, Query, as_numpy_uint8
from common.errors import require
from common.files import replace_folder
from common.fingerprints import fingerprint_tensors
from common.model import DiffusionModel
from common.outputs import build_ranking, config_matches, is_finished, prepare_run_dir, write_ranking
from common.plots import plot_top_images
from common.processes import barrier, is_main, rank_world


class Method(abc.ABC):
    """An attribution method: settings (``Config``), preparation, and per-query scores.

    Args:
        cfg: an instance of the method's ``Config`` dataclass.
        model: the model whose training data is attributed.
        data: its training set.
        cache_dir: where prepared artifacts are cached (None: computed in memory each time).
        load_model: loads another model of the same benchmark from a folder (TRAK's ensemble).
        accelerator: an ``accelerate.Accelerator`` whose processes share long passes (None: one process).
    """

    name: ClassVar[str]
    Config: ClassVar[type]
    uses_noise: ClassVar[bool] = True  # scores depend on keyed noise (recorded with its generator)
    shares_passes: ClassVar[bool] = False  # prepare() and scoring split their work over the processes
    uses_captions: ClassVar[bool] = False  # scores read the training captions' strings

    def __init__(
        self,
        cfg: Any,
        model: DiffusionModel,
        data: ArrayTrainingSet,
        cache_dir: str | Path | None = None,
        load_model: Callable[[str], DiffusionModel] | None = None,
        accelerator=None,
    ) -> None:
        require(isinstance(cfg, self.Config), f"{self.name} expects a {self.Config.__name__}")
        self.cfg = cfg
        self.model = model
        self.data = data
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.load_model = load_model
        self.accelerator = accelerator
        self.flips = bool(model.flips)

    def identity(self) -> dict:
        """The settings that change scores: the config without the fields marked as not changing results
        (:func:`common.config.no_effect`: batch sizes, chunks, memory)."""
        return identity_settings(self.cfg)

    def artifact_identity(self) -> dict:
        """What a prepared artifact depends on: model, training set, orientations and settings."""
        return {
            "method": self.name,
            "model": self.model.fingerprint(),
            "data": self.data.fingerprint,
            "flips": self.flips,
        } | {"settings": self.identity()}

    def cache_path(self, name: str) -> Path | None:
        return self.cache_dir / name if self.cache_dir is not None else None

    def flip_states(self) -> tuple[bool, ...]:
        """The training-image orientations scored: (original, flipped) for models trained with flips."""
        return (False, True) if self.flips else (False,)

    def prepare(self) -> None:  # noqa: B027 - optional hook: methods without artifacts have nothing to do
        """Compute or load what the method needs once per (model, training set)."""

    @abc.abstractmethod
    def score_flips(self, query: Query) -> tuple[np.ndarray, dict]:
        """Scores (N, F) float64, one column per orientation of :meth:`flip_states`, and JSON-able stats."""

    def flip_max(self, scores: np.ndarray) -> np.ndarray:
        """One score per training image (N,) from per-orientation scores (N, F): the max over orientations, the
        paper's flip-max (F = 1 for models trained without flips). The only place scores are reduced; a method that
        returns another shape is refused with one line."""
        scores = np.asarray(scores, dtype=np.float64)
        want = (len(self.data), len(self.flip_states()))
        require(scores.shape == want, f"{self.name} returned scores of shape {scores.shape}, expected {want}")
        return scores.max(axis=1)

    def score(self, query: Query) -> tuple[np.ndarray, dict]:
        """One score per training image (N,) of one query, and its stats."""
        scores, stats = self.score_flips(query)
        return self.flip_max(scores), stats

    def score_many(self, queries: Sequence[Query]) -> Iterator[tuple[Query, np.ndarray, dict]]:
        """(query, per-orientation scores (N, F), stats) for each query in order; methods that share work across
        queries override it (the driver takes the flip-max)."""
        for query in queries:
            t0 = time.time()
            scores, stats = self.score_flips(query)
            yield query, scores, {"seconds_query": round(time.time() - t0, 3)} | stats


def query_fingerprint(query: Query) -> str:
    """Identifies a query's content (model input, text condition and the batch noise stream it was sampled
    in, which JourneyTRAK replays), so a changed query is not skipped."""
    content = fingerprint_tensors(query.image.float(), query.text.float())
    stream = query.stream
    return content if stream is None else f"{content}-stream{stream.seed}.{stream.batch_size}.{stream.row}"


def run_config(method: Method) -> dict:
    """What every query's run folder records in ``config.json`` (with the query's own id and fingerprint): all its
    scores depend on (not ``top_k``: it lists more or fewer of the same scores, which ``scores.npy`` holds in full)."""
    config = {
        "method": method.name,
        "settings": method.identity(),
        "model": method.model.fingerprint(),
        "data": method.data.fingerprint,
        "flips": method.flips,
    }
    if method.uses_noise:
        config["noise"] = keyed_random.NOISE
    return config


def _open_run_folders(method: Method, queries: Sequence[Query], out_dir: str | Path, config: dict, overwrite: bool):
    """Each query's run folder and its ``config.json``, created (or accepted under the same config) by one process;
    the others wait. With ``overwrite``, a folder made under another config is left as it is: its query's new outputs
    replace it whole once they are complete (:func:`_write_outputs`), so a run that stops keeps the old results."""
    folders = {q.id: Path(out_dir) / q.id for q in queries}
    configs = {q.id: config | {"query": {"id": q.id, "fingerprint": query_fingerprint(q)}} for q in queries}
    if is_main(method.accelerator):
        for query in queries:
            folder, query_config = folders[query.id], configs[query.id]
            if overwrite and folder.is_dir() and any(folder.iterdir()) and not config_matches(folder, query_config):
                continue  # replaced when its new outputs are complete
            prepare_run_dir(folder, query_config)
            if is_finished(folder, len(method.data)):
                print(f"{query.id}: already attributed with {method.name}, skipping")
    barrier(method.accelerator)
    return folders, configs


def _finished(method: Method, folder: Path, config: dict) -> bool:
    """A query whose folder holds complete outputs made under ``config``: skipped."""
    return config_matches(folder, config) and is_finished(folder, len(method.data))


def prepare_method(method: Method) -> None:
    """Prepare the method on every process; a method that does not split its work is prepared by one process first,
    so the others read its caches instead of computing them again."""
    if rank_world(method.accelerator)[1] > 1 and not method.shares_passes:
        if is_main(method.accelerator):
            method.prepare()
        barrier(method.accelerator)
    method.prepare()


def _prepare(method: Method) -> None:
    """:func:`prepare_method`, timed."""
    t0 = time.time()
    prepare_method(method)
    if is_main(method.accelerator):
        print(f"{method.name}: prepared in {time.time() - t0:.1f} s")


def _write_outputs(method: Method, query: Query, folder: Path, scores, stats: dict, config: dict, top_k: int,
                   plot: bool) -> None:  # fmt: skip
    """``scores.npy``, ``ranking.json`` and (with ``plot``) ``top10.png`` of one attributed query; a folder made under
    another config (``--overwrite``) is replaced whole, with its ``config.json``, only once all of them are written."""
    info = {"id": query.id, "prompt": query.prompt, "image": query.image_path}
    ranking = build_ranking(info, method.name, scores, method.data, top_k, stats, config["model"])
    replacing = not config_matches(folder, config)
    target = folder.with_name(f".{folder.name}.new") if replacing else folder
    if replacing:
        prepare_run_dir(target, config, overwrite=True)  # a staging folder: a stale one from a killed run is cleared
    write_ranking(target, ranking, scores)
    if plot:
        plot_ranking(target / "top10.png", method, query, ranking)
    if replacing:
        replace_folder(folder, target)
    top = ranking["top_k"][0]
    print(f"{query.id}: {method.name} top-1 #{top['index']} ({top['caption']!r}), {stats['seconds_query']:.1f} s")


def run_method(
    method: Method,
    queries: Sequence[Query],
    out_dir: str | Path,
    top_k: int = 100,
    overwrite: bool = False,
    plot: bool = True,
    on_scores: Callable[[Path, Query, dict], None] | None = None,
) -> list[Path]:
    """Attribute every query into ``out_dir/<query id>/``; a finished query with the same config is skipped (finished:
    complete, readable outputs, :func:`~common.outputs.is_finished`).

    Args:
        method: a prepared or unprepared method (prepared here on the first query that needs it).
        on_scores: called as ``(folder, query, stats)`` after a query's outputs are written.
    Returns:
        The query folders, in query order.
    """
    folders, configs = _open_run_folders(method, queries, out_dir, run_config(method), overwrite)
    pending = [q for q in queries if not _finished(method, folders[q.id], configs[q.id])]
    if pending:
        _prepare(method)
    for query, per_orientation, stats in method.score_many(pending):
        scores = method.flip_max(per_orientation)
        if not is_main(method.accelerator):  # every process scored (the passes are shared); one writes
            continue
        _write_outputs(method, query, folders[query.id], scores, stats, configs[query.id], top_k, plot)
        if on_scores is not None:
            on_scores(folders[query.id], query, stats)
    barrier(method.accelerator)  # the rankings exist for every process once this returns
    return list(folders.values())


def plot_ranking(path: Path, method: Method, query: Query, ranking: dict) -> None:
    """The query next to its ten top training images (decoded to pixels by the model)."""
    import torch

    top = ranking["top_k"][:10]
    idx = torch.tensor([r["index"] for r in top])
    pixels = method.model.decode(method.data.images(idx).to(method.model.dtype))
    query_pixels = method.model.decode(query.image[None].to(method.model.dtype))[0]
    plot_top_images(
        path,
        as_numpy_uint8(query_pixels),
        query.prompt,
        [as_numpy_uint8(p) for p in pixels],
        [r["score"] for r in top],
        [r["caption"] for r in top],
        title=f"{method.name}: {query.id}",
    )
