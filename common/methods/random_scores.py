"""The random baseline: scores drawn at random, seeded per query, so any K images are equally likely."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from common import keyed_random
from common.data import Query
from common.methods.base import Method
from common.methods.registry import register


@dataclass
class RandomConfig:
    """Random scores."""

    seed: int = field(default=0, metadata={"help": "seed of the scores"})
    per_query: bool = field(
        default=False,
        metadata={
            "help": "draw other scores for every query; by default every query gets the same random ranking, "
            "so a leave-K-out evaluation retrains each random set once for all queries"
        },
    )


@register
class Random(Method):
    """Uniform random scores, the same for every orientation of an image."""

    name = "random"
    Config = RandomConfig
    uses_noise = False

    def score_flips(self, query: Query) -> tuple[np.ndarray, dict]:
        key = query.key if self.cfg.per_query else 0
        rng = np.random.default_rng(keyed_random.key_seed(self.cfg.seed, keyed_random.Purpose.SCORE, key))
        scores = rng.random(len(self.data))
        return np.repeat(scores[:, None], len(self.flip_states()), axis=1), {}
