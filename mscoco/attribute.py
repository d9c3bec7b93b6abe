"""Attribute MSCOCO queries with any registered method, on one process or many (``accelerate launch``).

    python -m mscoco.attribute --data DATA --out OUT [--queries release:0-9] [--method unlearning] \\
        [--config mscoco/configs/mscoco.yaml --preset paper] [--fisher.file DATA/fisher_info.pt]
    accelerate launch -m mscoco.attribute ...     (the passes split over every process)

Prepares the method once (Fisher or the released one, pretrained losses; cached in
``OUT/cache/<method>/``, resumable) and writes ``OUT/<method>/<query id>/{ranking.json, scores.npy,
config.json, top10.png}`` per query. Finished queries with the same settings are skipped; an
interrupted run continues from its last finished chunk.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common.config import add_attribution_arguments, load_preset, method_from_args
from common.errors import cli
from common.methods.base import run_method
from mscoco.model import DEFAULT_COMPONENTS
from mscoco.pipeline import load_model, load_query_spec, load_run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="the release folder (mscoco/download.sh)")
    parser.add_argument(
        "--unet", default=None, help="UNet weights, diffusers folder or hub id (default DATA/model.bin)"
    )
    parser.add_argument(
        "--components", default=DEFAULT_COMPONENTS, help="hub id or folder with SD2's vae/, text_encoder/, tokenizer/"
    )
    parser.add_argument(
        "--queries", default="release", help="release, release:0-9,15 or a folder of query folders (default all 110)"
    )
    parser.add_argument("--no-plot", action="store_true", help="skip top10.png (it decodes through the VAE)")
    add_attribution_arguments(parser, "YAML file of presets (mscoco/configs/mscoco.yaml)")
    return parser


@cli
def main(argv: list[str] | None = None) -> None:
    from accelerate import Accelerator

    args = load_preset(build_parser(), argv=argv)
    cls, cfg = method_from_args(args)
    accelerator = Accelerator(cpu=args.device == "cpu")
    run = load_run(args.data, args.unet, args.components, accelerator.device)
    queries = load_query_spec(args.queries, args.data)
    out = Path(args.out)
    # TRAK's ensemble members (--trak.ensemble): other UNets of the same recipe, by folder or hub id
    members = lambda unet: load_model(args.data, unet, args.components, accelerator.device)
    method = cls(cfg, run.model, run.data, out / "cache" / cls.name, members, accelerator=accelerator)
    if args.prepare_only:  # e.g. the EK-FAC factors and pretrained losses, on every GPU, before the queries
        method.prepare()
        if accelerator.is_main_process:
            print(f"prepared in {out / 'cache' / cls.name}")
        return
    run_method(method, queries, out / cls.name, args.top_k, args.overwrite, plot=not args.no_plot)
    if accelerator.is_main_process:
        print(f"rankings in {out / cls.name}")


if __name__ == "__main__":
    main()
