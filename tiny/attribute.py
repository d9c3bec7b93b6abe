"""Attribute tiny-model queries by unlearning.

    python -m tiny.attribute --model M --data D --queries Q --out OUT

Estimates (or reuses) the Fisher and the pretrained losses in ``OUT``, then writes
``OUT/queries/<id>/{ranking.json, scores.npy, config.json, top10.png}`` per query.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from pathlib import Path

from common.attribute import cached_base_losses, run_attribution
from common.config import add_dataclass_arguments, dataclass_from_args, load_preset, resolve_device
from common.data import as_numpy_uint8
from common.errors import cli
from common.fisher import FisherConfig
from common.fisher_cache import cached_fisher
from common.losses import LossConfig
from common.per_sample_grad import use_classic_attention
from common.queries import load_queries
from common.unlearn import UnlearnConfig
from tiny.data import load_image_folder
from tiny.model import TinyTextToImage
from tiny.pipeline import set_threads, training_set

STAGES = ["fisher", "loss", "unlearn"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="folder of a trained tiny model")
    parser.add_argument("--data", required=True, help="the training image folder")
    parser.add_argument("--queries", required=True, help="queries folder")
    parser.add_argument("--query-ids", nargs="*", default=None, help="only these queries")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--config", default=None, help="YAML file of presets")
    parser.add_argument("--preset", default="default", help="preset name in --config")
    parser.add_argument("--top-k", type=int, default=100, help="images listed in ranking.json")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    parser.add_argument("--overwrite", action="store_true", help="replace query folders made under another config")
    add_dataclass_arguments(parser, FisherConfig, "fisher")
    add_dataclass_arguments(parser, LossConfig, "loss")
    add_dataclass_arguments(parser, UnlearnConfig, "unlearn")
    return parser


@cli
def main(argv: list[str] | None = None) -> None:
    args = load_preset(build_parser(), STAGES, argv)
    fisher_cfg = dataclass_from_args(FisherConfig, args, "fisher")
    loss_cfg = dataclass_from_args(LossConfig, args, "loss")
    unlearn_cfg = dataclass_from_args(UnlearnConfig, args, "unlearn")
    set_threads()
    out = Path(args.out)
    model = TinyTextToImage.load(args.model)
    folder = load_image_folder(args.data, model.cfg.resolution)
    data = training_set(model, folder)
    queries = load_queries(args.queries, args.query_ids)
    model.to(resolve_device(args.device))
    use_classic_attention(model.unet)
    model.unet.requires_grad_(False)
    fingerprint = model.fingerprint()
    timings = {}
    t0 = time.time()
    fisher = cached_fisher(model.unet, data, model.alphas_cumprod, fisher_cfg, out / "fisher.safetensors", fingerprint)
    t1 = time.time()
    base = cached_base_losses(
        model.unet, data, loss_cfg, model.alphas_cumprod, out / "base_losses.safetensors", fingerprint
    )
    t2 = time.time()
    run_config = {"model": fingerprint, "data": data.fingerprint, "fisher": asdict(fisher_cfg)}
    run_attribution(
        model.unet,
        data,
        queries,
        out / "queries",
        model.alphas_cumprod,
        loss_cfg,
        unlearn_cfg,
        fisher,
        base,
        run_config,
        image_of=lambda i: as_numpy_uint8(folder.pixels[i]),
        top_k=args.top_k,
        overwrite=args.overwrite,
    )
    timings = {
        "fisher_s": round(t1 - t0, 1),
        "base_losses_s": round(t2 - t1, 1),
        "attribution_s": round(time.time() - t2, 1),
    }
    print(f"timings: {timings}")
    print(f"rankings in {out / 'queries'}")


if __name__ == "__main__":
    main()
