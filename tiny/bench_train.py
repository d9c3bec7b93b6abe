"""Training throughput of tiny recipes: how many models per hour can the leave-K-out table retrain?

    python -m tiny.bench_train --data results/counterfactual/data --steps 40

Trains each (widths, batch size) variant for a few steps and prints steps/s, images/s and the
implied minutes per model and models per hour for a full recipe of ``--recipe-steps`` steps.
"""

from __future__ import annotations

import argparse

import torch

from common.errors import cli
from common.training.train import TrainConfig, train
from tiny.data import load_image_folder
from tiny.model import TinyModelConfig, TinyTextToImage
from tiny.pipeline import set_threads, training_set

VARIANTS = [((16, 32, 64), 32), ((16, 32, 64), 64), ((16, 32, 64), 128), ((8, 16, 32), 64), ((16, 32), 64)]


@cli
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="image folder with metadata.jsonl")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per variant")
    parser.add_argument("--recipe-images", type=int, default=800 * 32, help="images a full recipe visits")
    args = parser.parse_args()
    set_threads()
    print("| widths | batch | parameters | steps/s | images/s | min per model | models per hour |")
    print("|---|---|---|---|---|---|---|")
    for widths, batch in VARIANTS:
        cfg_model = TinyModelConfig(channels=widths, beta_schedule="squaredcos_cap_v2")
        folder = load_image_folder(args.data, cfg_model.resolution)
        torch.manual_seed(0)
        model = TinyTextToImage(cfg_model)
        data = training_set(model, folder)
        cfg = TrainConfig(steps=args.steps, batch_size=batch, warmup_steps=5, cond_dropout=0.1, checkpoint_every=0)
        summary = train(model, data, cfg, progress=False)
        per_s = summary["steps_per_second"] * batch
        minutes = args.recipe_images / per_s / 60
        params = sum(p.numel() for p in model.unet.parameters())
        print(
            f"| {'/'.join(map(str, widths))} | {batch} | {params / 1e6:.2f}M | {summary['steps_per_second']:.2f} "
            f"| {per_s:.0f} | {minutes:.2f} | {60 / minutes:.0f} |"
        )


if __name__ == "__main__":
    main()
