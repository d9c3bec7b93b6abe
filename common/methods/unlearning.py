"""Attribution by unlearning (the paper's method) and its Table 2 ablations.

Unlearn the query (:mod:`common.unlearning.unlearn`: a Fisher-preconditioned Newton step, or SGD,
on a selection of weights), measure every training image's loss under the unlearned weights with
the same keyed noise as the cached pretrained losses, and score by the loss increase
τ_i = L(z_i, θ_unlearned) − L(z_i, θ0), averaged over the scoring timesteps and captions, per orientation.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from common import keyed_random
from common.cache import cached_tensors
from common.config import identity_settings, no_effect
from common.data import Query
from common.diffusion.keyed_losses import LossConfig, check_finite, dataset_losses, image_losses
from common.diffusion.loss_passes import PassConfig, loss_pass
from common.diffusion.selection import select_parameters
from common.errors import require
from common.fingerprints import fingerprint_tensors, settings_digest, weight_set_fingerprint
from common.methods.base import Method, prepare_method, query_fingerprint
from common.methods.candidates import CandidatesConfig, interleaved, merged_scores, top_candidates
from common.methods.registry import register
from common.model import DiffusionModel
from common.processes import barrier, rank_world
from common.unlearning.curvature import curvature_fingerprint, load_curvature
from common.unlearning.fisher import FisherConfig
from common.unlearning.unlearn import UnlearnConfig, unlearn, update_size


@dataclass
class ScoringConfig(PassConfig):
    """How the loss passes run (none of it changes scores but the precision)."""

    query_batch_size: int = no_effect(
        1, "queries scored together in one pass over the training set (each batch read once)"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.query_batch_size >= 1, f"query_batch_size must be positive, got {self.query_batch_size}")


@dataclass
class UnlearningConfig:
    """Fisher, scoring loss, unlearning update and passes (each a stage of flags: --fisher.*, --loss.*, ...)."""

    fisher: FisherConfig = field(default_factory=FisherConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    unlearn: UnlearnConfig = field(default_factory=UnlearnConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    candidates: CandidatesConfig = field(default_factory=CandidatesConfig)

    def __post_init__(self) -> None:
        stages = (
            ("fisher", FisherConfig),
            ("loss", LossConfig),
            ("unlearn", UnlearnConfig),
            ("scoring", ScoringConfig),
            ("candidates", CandidatesConfig),
        )
        for name, cls in stages:
            if isinstance(getattr(self, name), dict):
                setattr(self, name, cls(**getattr(self, name)))
        require(
            self.unlearn.method != "newton" or self.fisher.selection == self.unlearn.selection,
            f"fisher.selection ({self.fisher.selection}) must equal unlearn.selection ({self.unlearn.selection}): "
            "the Fisher preconditions exactly the updated weights",
        )


def loss_deviation(base: torch.Tensor, unlearned: torch.Tensor) -> np.ndarray:
    """Per-orientation scores (N,F) from per-timestep losses (N,F,T): the timestep-mean increase."""
    require(base.shape == unlearned.shape, f"loss shapes differ: {tuple(base.shape)} vs {tuple(unlearned.shape)}")
    return (unlearned.mean(-1) - base.mean(-1)).numpy()


def query_losses(
    model: DiffusionModel,
    query: Query,
    cfg: LossConfig,
    weights: dict[str, torch.Tensor] | None = None,
    precision: str = "fp32",
) -> torch.Tensor:
    """The query's own per-timestep losses (1,1,T) on the scoring timesteps, keyed by its id."""
    return dataset_losses(
        model,
        query.as_training_set(),
        cfg,
        sample_ids=[query.key],
        purpose=keyed_random.Purpose.EVAL,
        flips=False,
        weights=weights,
        precision=precision,
    )


def base_losses(method: Unlearning) -> torch.Tensor:
    """The pretrained model's losses (N,F,T): a resumable, shared loss pass cached in ``cache_dir/base_losses/``, in a
    folder named by the loss settings (a run with others computes its own beside it)."""
    cfg = method.cfg
    if method.cache_dir is None:
        return dataset_losses(
            method.model, method.data, cfg.loss, progress="pretrained losses", precision=cfg.scoring.precision
        )
    return loss_pass(
        method.model,
        method.data,
        cfg.loss,
        method.cache_dir / "base_losses" / settings_digest([identity_settings(cfg.loss), cfg.scoring.precision]),
        pass_cfg=cfg.scoring,
        accelerator=method.accelerator,
        progress="pretrained losses",
    )[""]


@register
class Unlearning(Method):
    """Rank training images by how much their loss rises when the query is unlearned."""

    name = "unlearning"
    Config = UnlearningConfig
    shares_passes = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.flips = self.flips and self.cfg.loss.flips
        self.fisher = None  # the curvature (common.unlearning.curvature), once prepared
        self.base: torch.Tensor | None = None
        self.last_deltas: np.ndarray | None = None  # (N,F,T) float32 of the latest query, for analyses
        self.cheap: list[Method] = []  # rank every image when only candidates are scored (use_candidates)

    def use_candidates(self, *cheap: Method) -> None:
        """Score only the top ``candidates.count`` images of the ``cheap`` methods' interleaved rankings (methods on the
        same model and training set, those ``candidates.method`` names, in its order)."""
        require(self.cfg.candidates.enabled, "candidates.method is not set")
        names = "+".join(c.name for c in cheap)
        require(names == self.cfg.candidates.method, f"the candidates come from {self.cfg.candidates.method}, "
                                                     f"not {names}")  # fmt: skip
        for c in cheap:
            require(c.name != self.name, "the candidate method must be another method than the exact one")
            require(c.data is self.data and c.model is self.model, "the candidate method ranks another model")
        self.cheap = list(cheap)

    def identity(self) -> dict:
        settings = super().identity()
        if settings["unlearn"]["preconditioner"] == "diagonal":
            settings["unlearn"].pop("preconditioner")  # the paper's, as runs made before the choice existed
        if self.cfg.unlearn.method == "sgd":
            settings.pop("fisher")  # SGD needs no Fisher
        if not self.cfg.candidates.enabled:
            settings.pop("candidates")  # every image scored, as runs made before candidates existed
        elif len(self.cheap) == 1:  # as runs made before several cheap methods existed
            settings["candidates"]["settings"] = self.cheap[0].identity()
        elif self.cheap:
            settings["candidates"]["settings"] = [c.identity() for c in self.cheap]
        return settings

    def prepare(self) -> None:
        if self.cfg.candidates.enabled:
            require(bool(self.cheap), f"candidates.method {self.cfg.candidates.method}: no such method attached "
                                            "(Unlearning.use_candidates)")  # fmt: skip
            self.cfg.candidates.size(len(self.data))  # a bad count is refused before any work
            for cheap in self.cheap:
                prepare_method(cheap)
        if self.cfg.unlearn.method == "newton" and self.fisher is None:
            # fitted by every process together, each taking its share of the batches
            kind = self.cfg.unlearn.preconditioner
            self.fisher = load_curvature(kind, self.model, self.data, self.cfg.fisher, self.cache_dir,
                                         accelerator=self.accelerator)  # fmt: skip
        if self.base is None:
            self.base = base_losses(self)

    def _unlearned_path(self, query: Query, names: list[str]) -> tuple[dict, Path | None]:
        """What makes a query's unlearned weights, and where they are cached (None without a cache folder)."""
        identity = {
            "model": self.model.fingerprint(),
            "num_train": len(self.data),
            "noise": keyed_random.NOISE,
            "unlearn": identity_settings(self.cfg.unlearn),
            "fisher": curvature_fingerprint(self.fisher, names),
            "query": query_fingerprint(query),
        }
        key = settings_digest(identity)
        return identity, self.cache_path(f"unlearned/{query.id}-{key}.safetensors")

    def unlearned_weights(self, queries: Sequence[Query]) -> dict[str, tuple[dict[str, torch.Tensor], float]]:
        """Each query's unlearned weights and the seconds they took (queries split over the processes).

        With a cache folder they are stored per query in ``cache_dir/unlearned/`` under everything that
        makes them (model, training-set size, Fisher, settings, the query's content), so the other
        processes and a resumed run read them instead of recomputing.
        """
        names = select_parameters(self.model.unet, self.cfg.unlearn.selection)
        rank, world = rank_world(self.accelerator)

        def compute(query: Query) -> dict[str, torch.Tensor]:
            t0 = time.time()
            result = unlearn(self.model, query, self.cfg.unlearn, self.fisher, num_train=len(self.data))
            params = dict(result.model.unet.named_parameters())
            seconds = torch.tensor(time.time() - t0, dtype=torch.float64)
            return {n: params[n].detach().clone() for n in names} | {"_seconds": seconds}

        jobs = [(query, *self._unlearned_path(query, names)) for query in queries]
        out = {}
        for i, (query, identity, path) in enumerate(jobs):  # this process's share
            if path is None or i % world == rank:
                out[query.id] = cached_tensors(path, identity, lambda q=query: compute(q), "unlearned weights")
        if world > 1:
            self.accelerator.wait_for_everyone()
            for query, identity, path in jobs:  # the other processes' share, from their files
                if query.id not in out:
                    out[query.id] = cached_tensors(path, identity, lambda q=query: compute(q), "unlearned weights")
        device = self.model.device
        return {
            q: ({n: v.to(device) for n, v in w.items() if n != "_seconds"}, float(w["_seconds"]))
            for q, w in out.items()
        }

    def after_losses(
        self, sets: dict[str, dict[str, torch.Tensor]], positions: torch.Tensor | None = None
    ) -> tuple[dict[str, torch.Tensor], Path | None]:
        """The training images' losses under each query's unlearned weights, and the pass folder used.

        With a cache folder: one resumable loss pass shared by the processes, in a folder named by
        what it computes (the weights, the loss settings and the images), so a changed setting never meets a stale pass.

        Args:
            sets: query id -> its unlearned weights.
            positions: only these training indices (M,) (candidates); default every image.
        Returns:
            query id -> float64 losses (N or M, F, T), and the pass folder (None without a cache folder).
        """
        cfg = self.cfg
        if self.cache_dir is None:
            rows = torch.arange(len(self.data)) if positions is None else torch.as_tensor(positions)
            losses = image_losses(self.model, self.data, rows, rows, cfg.loss, weight_sets=sets, flips=self.flips,
                                  precision=cfg.scoring.precision)  # fmt: skip
            for v in losses.values():
                check_finite(v, self.data, rows)
            return {qid: v.cpu() for qid, v in losses.items()}, None
        what = {qid: weight_set_fingerprint(w) for qid, w in sets.items()} | {
            "": [identity_settings(cfg.loss), cfg.scoring.precision]
        }
        if positions is not None:
            what["positions"] = fingerprint_tensors(torch.as_tensor(positions, dtype=torch.int64))
        folder = self.cache_dir / "scoring" / settings_digest(what)
        label = f"score {len(sets)} quer{'y' if len(sets) == 1 else 'ies'}"
        after = loss_pass(
            self.model,
            self.data,
            cfg.loss,
            folder,
            weight_sets=sets,
            pass_cfg=cfg.scoring,
            accelerator=self.accelerator,
            progress=label,
            positions=positions,
        )
        return after, folder

    def candidates(self, queries: Sequence[Query]) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
        """Each query's candidates (ascending training indices, M), every image's place in the cheap order (N,: minus
        its place in the cheap methods' rankings taken in turns, :func:`interleaved`) and the seconds they took."""
        m = self.cfg.candidates.size(len(self.data))
        found = {}
        for query in queries:
            t0 = time.time()
            cheap = interleaved([c.score(query)[0] for c in self.cheap])  # one method: its own order
            found[query.id] = (top_candidates(cheap, m), cheap, time.time() - t0)
        return found

    def score_many(self, queries: Sequence[Query]) -> Iterator[tuple[Query, np.ndarray, dict]]:
        """Unlearn ``query_batch_size`` queries at a time, then score them together in one loss pass.

        With candidates, the pass covers the union of the group's candidates, and each query keeps its own.
        With a cache folder the pass is resumable and shared by the processes; its chunks and the
        group's unlearned weights are deleted once every query of the group has its results.
        """
        self.prepare()
        names = select_parameters(self.model.unet, self.cfg.unlearn.selection)
        params = dict(self.model.unet.named_parameters())
        start = {n: params[n].detach().clone() for n in names}
        size = self.cfg.scoring.query_batch_size
        rank, _ = rank_world(self.accelerator)
        for g in range(0, len(queries), size):
            group = queries[g : g + size]
            picked = self.candidates(group) if self.cheap else {}
            union = np.unique(np.concatenate([c for c, _, _ in picked.values()])) if picked else None
            weights = self.unlearned_weights(group)
            sets = {q.id: weights[q.id][0] for q in group}
            t0 = time.time()
            after, folder = self.after_losses(sets, None if union is None else torch.from_numpy(union))
            seconds_score = (time.time() - t0) / len(group)
            for q in group:
                yield q, *self._finish(q, sets[q.id], start, after[q.id], weights[q.id][1], seconds_score,
                                       picked.get(q.id), union)  # fmt: skip
            barrier(self.accelerator)
            if folder is not None and rank == 0:  # the group's results are written: its intermediates can go
                shutil.rmtree(folder, ignore_errors=True)
                for q in group:
                    path = self._unlearned_path(q, names)[1]
                    path.unlink(missing_ok=True)

    def _finish(self, query, weights, start, after, seconds_unlearn, seconds_score, picked=None, union=None):
        """Per-orientation scores (N, F) and the query's stats; keeps the per-timestep rises for analyses.

        With candidates (``picked``: their indices, the cheap scores and their seconds; ``after`` holds the losses of
        ``union``): the candidates' exact scores merged with the cheap order
        (:func:`common.methods.candidates.merged_scores`).
        """
        precision = self.cfg.scoring.precision
        if picked is None:
            deltas = after - self.base
            scores = loss_deviation(self.base, after)
        else:
            indices, cheap, seconds_cheap = picked
            mine, base = after[torch.from_numpy(np.searchsorted(union, indices))], self.base[torch.from_numpy(indices)]
            deltas = mine - base
            scores = merged_scores(loss_deviation(base, mine), indices, cheap)
        deltas = deltas.float().numpy()
        self.last_deltas = deltas if picked is None else None  # analyses read every image's rises
        relative, largest = update_size(start, weights)
        q_before = float(query_losses(self.model, query, self.cfg.loss, precision=precision).mean())
        q_after = float(query_losses(self.model, query, self.cfg.loss, weights, precision).mean())
        stats = {
            "seconds_query": round(seconds_unlearn + seconds_score, 2),
            "relative_update": relative,
            "max_tensor_relative_update": largest,
            "query_loss_before": q_before,
            "query_loss_after": q_after,
            "query_loss_rise": q_after - q_before,
            "median_train_loss_rise": float(np.median(deltas.mean((1, 2)))),  # of the scored images
            "seconds_unlearn": round(seconds_unlearn, 2),
            "seconds_score": round(seconds_score, 2),
            "forwards": self.forwards(len(after) if picked is None else len(picked[0])),
        }
        if picked is not None:
            method, count = self.cfg.candidates.method, len(indices)
            stats["candidates"] = {"method": method, "count": count, "indices": indices.tolist()}
            stats["seconds_candidates"] = round(seconds_cheap, 2)
            stats["seconds_query"] = round(stats["seconds_query"] + seconds_cheap, 2)
        return scores, stats

    def forwards(self, scored: int) -> dict[str, int]:
        """The UNet passes one query costs: ``unlearn``, forward-backward passes of the query's update (its draws
        times steps); ``score``, forward passes over the ``scored`` training images (orientations x captions x
        timesteps each). The Fisher and the pretrained losses are shared by all queries and not counted."""
        u = self.cfg.unlearn
        per_image = len(self.flip_states()) * self.data.num_captions * self.cfg.loss.num_timesteps
        return {"unlearn": u.steps * u.batch_size * u.accumulations, "score": scored * per_image}

    def score_flips(self, query: Query) -> tuple[np.ndarray, dict]:
        """Per-orientation scores of one query (unlearned and scored as in :meth:`score_many`)."""
        if self.cheap:
            _, scores, stats = next(iter(self.score_many([query])))
            return scores, stats
        self.prepare()
        names = select_parameters(self.model.unet, self.cfg.unlearn.selection)
        params = dict(self.model.unet.named_parameters())
        start = {n: params[n].detach().clone() for n in names}
        weights, seconds = self.unlearned_weights([query])[query.id]
        t0 = time.time()
        after, folder = self.after_losses({query.id: weights})
        after = after[query.id]
        barrier(self.accelerator)
        if folder is not None and rank_world(self.accelerator)[0] == 0:
            shutil.rmtree(folder, ignore_errors=True)
        return self._finish(query, weights, start, after, seconds, time.time() - t0)
