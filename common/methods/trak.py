"""TRAK for diffusion models, and the feature, kernel and scoring functions JourneyTRAK and D-TRAK reuse.

TRAK (Park et al. 2023) as JourneyTRAK's code applies it to diffusion models (MadryLab/trak:
``trak/traker.py``, ``trak/score_computers.py``; MadryLab/journey-TRAK:
``examples/featurize_mscoco_parallel.py``, ``diffusion_trak/modelout_functions.py``,
``diffusion_trak/gradient_computers.py``):

- feature φ(z) = P ḡ(z): the per-sample gradient of an output function f (default the training
  loss ‖ε_θ(x_t, c, t) − ε‖², mean over pixels) with respect to the selected weights (default all
  UNet weights), averaged over timestep slots and keyed noise draws, projected to d dimensions
  (:mod:`common.projection`). JourneyTRAK featurizes with 20 uniformly drawn timesteps, one noise
  draw each, one of the 5 captions; here the 20 timesteps are strided (0, 50, …, 950: the same
  expectation, stratified), the caption cycles over the slots, and the gradients are averaged
  where theirs are summed (a common scale, which λ = 0 scores do not see).
- kernel K = ΦᵀΦ + λI over every training image and orientation (rows i·F + f), accumulated in
  float64 from the memory-mapped features in chunks and inverted once in float64.
- score(q, i) = φ(q)ᵀ K⁻¹ φ_i, the query featurized like the training images, averaged over an
  ensemble of independently trained models (member 0 is the attributed model; TRAK's
  ``finalize_scores`` averages the same way). TRAK's out-to-loss factor is 1 for diffusion.

λ is given as the references give it: their projections are not scaled by 1/sqrt(d), so their
features are sqrt(d) times ours, and their (ΦᵀΦ + λI) is d(ΦᵀΦ + λ/d · I) here. The kernel uses
λ/d, which gives exactly their scores. TRAK's default is λ = 0; with fewer training rows than
dimensions the λ = 0 kernel is singular and its pseudo-inverse (the λ → 0 limit) is used.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from common import keyed_random
from common.cache import cached_array, cached_tensors
from common.config import no_effect
from common.data import ArrayTrainingSet, Query
from common.diffusion.gradients import OUTPUTS, per_sample_gradients
from common.diffusion.selection import PRESETS, select_parameters
from common.errors import AttributionError, require
from common.methods.base import Method
from common.methods.registry import register
from common.model import DiffusionModel
from common.progress import progress_bar
from common.projection import KINDS, RNGS, Projection, check_dim

FEATURE_DTYPES = {"float16": np.float16, "float32": np.float32, "float64": np.float64}
CHUNK_BYTES = 1 << 28  # float64 rows read at once from the features when building the kernel or scoring
TRAIN_ROLE, QUERY_ROLE = 0, 1  # first id of a noise key: training rows and queries never share noise


@dataclass
class TrakConfig:
    """TRAK features, kernel and ensemble (defaults: the paper's TRAK baseline, JourneyTRAK's featurization)."""

    selection: str = field(default="all", metadata={"help": "weights whose gradients are projected (TRAK: all)"})
    output: str = field(default="loss", metadata={"help": "output function: loss (TRAK) or square (D-TRAK)"})
    projection_dim: int = field(default=4096, metadata={"help": "projection dimension d (paper: 4096)"})
    projection_type: str = field(default="rademacher", metadata={"help": "rademacher (TRAK on GPU) or gaussian"})
    regularization: float = field(
        default=0.0, metadata={"help": "λ as the references give it (applied as λ/d to 1/sqrt(d)-scaled features)"}
    )
    num_timesteps: int = field(default=20, metadata={"help": "strided timesteps per feature (JourneyTRAK: 20)"})
    num_draws: int = field(default=1, metadata={"help": "noise draws per timestep (JourneyTRAK: 1)"})
    seed: int = field(default=0, metadata={"help": "seed of the noise and the projection"})
    feature_dtype: str = field(default="float16", metadata={"help": "storage of training features (TRAK: float16)"})
    ensemble: tuple[str, ...] = field(
        default=(), metadata={"help": "folders of other independently trained models (paper: 19 more)"}
    )
    projection_rng: str = field(
        default="device", metadata={"help": "draw the projection on the device (fast) or the cpu (portable)"}
    )
    projection_cache_gb: float = no_effect(
        0.0, "keep projection blocks in memory up to this size (does not change results)"
    )
    batch_size: int = no_effect(32, "per-sample gradients per vmap call (no effect on results)")
    feature_batch_size: int = no_effect(
        64, "rows projected together: memory rows x weights x 4 B (no effect on results)"
    )

    def __post_init__(self) -> None:
        check_dim(self.projection_dim, "projection_dim")
        require(self.selection in PRESETS, f"unknown selection {self.selection!r}; choose from {', '.join(PRESETS)}")
        require(self.output in OUTPUTS, f"unknown output {self.output!r}; choose from {', '.join(OUTPUTS)}")
        require(self.projection_type in KINDS, f"projection_type must be one of {', '.join(KINDS)}")
        require(self.projection_rng in RNGS, f"projection_rng must be one of {', '.join(RNGS)}")
        require(self.feature_dtype in FEATURE_DTYPES, f"feature_dtype must be one of {', '.join(FEATURE_DTYPES)}")
        require(self.regularization >= 0, f"regularization must be non-negative, got {self.regularization}")
        require(self.num_timesteps >= 1, f"num_timesteps must be positive, got {self.num_timesteps}")
        require(self.num_draws >= 1, f"num_draws must be positive, got {self.num_draws}")
        require(self.batch_size >= 1 and self.feature_batch_size >= 1, "batch sizes must be positive")
        require(self.projection_cache_gb >= 0, "projection_cache_gb must be non-negative")
        self.ensemble = (self.ensemble,) if isinstance(self.ensemble, str) else tuple(str(f) for f in self.ensemble)


def window_timesteps(num: int, lo: int, hi: int) -> list[int]:
    """``num`` timesteps strided over ``[lo, hi)``: lo + k(hi − lo)/num (0, 50, …, 950 for 20 over [0, 1000))."""
    require(1 <= num <= hi - lo, f"cannot stride {num} timesteps over [{lo}, {hi})")
    return [lo + k * (hi - lo) // num for k in range(num)]


@dataclass
class Rows:
    """Samples to featurize, one feature per row.

    Attributes:
        x0: clean inputs (R,C,H,W).
        text: every caption's condition per row (R,n_captions,L,D); slot s, draw r uses caption (s·draws + r) mod n.
        timesteps: each row's timestep slots (R,S).
        keys: each row's noise-key prefix (R,k): noise of slot s, draw r is keyed (seed, TRAK, *key, s, r).
        draws: noise draws per slot.
    """

    x0: torch.Tensor
    text: torch.Tensor
    timesteps: torch.Tensor
    keys: list[tuple[int, ...]]
    draws: int


def mean_gradients(model: DiffusionModel, names: list[str], rows: Rows, cfg: TrakConfig) -> dict[str, torch.Tensor]:
    """Each row's per-sample gradient of ``cfg.output``, averaged over its timestep slots and noise draws.

    A vmap call takes whole rows (all their slots and draws, about ``cfg.batch_size`` samples), and
    each row adds its samples in slot-then-draw order, so the result does not depend on the batch size.

    Returns:
        name -> (R, *param shape), float32 (float64 for a float64 model), on the model's device.
    """
    device, dtype = model.device, model.dtype
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    params = dict(model.unet.named_parameters())
    acc = {n: torch.zeros(len(rows.x0), *params[n].shape, dtype=acc_dtype, device=device) for n in names}
    n_cap, n_slots = rows.text.shape[1], rows.timesteps.shape[1]
    per_row = n_slots * rows.draws
    slot = torch.arange(per_row) // rows.draws  # sample k of a row: slot k // draws, draw k % draws
    cap = torch.arange(per_row) % n_cap  # (slot * draws + draw) mod captions
    step = max(1, cfg.batch_size // per_row)
    for a in range(0, len(rows.x0), step):
        b = min(a + step, len(rows.x0))
        keys = [
            (cfg.seed, keyed_random.Purpose.TRAK, *key, int(k // rows.draws), int(k % rows.draws))
            for key in rows.keys[a:b]
            for k in range(per_row)
        ]
        grads = per_sample_gradients(
            model,
            names,
            rows.x0[a:b].to(device=device, dtype=dtype).repeat_interleave(per_row, dim=0),
            rows.text[a:b][:, cap].flatten(0, 1).to(device=device, dtype=dtype),
            rows.timesteps[a:b][:, slot].flatten().to(device),
            keyed_random.keyed_normal(keys, rows.x0.shape[1:], dtype=dtype, device=device),
            output=cfg.output,
        )
        for n in names:
            g = grads[n].view(b - a, per_row, *grads[n].shape[1:])
            for k in range(per_row):
                acc[n][a:b] += g[:, k].to(acc_dtype)
    return {n: total / per_row for n, total in acc.items()}


def featurize(model: DiffusionModel, names: list[str], projection: Projection, rows: Rows, cfg: TrakConfig):
    """Projected mean gradients (R, d) of ``rows``, ``cfg.feature_batch_size`` rows per projection."""
    out = []
    for b in range(0, len(rows.x0), cfg.feature_batch_size):
        sl = slice(b, b + cfg.feature_batch_size)
        part = Rows(rows.x0[sl], rows.text[sl], rows.timesteps[sl], rows.keys[sl], rows.draws)
        out.append(projection.project(mean_gradients(model, names, part, cfg)))
    return torch.cat(out)


def training_rows(data: ArrayTrainingSet, start: int, stop: int, flips: int, timesteps: list[int], draws: int) -> Rows:
    """Training rows ``start..stop-1`` of the feature array: row i·F + f is image i in orientation f."""
    r = torch.arange(start, stop)
    idx, flip = r // flips, r % flips
    text = torch.stack([data.text(idx, c) for c in range(data.num_captions)], dim=1)
    steps = torch.tensor(timesteps).expand(len(r), -1)
    keys = [(TRAIN_ROLE, int(i), int(f)) for i, f in zip(idx, flip)]
    return Rows(data.images(idx, flip.bool()), text, steps, keys, draws)


def query_rows(query: Query, timesteps: list[int], draws: int) -> Rows:
    """The query image featurized like a training image (TRAK, D-TRAK)."""
    steps = torch.tensor([timesteps])
    return Rows(query.image[None], query.text[None], steps, [(QUERY_ROLE, query.key, 0)], draws)


def training_features(
    model: DiffusionModel,
    data: ArrayTrainingSet,
    names: list[str],
    projection: Projection,
    cfg: TrakConfig,
    timesteps: list[int],
    flips: int,
    path: Path | None,
    identity: dict,
) -> np.ndarray:
    """Features of every training row (N·F, d), memory-mapped from ``path`` (resumable), or in memory without one."""
    shape = (len(data) * flips, projection.dim)
    dtype = FEATURE_DTYPES[cfg.feature_dtype]

    def compute(start: int, stop: int) -> np.ndarray:
        feats = featurize(
            model, names, projection, training_rows(data, start, stop, flips, timesteps, cfg.num_draws), cfg
        )
        out = feats.cpu().numpy().astype(dtype)
        if not np.isfinite(out).all():
            raise AttributionError(f"training features overflow {cfg.feature_dtype}; use feature_dtype float32")
        return out

    if path is None:
        return np.concatenate(
            [compute(s, min(s + cfg.feature_batch_size, shape[0])) for s in range(0, shape[0], cfg.feature_batch_size)]
        )
    return cached_array(path, identity, shape, dtype, compute, cfg.feature_batch_size, "TRAK features")


def _chunks(features: np.ndarray):
    """Row ranges of ``features`` small enough to convert to float64 at once."""
    step = max(1, CHUNK_BYTES // (8 * features.shape[1]))
    for start in range(0, len(features), step):
        yield start, min(start + step, len(features))


def gram(features: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """ΦᵀΦ (d, d) float64 on the CPU, accumulated in row chunks so Φ is never loaded whole."""
    d = features.shape[1]
    out = torch.zeros(d, d, dtype=torch.float64, device=device)
    for start, stop in _chunks(features):
        block = torch.from_numpy(np.asarray(features[start:stop], dtype=np.float64)).to(device)
        out.addmm_(block.T, block)
    return out.cpu()


def kernel_inverse(xtx: torch.Tensor, regularization: float) -> torch.Tensor:
    """(ΦᵀΦ + λI)⁻¹ (d, d) in float64, on the device of ``xtx``.

    λ > 0: by Cholesky. λ = 0 (or a numerically indefinite matrix): by an eigendecomposition whose
    eigenvalues below d·eps·max are dropped, i.e. the pseudo-inverse; on a rank-deficient kernel
    that is the λ → 0 limit of the regularized inverse on Φ's row space.
    """
    xtx = xtx.double()
    if regularization > 0:
        eye = torch.eye(len(xtx), dtype=xtx.dtype, device=xtx.device)
        chol, info = torch.linalg.cholesky_ex(xtx + regularization * eye)
        if int(info) == 0:
            return torch.cholesky_inverse(chol)
    w, v = torch.linalg.eigh(xtx)
    w = w + regularization
    keep = w > w.max().clamp(min=0) * len(w) * torch.finfo(torch.float64).eps
    inv = torch.where(keep, 1.0 / torch.where(keep, w, torch.ones_like(w)), torch.zeros_like(w))
    return (v * inv) @ v.T


def kernel_scores(features: np.ndarray, kinv: torch.Tensor, query: torch.Tensor) -> np.ndarray:
    """φ_iᵀ K⁻¹ φ(q) for every row i of ``features`` (M,), in float64, streaming the rows.

    Args:
        features: Φ (M, d), typically memory-mapped.
        kinv: K⁻¹ (d, d) float64.
        query: φ(q) (d,).
    """
    device = kinv.device
    v = kinv @ query.to(device=device, dtype=torch.float64)
    out = np.empty(len(features), dtype=np.float64)
    for start, stop in _chunks(features):
        block = torch.from_numpy(np.asarray(features[start:stop], dtype=np.float64)).to(device)
        out[start:stop] = (block @ v).cpu().numpy()
    return out


@dataclass
class Member:
    """One model of the ensemble: its projection, and its training features and kernel inverse per timestep bin."""

    model: DiffusionModel
    projection: Projection
    features: list[np.ndarray]
    kinv: list[torch.Tensor]


@register
class Trak(Method):
    """Rank training images by φ(query)ᵀ(ΦᵀΦ + λI)⁻¹φ_i, averaged over an ensemble of models."""

    name = "trak"
    Config = TrakConfig

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.names = select_parameters(self.model.unet, self.cfg.selection)
        self.members: list[Member] | None = None

    def windows(self) -> list[tuple[int, int]]:
        """Timestep windows [lo, hi) of the training features: one (TRAK, D-TRAK) or one per bin (JourneyTRAK)."""
        return [(0, self.model.num_train_timesteps)]

    def bin_timesteps(self) -> list[list[int]]:
        """Each window's strided featurization timesteps."""
        return [window_timesteps(self.cfg.num_timesteps, lo, hi) for lo, hi in self.windows()]

    def projection(self, model: DiffusionModel) -> Projection:
        params = dict(model.unet.named_parameters())
        return Projection(
            {n: params[n].shape for n in self.names},
            self.cfg.projection_dim,
            seed=self.cfg.seed,
            kind=self.cfg.projection_type,
            device=model.device,
            rng=self.cfg.projection_rng,
            cache_bytes=int(self.cfg.projection_cache_gb * 2**30),
        )

    def feature_identity(self, fingerprint: str, projection: Projection, timesteps: list[int]) -> dict:
        """What a model's training features depend on."""
        cfg = self.cfg
        settings = {
            "selection": cfg.selection,
            "output": cfg.output,
            "timesteps": timesteps,
            "num_draws": cfg.num_draws,
            "seed": cfg.seed,
            "dtype": cfg.feature_dtype,
            "projection": projection.identity(),
        }
        return {
            "model": fingerprint,
            "data": self.data.fingerprint,
            "flips": self.flips,
            "noise": keyed_random.NOISE,
            "features": settings,
        }

    def prepare_member(self, model: DiffusionModel) -> Member:
        """Load or compute one model's training features and kernels (cached per model fingerprint)."""
        model.prepare_for_gradients(self.model.device)
        ours, theirs = dict(self.model.unet.named_parameters()), dict(model.unet.named_parameters())
        require(
            model.num_train_timesteps == self.model.num_train_timesteps
            and all(n in theirs and theirs[n].shape == ours[n].shape for n in self.names),
            f"{self.name}: the ensemble models must share the attributed model's architecture and diffusion steps",
        )
        projection, flips, fingerprint = self.projection(model), len(self.flip_states()), model.fingerprint()
        stem = f"{self.name}-{fingerprint[:16]}"
        features, kinvs = [], []
        for b, steps in enumerate(self.bin_timesteps()):
            suffix = f"-bin{b}" if len(self.windows()) > 1 else ""
            identity = self.feature_identity(fingerprint, projection, steps)
            path = self.cache_path(f"{stem}-features{suffix}.npy")
            feats = training_features(model, self.data, self.names, projection, self.cfg, steps, flips, path, identity)
            xtx = cached_tensors(
                self.cache_path(f"{stem}-gram{suffix}.safetensors"),
                identity,
                lambda: {"gram": gram(feats, model.device)},  # noqa: B023 - called at once
                "TRAK kernel",
            )["gram"]
            features.append(feats)
            kinvs.append(kernel_inverse(xtx.to(model.device), self.cfg.regularization / self.cfg.projection_dim))
        return Member(model, projection, features, kinvs)

    def prepare(self) -> None:
        if self.members is not None:
            return
        require(not self.cfg.ensemble or self.load_model is not None, f"{self.name}: no loader for ensemble models")
        models = [self.model] + [self.load_model(folder) for folder in self.cfg.ensemble]
        self.members = [self.prepare_member(m) for m in models]

    def query_rows(self, query: Query) -> tuple[Rows, list[tuple[int, float]]]:
        """The query's rows to featurize, and each row's (timestep bin, weight) in the score."""
        return query_rows(query, self.bin_timesteps()[0], self.cfg.num_draws), [(0, 1.0)]

    def score_flips(self, query: Query) -> tuple[np.ndarray, dict]:
        self.prepare()
        t0 = time.time()
        rows, weights = self.query_rows(query)
        t1 = time.time()
        total = np.zeros(len(self.data) * len(self.flip_states()))
        norms = []
        members = progress_bar(self.members, desc=f"{self.name} {query.id}", leave=False, disable=len(self.members) < 2)
        for member in members:
            feats = featurize(member.model, self.names, member.projection, rows, self.cfg)
            norms.append(float(feats.norm(dim=1).mean()))
            # Scores are linear in the query feature: weight the rows of each bin first, score once per bin.
            per_bin: dict[int, torch.Tensor] = {}
            for phi, (b, weight) in zip(feats, weights):
                per_bin[b] = per_bin.get(b, 0) + weight * phi.double()
            for b, phi in per_bin.items():
                total += kernel_scores(member.features[b], member.kinv[b], phi)
        scores = (total / len(self.members)).reshape(len(self.data), len(self.flip_states()))
        stats = {
            "ensemble_size": len(self.members),
            "query_feature_norm": float(np.mean(norms)),
            "seconds_query_inputs": round(t1 - t0, 2),
            "seconds_scores": round(time.time() - t1, 2),
        }
        return scores, stats
