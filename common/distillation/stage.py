"""The distill stage: features, training and validation of a distilled model, written to one folder.

    python -m common.driver tiny distill --model M --data D --queries TRAIN_QUERIES --teacher TEACHER --out DISTILLED

``TEACHER`` is a method output folder of the training queries (e.g. ``attribute --method unlearning`` on queries
generated from training captions). The folder gets ``distilled.{safetensors,json}`` (the network, its identity:
model, training set, teacher, features, settings and queries; the held-out mAP@K) and the training images' features
(``features.npy``, resumable). A folder made from another identity is refused unless ``--overwrite``; one of the same
identity is reused.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from common.cache import cached_array
from common.config import identity_settings
from common.data import ArrayTrainingSet, Query
from common.distillation.features import ModelFeatures
from common.distillation.net import INFO, describe, load_net, save_net
from common.distillation.train import DistillConfig, agreement, read_teacher, split_queries, train_net
from common.errors import require
from common.files import read_json
from common.model import DiffusionModel

FEATURE_ROWS = 256  # training images per chunk of the resumable feature pass


def training_features(
    model: DiffusionModel, data: ArrayTrainingSet, features: ModelFeatures, path: Path, flips: tuple[bool, ...]
) -> np.ndarray:
    """The training images' features (N, F, D), cached memory-mapped at ``path`` (resumable)."""
    identity = {
        "what": "distilled model features",
        "model": model.fingerprint(),
        "data": data.fingerprint,
        "features": identity_settings(features.cfg),
        "flips": list(flips),
    }
    return cached_array(path, identity, (len(data), len(flips), features.dim), np.float32,
                        lambda a, b: features.training_rows(data, a, b, flips), FEATURE_ROWS,
                        "distilled model features")  # fmt: skip


def distill(
    model: DiffusionModel,
    data: ArrayTrainingSet,
    queries: list[Query],
    teacher_folder: Path,
    out: Path,
    cfg: DistillConfig,
    overwrite: bool = False,
) -> dict:
    """Train (or reuse) the distilled model of ``teacher_folder``'s rankings of ``queries``; returns its description."""
    ids = [q.id for q in queries]
    require(len(set(ids)) == len(ids), "the training queries' ids repeat")
    train_ids, val_ids = split_queries(ids, cfg.distill.val_fraction)
    teacher = read_teacher(Path(teacher_folder), ids, len(data), cfg.distill.cutoff)
    require(teacher.identity["model"] == model.fingerprint(), "the teacher's rankings come from another model")
    require(teacher.identity["data"] == data.fingerprint, "the teacher's rankings rank another training set")
    identity = {
        "model": model.fingerprint(),
        "data": data.fingerprint,
        "num_train": len(data),
        "teacher": teacher.identity,
        "features": identity_settings(cfg.features),
        "net": asdict(cfg.net),
        "distill": identity_settings(cfg.distill),
        "queries": sorted(ids),
    }
    identity = json.loads(json.dumps(identity))  # as it reads back from distilled.json (tuples as lists)
    if (out / INFO).is_file():
        made = read_json(out / INFO, "distilled model description")
        if made.get("identity") == identity:
            print(f"reusing the distilled model in {out}")
            return made
        require(overwrite, f"{out} holds a distilled model of another teacher, feature set or settings: pass "
                           "--overwrite to replace it, or another --out")  # fmt: skip
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    features = ModelFeatures(model, cfg.features)
    flips = (False, True) if model.flips else (False,)
    train_feats = torch.from_numpy(np.array(training_features(model, data, features, out / "features.npy", flips)))
    by_id = {q.id: q for q in queries}
    query_feats = {q: features.query(by_id[q]) for q in ids}
    seconds_features = time.time() - t0
    t0 = time.time()
    lists = [teacher.lists[q] for q in train_ids]
    net, losses = train_net(torch.cat([query_feats[q] for q in train_ids]), train_feats[:, 0], lists, cfg)
    seconds_train = time.time() - t0
    with torch.no_grad():
        index = net.embed(train_feats.flatten(0, 1)).view(len(data), len(flips), -1)
    ks = cfg.distill.ks
    validation = agreement(net, teacher, {q: query_feats[q] for q in val_ids}, index, ks) if val_ids else None
    fit = agreement(net, teacher, {q: query_feats[q] for q in train_ids}, index, ks)
    info = {
        "identity": identity,
        "in_dim": features.dim,
        "queries": {"train": train_ids, "validation": val_ids},
        "validation": validation["summary"] if validation else {},
        "training_queries": fit["summary"],
        "per_query": (validation or {}).get("queries", {}),
        "epoch_losses": losses,
        "seconds": {"features": round(seconds_features, 2), "train": round(seconds_train, 2)},
    }
    save_net(out, net, info)
    made = read_json(out / INFO, "distilled model description")
    load_net(out)  # what was written loads back
    print(describe(made))
    return made
