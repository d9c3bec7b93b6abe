"""Training a text-to-image denoiser from scratch with keyed randomness and optional exclusions.

Epoch ``e`` visits the full training set in the order ``randperm(N)`` keyed by ``(seed, e)``;
each visit of image ``i`` in epoch ``e`` draws its flip, caption, timestep and noise from a
generator keyed by ``(seed, e, i)``. Excluding images removes them from that order; everything
else a retained image sees is unchanged, and an empty exclusion reproduces the original run.

The loop runs under ``accelerate``: started with ``accelerate launch``, each process takes an
interleaved share of every global batch and the gradients are averaged, so the update is that of
the whole batch whatever the number of processes (up to floating-point summation order).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator

from common import keyed_random
from common.config import identity_settings, no_effect
from common.data import ArrayTrainingSet
from common.diffusion.ddpm_loss import per_sample_loss, unet_denoiser
from common.errors import AttributionError, require
from common.model import DiffusionModel
from common.processes import rank_world
from common.progress import progress_bar
from common.training.checkpoint import load_training_state, save_training_state

EXCLUSION_MODES = ("remove", "mask", "zero")


@dataclass
class TrainConfig:
    """The training recipe."""

    steps: int = field(default=1500, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=64, metadata={"help": "images per step"})
    lr: float = field(default=2e-3, metadata={"help": "AdamW peak learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_steps: int = field(default=50, metadata={"help": "linear warm-up steps"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "final learning rate / peak (cosine decay)"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient norm clip (0: off)"})
    exclusion_mode: str = field(
        default="zero",
        metadata={
            "help": "remove: drop excluded images from the order; mask: keep the full set's batches and noise, "
            "excluded images masked out of the loss (mean over the retained); zero: as mask, but the loss is "
            "divided by the full batch size, so every retained image weighs exactly what it weighs in the full run"
        },
    )
    cond_dropout: float = field(
        default=0.0, metadata={"help": "share of samples trained on the empty caption (enables guidance)"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the init, data order, flips, timesteps and noise"})
    flips: bool = field(
        default=True,
        metadata={
            "help": "random horizontal flips (the paper's); turn off for data that is not mirror-symmetric "
            "(digits, text, logos). Recorded with the model: attribution then scores only the original"
        },
    )
    checkpoint_every: int = no_effect(250, "steps between resumable checkpoints (0: off)")

    def __post_init__(self) -> None:
        require(self.steps >= 1 and self.batch_size >= 1, "steps and batch_size must be positive")
        require(self.lr > 0, f"lr must be positive, got {self.lr}")
        require(self.exclusion_mode in EXCLUSION_MODES, f"unknown exclusion_mode {self.exclusion_mode!r}")
        require(0 <= self.cond_dropout < 1, f"cond_dropout must lie in [0, 1), got {self.cond_dropout}")


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` of the peak: transformers'
    ``get_cosine_with_min_lr_schedule_with_warmup`` after warm-up, but warming up from the first step (theirs starts at
    0, one step behind), which every trained model and measured table here was made with."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def loss_scale(mode: str, batch: int, kept: int, shard: int, world: int) -> float:
    """Factor on a process's mean shard loss so that the average over ``world`` processes is the step's loss.

    The step's loss is the sum of the ``kept`` retained visits' losses divided by ``kept`` (remove,
    mask) or by the full ``batch`` size (zero: each retained visit weighs what it weighs in the full
    run). One process with nothing excluded gets exactly 1.
    """
    return shard * world / (batch if mode == "zero" else kept)


class BatchSchedule:
    """The keyed visiting order: which images (and draws) make up each step's batch."""

    def __init__(self, n: int, cfg: TrainConfig, exclude: Sequence[int] = ()) -> None:
        self.n, self.cfg = n, cfg
        self.excluded = torch.zeros(n, dtype=torch.bool)
        if len(exclude):
            idx = torch.as_tensor(list(exclude), dtype=torch.long)
            require(bool((idx >= 0).all() and (idx < n).all()), f"excluded indices must lie in [0, {n})")
            self.excluded[idx] = True
        require(int((~self.excluded).sum()) >= 1, "every training image is excluded")
        self._orders: dict[int, torch.Tensor] = {}

    @property
    def masking(self) -> bool:
        return self.cfg.exclusion_mode in ("mask", "zero")

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._orders:
            perm = torch.randperm(
                self.n, generator=keyed_random.generator(self.cfg.seed, keyed_random.Purpose.TRAIN, epoch)
            )
            self._orders = {epoch: perm if self.masking else perm[~self.excluded[perm]]}
        return self._orders[epoch]

    def batch(self, step: int) -> list[tuple[int, int]]:
        """(epoch, image index) pairs of a step; epochs follow each other over the retained images.

        With ``exclusion_mode`` ``mask`` or ``zero`` the batches are those of the full set, excluded images
        included; :meth:`keep` says which visits count in the loss.
        """
        kept = self.n if self.masking else int((~self.excluded).sum())
        start = step * self.cfg.batch_size
        return [
            (pos // kept, int(self._order(pos // kept)[pos % kept]))
            for pos in range(start, start + self.cfg.batch_size)
        ]

    def keep(self, visits: list[tuple[int, int]]) -> torch.Tensor:
        """Which visits (B,) contribute to the loss."""
        return ~self.excluded[torch.tensor([i for _, i in visits])]


def _draw(
    data: ArrayTrainingSet,
    visits: list[tuple[int, int]],
    cfg: TrainConfig,
    ref: torch.Tensor,
    null_text: torch.Tensor | None,
    num_train_timesteps: int,
):
    epoch, idx = torch.tensor(visits).unbind(1)
    u = keyed_random.keyed_uniform(keyed_random.key_rows(cfg.seed, keyed_random.Purpose.TRAIN, 1, epoch, idx), 4)
    flips = (u[:, 0] < 0.5) & cfg.flips  # drawn either way: the other draws stay the same
    caps = keyed_random.below(u[:, 1], data.num_captions)
    ts = keyed_random.below(u[:, 2], num_train_timesteps)
    drop = u[:, 3] < cfg.cond_dropout
    keys = keyed_random.key_rows(cfg.seed, keyed_random.Purpose.TRAIN, 2, epoch, idx)
    x0 = data.images(idx, flips).to(ref)
    text = data.text(idx, caps).to(ref)
    if cfg.cond_dropout > 0:
        text[drop] = null_text.to(ref)
    noise = keyed_random.keyed_normal(keys, data.image_shape, dtype=ref.dtype, device=ref.device)
    return x0, text, ts.to(ref.device), noise


def _resume(
    checkpoint: str | Path | None, unet: torch.nn.Module, opt: torch.optim.Optimizer, identity: dict
) -> tuple[int, list[float]]:
    """The step to go on from and the losses of the steps before it that the summary averages: a checkpoint of this
    run's restores the weights, the optimizer and those losses; another run's is refused; without one, (0, [])."""
    if checkpoint is None or not Path(checkpoint).exists():
        return 0, []
    info = load_training_state(checkpoint, unet, opt)
    if info.get("identity") != identity:
        raise AttributionError(f"checkpoint {checkpoint} belongs to another training run; remove it to start over")
    return info["step"], list(info.get("recent_losses", []))


def _step_loss(
    wrapped: torch.nn.Module,
    model: DiffusionModel,
    data: ArrayTrainingSet,
    cfg: TrainConfig,
    schedule: BatchSchedule,
    step: int,
    rank_and_world: tuple[int, int],
    null_text: torch.Tensor | None,
) -> torch.Tensor | None:
    """This process's share of one step's loss, scaled so that averaging the gradients over processes gives the
    step's; None when the exclusions leave the step no visit (the step is skipped).

    Excluded visits (mask and zero modes) are dropped before the forward pass: they never touch a gradient, and
    every retained visit keeps the flip, timestep and noise it has in the full run.
    """
    rank, world = rank_and_world
    batch = schedule.batch(step)
    visits = [v for v, k in zip(batch, schedule.keep(batch).tolist()) if k]
    if not visits:
        return None
    shard = visits[rank::world]
    if not shard:  # fewer retained visits than processes: this one still joins the gradient average
        return sum(p.sum() for p in wrapped.parameters()) * 0.0
    x0, text, t, noise = _draw(data, shard, cfg, next(wrapped.parameters()), null_text, model.num_train_timesteps)
    scale = loss_scale(cfg.exclusion_mode, len(batch), len(visits), len(shard), world)
    return per_sample_loss(unet_denoiser(wrapped), x0, text, t, noise, model.alphas_cumprod).mean() * scale


def _save_checkpoint(
    checkpoint, cfg: TrainConfig, done: int, accelerator, wrapped, opt, identity: dict, recent: list[float]
) -> None:
    """After ``done`` steps: the weights, optimizer state and the recent losses the summary averages (so a resumed run
    reports what an uninterrupted one does), every ``checkpoint_every`` steps and at the end."""
    if checkpoint is None or not cfg.checkpoint_every or (done % cfg.checkpoint_every and done != cfg.steps):
        return
    if accelerator.is_main_process:
        info = {"step": done, "identity": identity, "recent_losses": recent}
        save_training_state(checkpoint, accelerator.unwrap_model(wrapped), opt, info)
    accelerator.wait_for_everyone()


def train(
    model: DiffusionModel,
    data: ArrayTrainingSet,
    cfg: TrainConfig,
    exclude: Sequence[int] = (),
    checkpoint: str | Path | None = None,
    progress: bool = True,
    accelerator: Accelerator | None = None,
) -> dict:
    """Train ``model.unet`` in place (its initial weights are the caller's, seeded); resume from ``checkpoint``.

    The empty caption's condition (``model.null_text()``) replaces the caption of a ``cond_dropout``
    share of the visits so the model also learns the unconditional score (classifier-free guidance).
    ``accelerator`` defaults to a single process on the device the UNet lives on.

    Returns:
        A summary: final loss (mean of the last 50 steps), seconds, steps per second.
    """
    unet = model.unet
    null_text = model.null_text() if cfg.cond_dropout > 0 else None
    if accelerator is None:
        accelerator = Accelerator(cpu=next(unet.parameters()).device.type == "cpu")
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = BatchSchedule(len(data), cfg, exclude)
    identity = {"train": identity_settings(cfg), "exclude": sorted(int(i) for i in exclude), "data": data.fingerprint}
    start, recent = _resume(checkpoint, unet, opt, identity)
    wrapped, wrapped_opt = accelerator.prepare(unet, opt)
    rank, world = rank_world(accelerator)
    wrapped.train()
    t0 = time.time()
    main = accelerator.is_main_process
    bar = progress_bar(range(start, cfg.steps), desc="train", disable=not (progress and main), initial=start,
                       total=cfg.steps)  # fmt: skip
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = learning_rate(cfg, step)
        loss = _step_loss(wrapped, model, data, cfg, schedule, step, (rank, world), null_text)
        if loss is None:
            continue
        wrapped_opt.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        if cfg.grad_clip > 0:
            accelerator.clip_grad_norm_(wrapped.parameters(), cfg.grad_clip)
        wrapped_opt.step()
        recent = (recent + [float(accelerator.reduce(loss.detach(), reduction="sum")) / world])[-50:]
        if not math.isfinite(recent[-1]):
            raise AttributionError(f"training diverged at step {step} (loss {recent[-1]}); lower the learning rate")
        if step % 25 == 0:
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}")
        if step % 500 == 0:
            data.release_pages()  # memory-mapped rows read so far
        _save_checkpoint(checkpoint, cfg, step + 1, accelerator, wrapped, opt, identity, recent)
    unet.eval()
    seconds = time.time() - t0
    return {
        "final_loss": sum(recent) / max(1, len(recent)),
        "seconds": round(seconds, 1),
        "steps_per_second": round((cfg.steps - start) / max(seconds, 1e-9), 3),
        "processes": world,
    }
