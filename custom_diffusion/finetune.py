"""Custom Diffusion fine-tuning (Kumari et al., CVPR 2023): a model learns a concept from a few exemplars.

Only the UNet's cross-attention keys and values and one new token's input embedding (initialised
from a rare word's, ``ktn`` as in diffusers' Custom Diffusion script) are trained. Each step takes
``batch_size`` exemplar draws captioned with the training prompt (e.g. ``"<new1> fish"``) and as many
regularisation images from the pretraining set with their own captions, whose loss is weighted by
``prior_weight``: Custom Diffusion's real-image regularisation, which keeps the K/V weights from
drifting for everything but the new token. Custom Diffusion retrieves its 200 regularisation
images by caption similarity to the class prompt; here they are a keyed random sample of the
pretraining set (a stated difference). The result is saved as the release's two files
(:func:`custom_diffusion.model.save_custom`).

Every draw (exemplar, flip, regularisation image, caption, timestep, noise) is keyed by
``(seed, step, slot)``, so a run is reproducible on any device.

Fine-tune Stable Diffusion on your own images (LAION arrays of the AbC release as regularisation):

    python -m custom_diffusion.finetune --exemplars my_dog/*.jpg --prompt "<new1> dog" \\
        --laion data/abc --out models/my_dog [--base CompVis/stable-diffusion-v1-4] [--device cuda]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from common import keyed_random
from common.config import add_dataclass_arguments, dataclass_from_args, resolve_device
from common.data import ArrayTrainingSet
from common.diffusion.ddpm_loss import per_sample_loss, unet_denoiser
from common.diffusion.selection import check_selection, select_parameters
from common.errors import AttributionError, cli, require
from common.files import write_json
from common.model import DiffusionModel
from common.progress import progress_bar
from custom_diffusion.model import CUSTOM_WEIGHTS, SD_V14, StableDiffusionModel, save_custom
from custom_diffusion.release import LAION_COUNT, encode, load_laion


@dataclass
class FinetuneConfig:
    """The Custom Diffusion recipe (defaults: diffusers' example for one concept, lr scaled by the batch)."""

    steps: int = field(default=250, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=2, metadata={"help": "exemplar draws per step (as many regularisation images)"})
    lr: float = field(default=2e-5, metadata={"help": "AdamW learning rate (1e-5 x batch size, as --scale_lr)"})
    weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay of the K/V weights"})
    prior_weight: float = field(default=1.0, metadata={"help": "weight of the regularisation images' loss (0: none)"})
    num_regularisation: int = field(default=200, metadata={"help": "pretraining images drawn from (keyed sample)"})
    token: str = field(default="<new1>", metadata={"help": "the new token (must appear in the prompt)"})
    init_word: str = field(default="ktn", metadata={"help": "a rare word whose embedding starts the new token's"})
    selection: str = field(
        default="cross-attn-kv",
        metadata={"help": "UNet weights trained (Custom Diffusion: cross-attn-kv; see common.diffusion.selection)"},
    )
    flips: bool = field(default=True, metadata={"help": "random horizontal flips of the exemplars"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient norm clip (0: off)"})
    seed: int = field(default=0, metadata={"help": "seed of every draw"})

    def __post_init__(self) -> None:
        require(self.steps >= 1 and self.batch_size >= 1, "steps and batch_size must be positive")
        require(self.lr > 0 and self.prior_weight >= 0, "lr must be positive and prior_weight non-negative")
        require(self.token.strip() == self.token and self.token, f"token must be one word, not {self.token!r}")
        check_selection(self.selection)


@contextmanager
def trainable_token(model: DiffusionModel, row: int, embedding: torch.nn.Parameter):
    """Within the block the text encoder reads ``embedding`` (D,) for token ``row``; other rows stay frozen."""
    table = model.text_encoder.get_input_embeddings()

    def hook(_module, inputs, output):
        return torch.where((inputs[0] == row)[..., None], embedding.to(output), output)

    handle = table.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
        with torch.no_grad():
            table.weight[row] = embedding.detach().to(table.weight)


def init_embedding(model: DiffusionModel, word: str) -> torch.Tensor:
    """The input embedding (D,) of ``word``, which must be one token."""
    special = set(model.token_ids([""])[0].tolist())  # start, end and padding
    pieces = [i for i in model.token_ids([word])[0].tolist() if i not in special]
    require(len(pieces) == 1, f"init_word {word!r} is {len(pieces)} tokens, not one")
    return model.text_encoder.get_input_embeddings().weight[pieces[0]].detach().clone()


def _draws(cfg: FinetuneConfig, step: int, num_exemplars: int, num_regular: int, num_captions: int, t_max: int):
    slots = torch.arange(cfg.batch_size)
    u = keyed_random.keyed_uniform(keyed_random.key_rows(cfg.seed, keyed_random.Purpose.FINETUNE, step, slots), 7)
    return {
        "exemplar": keyed_random.below(u[:, 0], num_exemplars),
        "flip": (u[:, 1] < 0.5) & cfg.flips,
        "regular": keyed_random.below(u[:, 2], num_regular),
        "regular_flip": u[:, 3] < 0.5,
        "caption": keyed_random.below(u[:, 4], num_captions),
        "t": keyed_random.below(u[:, 5], t_max),
        "regular_t": keyed_random.below(u[:, 6], t_max),
        "keys": keyed_random.key_rows(
            cfg.seed, keyed_random.Purpose.FINETUNE, step, 1 + slots, 0
        ),  # the exemplars' noise
        "regular_keys": keyed_random.key_rows(cfg.seed, keyed_random.Purpose.FINETUNE, step, 1 + slots, 1),
    }


def _step_loss(model, denoise, schedule, exemplars, pretraining, pool, ids, d, cfg: FinetuneConfig) -> torch.Tensor:
    """The exemplars' loss under the prompt plus ``prior_weight`` x the regularisation images' under their captions."""
    device, dtype = model.device, model.dtype
    x0 = exemplars.images(d["exemplar"], d["flip"]).to(device=device, dtype=dtype)
    rows = ids[d["exemplar"].to(ids.device)] if len(ids) > 1 else ids.expand(len(x0), -1)  # each exemplar's prompt
    text = model.text_encoder(input_ids=rows).last_hidden_state.to(dtype)
    noise = keyed_random.keyed_normal(d["keys"], x0.shape[1:], dtype=x0.dtype, device=device)
    loss = per_sample_loss(denoise, x0, text, d["t"].to(device), noise, schedule).mean()
    if pool is None:
        return loss
    idx = pool[d["regular"]]
    xr = pretraining.images(idx, d["regular_flip"] & model.flips).to(device=device, dtype=dtype)
    tr = pretraining.text(idx, d["caption"]).to(device=device, dtype=dtype)
    nr = keyed_random.keyed_normal(d["regular_keys"], xr.shape[1:], dtype=xr.dtype, device=device)
    return loss + cfg.prior_weight * per_sample_loss(denoise, xr, tr, d["regular_t"].to(device), nr, schedule).mean()


def regularisation_indices(num_images: int, cfg: FinetuneConfig) -> torch.Tensor:
    """The keyed sample of pretraining images used as regularisation (all when there are fewer)."""
    order = torch.randperm(num_images, generator=keyed_random.generator(cfg.seed, keyed_random.Purpose.FINETUNE, 0))
    return order[: cfg.num_regularisation].sort().values


def _new_token(model: DiffusionModel, cfg: FinetuneConfig) -> tuple[torch.nn.Parameter, int]:
    """Add ``cfg.token`` to the model's vocabulary, its embedding started from ``cfg.init_word``'s: the embedding
    as a parameter to learn, and its row."""
    embedding = torch.nn.Parameter(init_embedding(model, cfg.init_word).float())
    model.add_token(cfg.token, embedding.detach())
    model.token = cfg.token
    return embedding, model.token_row(cfg.token)


def _trainable(model: DiffusionModel, weights: list[torch.nn.Parameter], embedding: torch.nn.Parameter,
               cfg: FinetuneConfig) -> torch.optim.Optimizer:  # fmt: skip
    """Freeze everything but ``weights`` and the new token's embedding; their optimizer (no decay on the token)."""
    model.unet.requires_grad_(False)
    model.text_encoder.requires_grad_(False)  # only the new token's row learns, through the hook's parameter
    for w in weights:
        w.requires_grad_(True)
    groups = [{"params": weights}, {"params": [embedding], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def finetune(
    model: DiffusionModel,
    exemplars: ArrayTrainingSet,
    prompt: str | Sequence[str],
    pretraining: ArrayTrainingSet | None,
    cfg: FinetuneConfig,
    progress: bool = True,
) -> dict:
    """Teach ``model`` (in place) the concept of ``exemplars`` under ``prompt``; sets ``model.token``.

    Args:
        model: a base model whose text side can learn a token (``token_ids``, ``add_token``).
        exemplars: the concept's images as model inputs (their captions are not used).
        prompt: the training prompt, containing ``cfg.token``; or one prompt per exemplar (the tiny twin
            captions each exemplar as the pretraining set is captioned, the token in place of the new word).
        pretraining: where the regularisation images come from (None or ``prior_weight`` 0: none).
    Returns:
        A summary: mean loss of the first and last 10% of steps, seconds, settings.
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    require(len(prompts) in (1, len(exemplars)), f"{len(prompts)} prompts for {len(exemplars)} exemplars")
    for text in prompts:
        require(cfg.token in text, f"the prompt {text!r} does not contain the new token {cfg.token!r}")
    regular = cfg.prior_weight > 0 and pretraining is not None and len(pretraining) > 0
    embedding, row = _new_token(model, cfg)
    unet = model.unet
    params = dict(unet.named_parameters())
    names = select_parameters(unet, cfg.selection)
    opt = _trainable(model, [params[n] for n in names], embedding, cfg)
    ids = model.token_ids(prompts).to(model.device)
    pool = regularisation_indices(len(pretraining), cfg) if regular else None
    denoise, schedule = unet_denoiser(unet), model.alphas_cumprod
    losses: list[float] = []
    t0 = time.time()
    unet.train()
    try:
        with trainable_token(model, row, embedding):
            for step in progress_bar(range(cfg.steps), desc="fine-tune", disable=not progress):
                d = _draws(cfg, step, len(exemplars), len(pool) if regular else 1,
                           pretraining.num_captions if regular else 1, model.num_train_timesteps)  # fmt: skip
                loss = _step_loss(model, denoise, schedule, exemplars, pretraining, pool, ids, d, cfg)
                if not torch.isfinite(loss):  # before any update: the weights stay as the last good step left them
                    raise AttributionError(f"fine-tuning diverged at step {step} (loss {loss.item()}); lower lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_([params[n] for n in names] + [embedding], cfg.grad_clip)
                opt.step()
                losses.append(loss.item())
    finally:
        unet.requires_grad_(False).eval()
        for n in names:
            params[n].grad = None
    tenth = max(1, len(losses) // 10)
    return {
        "first_loss": sum(losses[:tenth]) / tenth,
        "final_loss": sum(losses[-tenth:]) / tenth,
        "seconds": time.time() - t0,
        "finetune": asdict(cfg),
        "prompt": prompt if isinstance(prompt, str) else prompts,
        "regularisation": 0 if pool is None else len(pool),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--exemplars", nargs="+", required=True, help="the concept's images (any size; cropped)")
    parser.add_argument("--prompt", required=True, help='training prompt with the new token, e.g. "<new1> dog"')
    parser.add_argument("--out", required=True, help="folder for the two files of the Custom Diffusion model")
    parser.add_argument("--base", default=SD_V14, help="Stable Diffusion: hub id or pipeline folder")
    parser.add_argument("--laion", help="AbC data folder with the LAION arrays (regularisation; none if omitted)")
    parser.add_argument("--laion-count", type=int, default=LAION_COUNT, help="LAION images to draw from")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")
    parser.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    add_dataclass_arguments(parser, FinetuneConfig, "finetune")
    return parser


@cli
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    cfg = dataclass_from_args(FinetuneConfig, args, "finetune")
    out = Path(args.out)
    require(
        args.overwrite or not (out / CUSTOM_WEIGHTS).exists(),
        f"{out} already holds a Custom Diffusion model; pass --overwrite to replace it",
    )
    for path in args.exemplars:
        require(Path(path).is_file(), f"missing exemplar image {path}")
    require(cfg.token in args.prompt, f"the prompt {args.prompt!r} does not contain the new token {cfg.token!r}")
    model = StableDiffusionModel.load(args.base, resolve_device(args.device))
    laion = load_laion(args.laion, args.laion_count, model.unet.config.cross_attention_dim) if args.laion else None
    originals, flips = encode(model, args.exemplars, cfg.seed)
    exemplars = ArrayTrainingSet(originals, torch.zeros(len(originals), 1, 1), flipped=flips)  # text unused
    summary = finetune(model, exemplars, args.prompt, laion, cfg)
    save_custom(model, out, cfg.selection)
    write_json(out / "finetune.json", summary | {"exemplars": [str(p) for p in args.exemplars], "base": str(args.base)})
    print(f"Custom Diffusion model in {out}: loss {summary['first_loss']:.4f} -> {summary['final_loss']:.4f}")


if __name__ == "__main__":
    main()
