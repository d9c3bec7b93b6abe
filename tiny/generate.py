"""Generate query images with the tiny model from prompts, each from seeded initial noise.

    python -m tiny.generate --model results/quickstart/model --out results/quickstart/queries --num 8

Prompts come from ``--prompts`` (a text file, one per line) or are drawn (seeded) from the
shapes grammar. Each query folder keeps its image, pixels, text embedding and initial noise.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from common import keyed_random
from common.data import Query, as_numpy_uint8
from common.diffusion import unet_denoiser
from common.errors import AttributionError, cli
from common.queries import save_query
from common.sampling import SAMPLERS, sample
from tiny import shapes
from tiny.model import TinyTextToImage
from tiny.pipeline import set_threads


def shape_prompts(num: int, seed: int) -> list[tuple[str, dict]]:
    """Seeded captions from the shapes grammar, with their attributes."""
    rng = np.random.default_rng(seed + 10_000)
    out = []
    for _ in range(num):
        spec = shapes.sample_spec(rng)
        out.append((spec.caption(), spec.attributes()))
    return out


def generate_queries(
    model: TinyTextToImage,
    prompts: list[tuple[str, dict]],
    out: str | Path,
    seed: int = 0,
    sampler: str = "ddpm",
    num_steps: int = 1000,
    prefix: str = "q",
    guidance_scale: float = 1.0,
) -> list[Path]:
    """Sample one image per prompt and save each as a query folder ``<prefix><i>``."""
    cfg = model.cfg
    ids = [f"{prefix}{i:03d}" for i in range(len(prompts))]
    keys = [Query(i, torch.zeros(1, 1, 1), torch.zeros(1, 1)).key for i in ids]
    noise = keyed_random.keyed_normal(
        [(seed, keyed_random.SAMPLE, k) for k in keys], (3, cfg.resolution, cfg.resolution)
    )
    text = model.encode_text([p for p, _ in prompts])
    null_text = model.null_text() if guidance_scale != 1.0 else None
    images = sample(
        unet_denoiser(model.unet),
        text,
        noise,
        model.scheduler,
        keys,
        seed,
        sampler,
        num_steps,
        guidance_scale,
        null_text,
    )
    folders = []
    for qid, (prompt, attrs), img, emb, eps in zip(ids, prompts, images, text, noise):
        query = Query(qid, img, emb[None], prompt)
        info = {"seed": seed, "sampler": sampler, "num_steps": num_steps, "guidance_scale": guidance_scale}
        info["attributes"] = attrs
        folders.append(save_query(out, query, eps, as_numpy_uint8(img), info))
    return folders


@cli
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="folder of a trained tiny model")
    parser.add_argument("--out", required=True, help="queries folder")
    parser.add_argument("--num", type=int, default=8, help="queries drawn from the shapes grammar")
    parser.add_argument("--prompts", default=None, help="text file with one prompt per line (overrides --num)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial and step noise")
    parser.add_argument("--sampler", choices=SAMPLERS, default="ddpm", help="sampler")
    parser.add_argument("--num-steps", type=int, default=1000, help="sampling steps")
    parser.add_argument("--guidance-scale", type=float, default=1.0, help="classifier-free guidance (1: none)")
    args = parser.parse_args()
    set_threads()
    model = TinyTextToImage.load(args.model)
    if args.prompts:
        if not Path(args.prompts).exists():
            raise AttributionError(f"missing prompts file: {args.prompts}")
        prompts = [(line.strip(), {}) for line in Path(args.prompts).read_text().splitlines() if line.strip()]
        if not prompts:
            raise AttributionError(f"{args.prompts} holds no prompts")
    else:
        prompts = shape_prompts(args.num, args.seed)
    folders = generate_queries(
        model, prompts, args.out, args.seed, args.sampler, args.num_steps, guidance_scale=args.guidance_scale
    )
    print(f"wrote {len(folders)} queries to {args.out}")


if __name__ == "__main__":
    main()
