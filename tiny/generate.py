"""Generate query images with the tiny model from prompts, each from seeded initial noise.

    python -m tiny.generate --model results/quickstart/model --out results/quickstart/queries --num 8

Prompts come from ``--prompts`` (a text file, one per line) or are drawn (seeded) from the
shapes grammar. Each query folder keeps its image, pixels, text embedding and initial noise.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common.diffusion.sampling import SAMPLERS
from common.errors import AttributionError, cli
from common.queries import generate_queries
from tiny.model import TinyTextToImage
from tiny.pipeline import set_threads, shape_prompts


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
