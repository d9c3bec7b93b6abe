"""Estimate the Fisher once per (model, data, Fisher config) and reuse it; refuse a mismatched file."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from common.data import ArrayTrainingSet
from common.errors import AttributionError
from common.fisher import FisherConfig, estimate_fisher, load_fisher, save_fisher
from common.selection import select_parameters


def cached_fisher(
    model: torch.nn.Module,
    data: ArrayTrainingSet,
    alphas_cumprod: torch.Tensor,
    cfg: FisherConfig,
    path: str | Path,
    model_fingerprint: str,
) -> dict[str, torch.Tensor]:
    """Load the Fisher at ``path`` if it was made from this model and config, else estimate and save it."""
    path = Path(path)
    names = select_parameters(model, cfg.selection)
    want = json.dumps(asdict(cfg) | {"batch_size": None}, sort_keys=True)
    if path.exists():
        fisher, meta = load_fisher(path, names)
        saved = json.loads(meta.get("config", "{}")) | {"batch_size": None}
        if json.dumps(saved, sort_keys=True) != want or meta.get("model") != model_fingerprint:
            raise AttributionError(f"Fisher file {path} was made with another model or config; delete it to recompute")
        return fisher
    fisher = estimate_fisher(model, data, alphas_cumprod, cfg)
    save_fisher(path, fisher, cfg, model_fingerprint)
    return fisher
