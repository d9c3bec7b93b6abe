"""Pixel-similarity baseline: cosine similarity of model inputs, max over the training image's flips."""

from __future__ import annotations

import numpy as np
import torch

from common.data import ArrayTrainingSet, Query


@torch.no_grad()
def pixel_scores(data: ArrayTrainingSet, query: Query, batch_size: int = 4096) -> np.ndarray:
    """Cosine similarity between the query's input (pixels or latent) and every training image's.

    Returns:
        float64 scores (N,), the max over the original and flipped training image.
    """
    q = query.image.double().flatten()
    q = q / q.norm().clamp_min(1e-12)
    out = []
    for start in range(0, len(data), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(data)))
        sims = []
        for flip in (False, True):
            x = data.images(idx, flip).double().flatten(1)
            sims.append((x @ q) / x.norm(dim=1).clamp_min(1e-12))
        out.append(torch.maximum(*sims))
    return torch.cat(out).numpy()
