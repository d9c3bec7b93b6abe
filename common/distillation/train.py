"""Train a distilled attribution model on a teacher's rankings (FastGDA's recipe) and measure how well it agrees.

The teacher is any method's output folder for many training queries (FastGDA: unlearning on 5,000 queries generated
from training captions). Per query, the teacher's list is the candidates it scored (a candidate-re-ranked run), else
its top ``cutoff`` images; the image at position j of the list (0 = the teacher's first) gets the target
1 - j / M, and with probability ``outliers`` a pair's image is replaced by a random image outside the list, target 0
(FastGDA's targets run the other way, j / M with outliers at 1; the order is the same). The loss is binary
cross-entropy on the logit, the optimiser AdamW. The last ``val_fraction`` of the queries (by id) are held out and
scored by mAP@K against the teacher's top K (:func:`common.evaluation.retrieval.average_precision`: the positives
are the teacher's top K, ranked by the distilled scores over the whole training set).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from common.distillation.features import FeatureConfig
from common.distillation.net import DistilledNet, NetConfig
from common.errors import require
from common.evaluation.retrieval import average_precision
from common.evaluation.tables import mean_se
from common.progress import progress_bar


@dataclass
class TrainingConfig:
    """How the distilled model learns (FastGDA: 10 epochs, batch 4,096, AdamW 1e-3, 10% outliers)."""

    epochs: int = field(default=60, metadata={"help": "passes over every (query, listed image) pair"})
    batch_size: int = field(default=1024, metadata={"help": "pairs per optimiser step"})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (torch's default, as FastGDA)"})
    outliers: float = field(default=0.1, metadata={"help": "share of pairs whose image is a random unlisted one"})
    cutoff: float = field(
        default=0.1, metadata={"help": "a full teacher's list: its top cutoff images (a fraction of N when below 1)"}
    )
    val_fraction: float = field(default=0.1, metadata={"help": "share of the queries held out (the last by id)"})
    ks: tuple[int, ...] = field(default=(10, 25, 50), metadata={"help": "K of the held-out mAP@K"})
    seed: int = field(default=0, metadata={"help": "seed of the initial weights, the pair order, outliers, dropout"})

    def __post_init__(self) -> None:
        self.ks = tuple(int(k) for k in self.ks)
        require(self.epochs >= 1, f"epochs must be positive, got {self.epochs}")
        require(self.batch_size >= 1, f"batch_size must be positive, got {self.batch_size}")
        require(self.lr > 0, f"lr must be positive, got {self.lr}")
        require(0 <= self.outliers < 1, f"outliers must lie in [0, 1), got {self.outliers}")
        require(self.cutoff > 0 and (self.cutoff < 1 or float(self.cutoff).is_integer()),
                f"cutoff must be a fraction in (0, 1) or a whole count, got {self.cutoff}")  # fmt: skip
        require(0 <= self.val_fraction < 1, f"val_fraction must lie in [0, 1), got {self.val_fraction}")
        require(all(k >= 1 for k in self.ks), f"ks must be positive, got {self.ks}")


@dataclass
class DistillConfig:
    """Features, network and training of a distilled model (stages --features.*, --net.*, --distill.*)."""

    features: FeatureConfig = field(default_factory=FeatureConfig)
    net: NetConfig = field(default_factory=NetConfig)
    distill: TrainingConfig = field(default_factory=TrainingConfig)

    def __post_init__(self) -> None:
        for name, cls in (("features", FeatureConfig), ("net", NetConfig), ("distill", TrainingConfig)):
            if isinstance(getattr(self, name), dict):
                setattr(self, name, cls(**getattr(self, name)))


@dataclass
class Teacher:
    """A teacher's rankings of training queries: what made them and, per query, its list and full scores."""

    identity: dict  # method, settings, model and training-set fingerprints (from the runs' config.json)
    lists: dict[str, np.ndarray]  # query id -> training indices, the teacher's first first (M,)
    scores: dict[str, np.ndarray]  # query id -> the teacher's scores (N,)


def read_teacher(folder: Path, query_ids: list[str], num_train: int, cutoff: float) -> Teacher:
    """The teacher's runs of ``query_ids`` in a method output folder; refuses runs made by different settings."""
    require(folder.is_dir(), f"{folder} is not a method output folder (the teacher's rankings)")
    lists, scores, identity = {}, {}, None
    missing = [q for q in query_ids if not (folder / q / "scores.npy").is_file()]
    require(not missing, f"the teacher {folder} has no ranking of {len(missing)} queries, e.g. {missing[:1]}")
    m = int(cutoff) if cutoff >= 1 else max(1, math.ceil(cutoff * num_train))
    for q in query_ids:
        config = json.loads((folder / q / "config.json").read_text())
        made = {k: config.get(k) for k in ("method", "settings", "model", "data")}
        require(identity is None or made == identity, f"the teacher's rankings of {q} were made by other settings")
        identity = made
        s = np.asarray(np.load(folder / q / "scores.npy"), dtype=np.float64).ravel()
        require(len(s) == num_train, f"the teacher scored {len(s)} training images for {q}, the training set has "
                                     f"{num_train}")  # fmt: skip
        stats = json.loads((folder / q / "ranking.json").read_text()).get("stats", {})
        listed = stats.get("candidates", {}).get("indices")
        order = np.argsort(-s, kind="stable")
        lists[q] = order[: len(listed)] if listed is not None else order[:m]
        scores[q] = s
    return Teacher(identity, lists, scores)


def split_queries(query_ids: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Training and held-out query ids: the last ``val_fraction`` of the sorted ids are held out."""
    ids = sorted(query_ids)
    held = int(round(val_fraction * len(ids)))
    require(len(ids) - held >= 1, f"{len(ids)} queries leave none to train on")
    return ids[: len(ids) - held], ids[len(ids) - held :]


def pair_batches(lists: list[np.ndarray], num_train: int, cfg: TrainingConfig, epoch: int):
    """One epoch's (query row, training index, target) batches: every listed pair once, in a seeded order, each
    replaced with probability ``outliers`` by a random unlisted image with target 0."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
    q = torch.cat([torch.full((len(v),), i) for i, v in enumerate(lists)])
    idx = torch.cat([torch.as_tensor(v) for v in lists]).long()
    target = torch.cat([1 - torch.arange(len(v), dtype=torch.float32) / len(v) for v in lists])
    listed = torch.zeros(len(lists), num_train, dtype=torch.bool)
    for i, v in enumerate(lists):
        listed[i, torch.as_tensor(v)] = True
    swap = torch.rand(len(q), generator=g) < cfg.outliers
    swap &= ~listed.all(1)[q]  # a query whose list is the whole set has no outlier to draw
    draw = torch.randint(num_train, (len(q),), generator=g)
    while bool((bad := swap & listed[q, draw]).any()):  # redraw those that hit the list
        draw[bad] = torch.randint(num_train, (int(bad.sum()),), generator=g)
    idx = torch.where(swap, draw, idx)
    target = torch.where(swap, torch.zeros_like(target), target)
    order = torch.randperm(len(q), generator=g)
    for b in range(0, len(order), cfg.batch_size):
        sel = order[b : b + cfg.batch_size]
        yield q[sel], idx[sel], target[sel]


def train_net(
    query_features: torch.Tensor, train_features: torch.Tensor, lists: list[np.ndarray], cfg: DistillConfig
) -> tuple[DistilledNet, list[float]]:
    """Fit the network to the teacher's lists; the same seed gives the same weights.

    Args:
        query_features: the training queries' features (Q, D).
        train_features: the training images' features (N, D) (original orientation).
        lists: per query, the teacher's list of training indices, first first.
    Returns:
        The network (eval mode) and the mean loss of each epoch.
    """
    t = cfg.distill
    with torch.random.fork_rng(devices=[]):  # initial weights and dropout from the seed, the caller's RNG untouched
        torch.manual_seed(t.seed)
        mean, std = train_features.mean(0), train_features.std(0)
        net = DistilledNet(train_features.shape[1], cfg.net, mean, std)
        opt = torch.optim.AdamW(net.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        bce = torch.nn.BCEWithLogitsLoss()
        losses = []
        net.train()
        for epoch in progress_bar(range(t.epochs), desc="distill", unit="epoch", leave=False):
            total, count = 0.0, 0
            for q, idx, target in pair_batches(lists, len(train_features), t, epoch):
                loss = bce(net(query_features[q], train_features[idx]), target)
                opt.zero_grad()
                loss.backward()
                opt.step()
                total, count = total + float(loss.detach()) * len(q), count + len(q)
            losses.append(total / count)
    return net.eval(), losses


@torch.no_grad()
def distilled_scores(net: DistilledNet, query: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Scores (N, F) of one query's features (1, D) against training embeddings (N, F, out_dim)."""
    q = net.embed(query)[0]
    return net.scale * (index.float() @ q) + net.bias


def agreement(net: DistilledNet, teacher: Teacher, query_features: dict[str, torch.Tensor], index, ks) -> dict:
    """mAP@K of the distilled ranking (flip-max) against the teacher's top K, per query and mean ± SE."""
    per_query = {}
    for q, feats in query_features.items():
        s = distilled_scores(net, feats, index).max(1).values.numpy()
        top = np.argsort(-teacher.scores[q], kind="stable")
        per_query[q] = {k: average_precision(s, top[:k].tolist()) for k in ks}
    summary = {}
    for k in ks:
        mean, se = mean_se([v[k] for v in per_query.values()])
        summary[str(k)] = {"mean": mean, "se": se, "n": len(per_query)}
    return {"summary": summary, "queries": {q: {str(k): v for k, v in d.items()} for q, d in per_query.items()}}
