"""Attribution by unlearning, end to end for a list of queries.

For each query: unlearn it (:mod:`common.unlearn`), measure every training image's loss under the
unlearned weights with the same keyed noise as the cached pretrained losses, and rank by the loss
increase τ_i = max over flips of [L(z_i, θ_unlearned) − L(z_i, θ0)].
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from common import keyed_random
from common.data import ArrayTrainingSet, Query
from common.diffusion import unet_denoiser
from common.errors import AttributionError
from common.losses import LossConfig, dataset_losses
from common.outputs import build_ranking, prepare_run_dir, write_ranking
from common.plots import plot_top_images
from common.unlearn import UnlearnConfig, unlearn

METHOD = "unlearning"


def loss_deviation_scores(base: torch.Tensor, unlearned: torch.Tensor) -> np.ndarray:
    """τ_i from per-timestep losses (N,F,T): timestep-mean increase, max over flips F."""
    if base.shape != unlearned.shape:
        raise AttributionError(f"loss shapes differ: {tuple(base.shape)} vs {tuple(unlearned.shape)}")
    return (unlearned.mean(-1) - base.mean(-1)).max(dim=1).values.numpy()


def cached_base_losses(
    model: torch.nn.Module,
    data: ArrayTrainingSet,
    cfg: LossConfig,
    alphas_cumprod: torch.Tensor,
    path: str | Path,
    model_fingerprint: str,
) -> torch.Tensor:
    """The pretrained model's losses (N,F,T), computed once and cached at ``path``.

    Raises:
        AttributionError: the cache was made with other loss settings, another model or other data.
    """
    path = Path(path)
    identity = {"loss": cfg.identity(), "model": model_fingerprint, "data": data.fingerprint}
    if path.exists():
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            for key, want in identity.items():
                if meta.get(key) != want:
                    what = {"loss": "loss settings", "model": "model", "data": "training set"}[key]
                    raise AttributionError(
                        f"loss cache {path} was made with a different {what}; delete it to recompute"
                    )
            return f.get_tensor("losses")
    ref = next(model.parameters())
    losses = dataset_losses(
        unet_denoiser(model),
        data,
        cfg,
        alphas_cumprod,
        device=ref.device,
        dtype=ref.dtype,
        progress="pretrained losses",
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({"losses": losses}, str(tmp), metadata=identity)
    tmp.replace(path)
    return losses


def query_losses(model: torch.nn.Module, query: Query, cfg: LossConfig, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The query's own per-timestep losses (1,F,T) on the scoring timesteps, keyed by its id."""
    ref = next(model.parameters())
    return dataset_losses(
        unet_denoiser(model),
        query.as_training_set(),
        cfg,
        alphas_cumprod,
        sample_ids=[query.key],
        purpose=keyed_random.EVAL,
        device=ref.device,
        dtype=ref.dtype,
    )


def attribute_query(
    model: torch.nn.Module,
    data: ArrayTrainingSet,
    query: Query,
    base: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    loss_cfg: LossConfig,
    unlearn_cfg: UnlearnConfig,
    fisher: dict[str, torch.Tensor] | None,
) -> tuple[np.ndarray, dict, np.ndarray]:
    """Scores (N,) for one query, the numbers that show the unlearning worked, and the per-flip,
    per-timestep loss increases (N,F,T) float32 the scores were made from."""
    t0 = time.time()
    result = unlearn(model, query, alphas_cumprod, unlearn_cfg, fisher, num_train=len(data))
    t1 = time.time()
    ref = next(model.parameters())
    after = dataset_losses(
        unet_denoiser(result.model),
        data,
        loss_cfg,
        alphas_cumprod,
        device=ref.device,
        dtype=ref.dtype,
        progress=f"score {query.id}",
    )
    t2 = time.time()
    scores = loss_deviation_scores(base, after)
    q_before = float(query_losses(model, query, loss_cfg, alphas_cumprod).mean())
    q_after = float(query_losses(result.model, query, loss_cfg, alphas_cumprod).mean())
    train_rise = (after.mean((1, 2)) - base.mean((1, 2))).numpy()
    stats = {
        "relative_update": result.relative_update,
        "max_tensor_relative_update": result.max_tensor_relative_update,
        "query_loss_before": q_before,
        "query_loss_after": q_after,
        "query_loss_rise": q_after - q_before,
        "median_train_loss_rise": float(np.median(train_rise)),
        "seconds_unlearn": round(t1 - t0, 2),
        "seconds_score": round(t2 - t1, 2),
    }
    return scores, stats, (after - base).float().numpy()


def run_attribution(
    model: torch.nn.Module,
    data: ArrayTrainingSet,
    queries: Sequence[Query],
    out_dir: str | Path,
    alphas_cumprod: torch.Tensor,
    loss_cfg: LossConfig,
    unlearn_cfg: UnlearnConfig,
    fisher: dict[str, torch.Tensor] | None,
    base: torch.Tensor,
    run_config: dict,
    image_of: Callable[[int], np.ndarray] | None = None,
    top_k: int = 100,
    overwrite: bool = False,
    save_deltas: bool = False,
) -> list[Path]:
    """Attribute every query into ``out_dir/<query id>/``; finished queries with the same config are skipped.

    Args:
        run_config: what identifies the run besides the loss and unlearning settings (model and
            Fisher fingerprints, data); written into each query's ``config.json``.
        image_of: training index -> uint8 (H,W,3) image for the PNG (no PNG when None).
        save_deltas: also write ``deltas.npy``, the per-flip, per-timestep loss increases (N,F,T)
            float32, for analyses such as the effect of single timesteps.
    """
    folders = []
    for query in queries:
        config = {
            "method": METHOD,
            "query": query.id,
            "loss": asdict(loss_cfg),
            "unlearn": asdict(unlearn_cfg),
            "top_k": top_k,
        } | run_config
        folder = prepare_run_dir(Path(out_dir) / query.id, config, overwrite)
        folders.append(folder)
        if (folder / "ranking.json").exists():
            print(f"{query.id}: already attributed, skipping")
            continue
        scores, stats, deltas = attribute_query(model, data, query, base, alphas_cumprod, loss_cfg, unlearn_cfg, fisher)
        if save_deltas:
            np.save(folder / "deltas.npy", deltas)
        info = {"id": query.id, "prompt": query.prompt, "image": query.image_path}
        ranking = build_ranking(info, METHOD, scores, data, top_k, stats)
        write_ranking(folder, ranking, scores)
        if image_of is not None:
            top = ranking["top_k"][:10]
            from common.data import as_numpy_uint8

            plot_top_images(
                folder / "top10.png",
                as_numpy_uint8(query.image),
                query.prompt,
                [image_of(r["index"]) for r in top],
                [r["score"] for r in top],
                [r["caption"] for r in top],
                title=f"attribution by unlearning: {query.id}",
            )
        print(
            f"{query.id}: query loss {stats['query_loss_before']:.4f} -> {stats['query_loss_after']:.4f}, "
            f"median train rise {stats['median_train_loss_rise']:.2e}, update {stats['relative_update']:.2%}, "
            f"top-1 #{ranking['top_k'][0]['index']} ({json.dumps(ranking['top_k'][0]['caption'])})"
        )
    return folders
