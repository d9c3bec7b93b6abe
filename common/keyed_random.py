"""Randomness keyed by stable ids.

Every random draw in a loss comes from a tuple of integers (global seed, purpose, sample index,
flip, caption, timestep, ...). A sample's noise therefore does not depend on the batch it lands in,
the order of the data, the shard a process sees or the device count, which is what makes two loss
passes (before and after unlearning) comparable sample by sample.

The draws are counter-based: Philox4x32-10 (Salmon et al., SC 2011, the generator behind cuRAND's
default and ``torch.cuda``'s) evaluated with exact integer arithmetic on torch tensors, so a whole
batch of keys is drawn on the device in one vectorised call, with no Python generator per row, and
the CPU and a GPU give the same bits (normals equal to float64 rounding). Each key tuple is first
absorbed into a 128-bit state (Philox as the mixing function); that state is the key and the high
counter words of the row's stream, whose low counter word counts blocks of four 32-bit outputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from enum import IntEnum

import torch

_MASK64 = (1 << 64) - 1
_MASK32 = 0xFFFFFFFF


class Purpose(IntEnum):
    """What a keyed stream is for: the second id of every key (after the seed), so streams used for different
    things stay apart even when their other ids coincide. The values are part of every recorded draw: add new
    purposes at the end, never renumber."""

    SCORE = 1  # losses of a scoring pass (common.diffusion.keyed_losses), random scores
    FISHER = 2  # per-sample draws of the curvature (common.unlearning)
    QUERY = 3  # the query-gradient draws of unlearning
    TRAIN = 4  # training: data order, flips, noise and timesteps (common.training)
    SAMPLE = 5  # initial noise of generated queries
    EVAL = 6  # evaluation losses (leave-K-out ΔL, unlearning checks)
    TRAK = 7  # TRAK-style gradient features (common.methods.trak, journey_trak)
    PROJECTION = 8  # random projection blocks (common.projection)
    ENCODE = 9  # VAE posterior samples of images encoded at run time (AbC's exemplars and queries)
    FINETUNE = 10  # Custom Diffusion fine-tuning (custom_diffusion.finetune)
    FEATURES = 11  # the fixed noise of a distilled model's denoiser features (common.distillation.features)


# Recorded in every cached artifact's identity: values made by another generator are never reused.
NOISE = "philox4x32-10"

_M0, _M1 = 0xD2511F53, 0xCD9E8D57  # Philox multipliers
_W0, _W1 = 0x9E3779B9, 0xBB67AE85  # Weyl key increments
_ABSORB_KEY = (0x243F6A88, 0x85A308D3)  # fixed key of the absorbing permutation (digits of pi)


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
    """A CPU generator seeded by ``key_seed(*ids)`` (for whole permutations, not per-sample draws)."""
    return torch.Generator().manual_seed(key_seed(*ids))


def _mulhilo(m: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of ``m * x`` (m a 32-bit constant, x int64 in [0, 2^32)), exactly.

    The product needs 64 unsigned bits, more than int64 holds, so m is split into 16-bit halves:
    every partial product stays below 2^49.
    """
    m_hi, m_lo = m >> 16, m & 0xFFFF
    low = m_lo * x
    mid = m_hi * x + (low >> 16)
    return mid >> 16, ((mid & 0xFFFF) << 16) | (low & 0xFFFF)


def philox4x32(
    counter: Sequence[torch.Tensor], key: Sequence[torch.Tensor | int], rounds: int = 10
) -> tuple[torch.Tensor, ...]:
    """Philox4x32 (Random123's ``philox4x32_R``) on int64 tensors holding 32-bit words.

    Args:
        counter: four word tensors (broadcastable).
        key: two words (tensors or ints).
    Returns:
        The four output words, int64 in [0, 2^32).
    """
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + _W0) & _MASK32, (k1 + _W1) & _MASK32
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def _as_keys(keys: Sequence[Sequence[int]] | torch.Tensor, device: torch.device | str) -> torch.Tensor:
    keys = torch.as_tensor(keys, dtype=torch.int64, device=device) if not isinstance(keys, torch.Tensor) else keys
    keys = keys.to(device=device, dtype=torch.int64)
    if keys.dim() == 1:
        keys = keys[:, None]
    if keys.numel() and bool((keys < 0).any()):
        raise ValueError("noise keys must be non-negative integers")
    return keys


def _row_state(keys: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A 128-bit state (four words) per key row: each id absorbed in turn, then the tuple length."""
    zero = torch.zeros(len(keys), dtype=torch.int64, device=keys.device)
    state = (zero, zero, zero, zero)
    for i in range(keys.shape[1]):
        v = keys[:, i]
        mixed = (state[0] ^ (v & _MASK32), state[1] ^ (v >> 32), state[2] ^ i, state[3])
        state = philox4x32(mixed, _ABSORB_KEY)
    return philox4x32((state[0] ^ keys.shape[1], state[1], state[2], state[3] ^ 0x5EED), _ABSORB_KEY)


def _stream(
    keys: Sequence[Sequence[int]] | torch.Tensor,
    n: int,
    device: torch.device | str,
    out_dtype: torch.dtype,
    convert: Callable[[tuple[torch.Tensor, ...]], torch.Tensor],
) -> torch.Tensor:
    """The first ``n`` values per key (B, n): ``convert`` maps Philox blocks (four words each) to four values."""
    keys = _as_keys(keys, device)
    if len(keys) == 0 or n == 0:
        return torch.empty(len(keys), n, dtype=out_dtype, device=keys.device)
    s0, s1, s2, s3 = (s[:, None] for s in _row_state(keys))
    per_row = (n + 3) // 4
    blocks = torch.arange(per_row, dtype=torch.int64, device=keys.device)[None]
    zero = torch.zeros_like(blocks)
    out = torch.empty(len(keys), per_row, 4, dtype=out_dtype, device=keys.device)
    # Rows in chunks small enough to stay in a CPU cache (several times faster there); one chunk on a GPU.
    rows = max(1, (1 << (24 if keys.device.type == "cuda" else 15)) // per_row)
    for r in range(0, len(keys), rows):
        part = slice(r, r + rows)
        out[part] = convert(philox4x32((blocks, zero, s2[part], s3[part]), (s0[part], s1[part])))
    return out.view(len(keys), -1)[:, :n]


def keyed_words(
    keys: Sequence[Sequence[int]] | torch.Tensor, n: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """``n`` random 32-bit words per key (B, n) int64: the start of each key's Philox stream."""
    return _stream(keys, n, device, torch.int64, lambda words: torch.stack(words, -1))


def _uniform(words: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return (torch.stack(words, -1).double() + 0.5) * 2.0**-32


def keyed_uniform(
    keys: Sequence[Sequence[int]] | torch.Tensor, n: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """``n`` uniforms in (0, 1) per key (B, n) float64, 32 random bits each."""
    return _stream(keys, n, device, torch.float64, _uniform)


def _box_muller(words: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Four standard normals from four words: two Box–Muller pairs, in float64."""
    u = _uniform(words)
    radius = torch.sqrt(-2.0 * torch.log(u[..., 0::2]))
    angle = (2.0 * math.pi) * u[..., 1::2]
    return torch.stack((radius * torch.cos(angle), radius * torch.sin(angle)), -1).flatten(-2)


def key_rows(*ids: int | torch.Tensor) -> torch.Tensor:
    """Key rows (B, k) int64 from ids that are scalars (shared by every row) or (B,) tensors."""
    device = next((v.device for v in ids if isinstance(v, torch.Tensor)), torch.device("cpu"))
    columns = [torch.as_tensor(v, dtype=torch.int64, device=device) for v in ids]
    return torch.stack(torch.broadcast_tensors(*columns), -1)


def below(u: torch.Tensor, high: int | torch.Tensor) -> torch.Tensor:
    """Uniforms in (0, 1) as integers in [0, high) (bias below 2^-32·high)."""
    high = torch.as_tensor(high, dtype=torch.int64, device=u.device)
    return torch.minimum((u * high).long(), high - 1)


def keyed_normal(
    keys: Sequence[Sequence[int]] | torch.Tensor,
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Standard normal noise, one draw of ``shape`` per key, made on ``device``.

    Box–Muller in float64 on pairs of 32-bit uniforms, then cast, so the same key gives the same
    noise on any device and at any precision, and in any batch.

    Args:
        keys: one id tuple per row, as a list or an int64 tensor (B, k) of non-negative ids.
        shape: shape of each draw.
    Returns:
        Tensor of shape ``(len(keys), *shape)``.
    """
    numel = math.prod(shape)
    z = _stream(keys, numel, device, torch.float64, _box_muller)
    return z.reshape(len(z), *shape).to(dtype)
