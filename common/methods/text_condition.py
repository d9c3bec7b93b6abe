"""Text alone, as the model reads it: the query's text condition against each training image's, by cosine.

The text condition is what the model's own text encoder makes of a prompt, the (L, D) sequence its denoiser
attends to (for a customized model, its text encoder with the new token). Each is flattened and compared by
cosine similarity; an image with several captions is scored by the mean (``captions: mean``), max or first of
its captions' similarities, as ``clip-text``. No image is looked at: the row shows how much of a benchmark the
prompt alone solves (on the customized-model twin, every exemplar's caption holds the new token).

The training set's conditions are the ones scoring already holds (``ArrayTrainingSet.text``); a query is one pass
over them in chunks, so nothing is cached. Text does not change with a flip: both columns hold the same score.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from common.config import no_effect
from common.data import Query
from common.errors import require
from common.methods.base import Method
from common.methods.clip_text import REDUCTIONS, reduce_captions
from common.methods.registry import register


@dataclass
class TextConditionConfig:
    """Cosine similarity of the model's own text conditions: the query's prompt vs each training caption."""

    captions: str = field(
        default="mean", metadata={"help": "an image's score from its captions' similarities: mean, max or first"}
    )
    batch_size: int = no_effect(1024, "images compared per chunk (does not change results)")

    def __post_init__(self) -> None:
        require(self.captions in REDUCTIONS, f"captions must be one of {', '.join(REDUCTIONS)}, got {self.captions!r}")
        require(self.batch_size >= 1, f"batch_size must be positive, got {self.batch_size}")


def unit_flat(x: torch.Tensor) -> torch.Tensor:
    """Conditions (..., L, D) flattened to (..., L*D) rows of unit length (float64)."""
    x = x.double().flatten(-2)
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@register
class TextCondition(Method):
    """Cosine similarity of flattened text conditions (the model's text encoder): query prompt vs training captions."""

    name = "text-condition"
    Config = TextConditionConfig
    uses_noise = False

    def score_flips(self, query: Query) -> tuple[np.ndarray, dict]:
        q = unit_flat(query.text[0].cpu())
        captions = self.data.num_captions
        scores = np.empty(len(self.data))
        for start in range(0, len(self.data), self.cfg.batch_size):
            idx = torch.arange(start, min(start + self.cfg.batch_size, len(self.data)))
            rows = torch.stack([unit_flat(self.data.text(idx, c).cpu()) for c in range(captions)], 1)  # (B, C, L*D)
            sims = (rows @ q).numpy()
            scores[start : start + len(idx)] = reduce_captions(sims, np.full(len(idx), captions), self.cfg.captions)
        return np.repeat(scores[:, None], len(self.flip_states()), axis=1), {}
