"""Randomness keyed by stable ids.

Every random draw in a loss comes from a generator seeded by a tuple of integers (global seed,
purpose, sample index, flip, caption, timestep, ...). A sample's noise therefore does not depend on
the batch it lands in, the order of the data, the shard a process sees or the device count, which
is what makes two loss passes (before and after unlearning) comparable sample by sample.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_MASK64 = (1 << 64) - 1

# Purposes keep streams used for different things apart even when the other ids coincide.
SCORE = 1
FISHER = 2
QUERY = 3
TRAIN = 4
SAMPLE = 5
EVAL = 6
TRAK = 7  # TRAK-style gradient features (common.methods.trak)
PROJECTION = 8  # random projection blocks (common.projection)


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def key_seed(*ids: int) -> int:
    """Mix a tuple of non-negative integers into one 63-bit seed (order matters)."""
    state = 0
    for value in ids:
        state = _splitmix64(state ^ _splitmix64(int(value) & _MASK64))
    return state >> 1


def generator(*ids: int) -> torch.Generator:
    """A CPU generator seeded by ``key_seed(*ids)``."""
    return torch.Generator().manual_seed(key_seed(*ids))


def keyed_normal(
    keys: Sequence[Sequence[int]],
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Standard normal noise, one draw of ``shape`` per key.

    Drawn on the CPU in float64 and cast afterwards, so the same key gives the same noise on any
    device and at any precision.

    Args:
        keys: one id tuple per row.
        shape: shape of each draw.
    Returns:
        Tensor of shape ``(len(keys), *shape)``.
    """
    rows = [torch.randn(tuple(shape), generator=generator(*key), dtype=torch.float64) for key in keys]
    if not rows:
        return torch.empty((0, *shape), dtype=dtype, device=device)
    return torch.stack(rows).to(device=device, dtype=dtype)
