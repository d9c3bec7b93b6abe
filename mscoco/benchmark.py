"""The MSCOCO benchmark for the driver (:mod:`common.driver`): the authors' release folder (its UNet, the
memory-mapped training set and the 110 released queries), or another UNet of the same recipe and generated queries.

    python -m common.driver mscoco attribute --data DATA --out OUT [--queries release:0-9] [--method unlearning] \\
        [--config mscoco/configs/mscoco.yaml --preset paper] [--fisher.file DATA/fisher_info.pt]
    accelerate launch -m common.driver mscoco attribute ...     (the passes split over every process)
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

from common.benchmark import Attribution, Benchmark
from mscoco.model import DEFAULT_COMPONENTS
from mscoco.pipeline import load_model, load_query_spec, load_run


class Mscoco(Benchmark):
    name = "mscoco"
    presets = "mscoco/configs/mscoco.yaml"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--data", required=True, help="the release folder (mscoco/download.sh)")
        parser.add_argument(
            "--unet", default=None, help="UNet weights, diffusers folder or hub id (default DATA/model.bin)"
        )
        parser.add_argument(
            "--components",
            default=DEFAULT_COMPONENTS,
            help="hub id or folder with SD2's vae/, text_encoder/, tokenizer/",
        )
        parser.add_argument(
            "--queries",
            default="release",
            help="release, release:0-9,15 or a folder of query folders (default all 110)",
        )

    def attributions(self, args: argparse.Namespace, device, method: type, cfg) -> Iterator[Attribution]:
        run = load_run(args.data, args.unet, args.components, device)
        queries = load_query_spec(args.queries, args.data)
        # TRAK's ensemble members (--trak.ensemble): other UNets of the same recipe, by folder or hub id
        members = lambda unet: load_model(args.data, unet, args.components, device)
        yield Attribution(run.model, run.data, queries, members)
