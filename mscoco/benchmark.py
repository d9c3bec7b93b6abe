"""The MSCOCO benchmark for the driver (:mod:`common.driver`): the authors' release folder (its UNet, the
memory-mapped training set and the 110 released queries), or another UNet of the same recipe and generated queries.

    python -m common.driver mscoco attribute --data DATA --out OUT [--queries release:0-9] [--method unlearning] \\
        [--config mscoco/configs/mscoco.yaml --preset paper] [--fisher.file DATA/fisher_info.pt]
    accelerate launch -m common.driver mscoco attribute ...     (the passes split over every process)
    python -m common.driver mscoco generate --data DATA --prompts prompts.txt --out QUERIES [--components SD2]
    python -m common.driver mscoco generate --data DATA --release 0-9 --out QUERIES   (the released ones, as folders)
    python -m common.driver mscoco compare --out OUT       (every leave-K-out row of OUT beside the paper's)
    accelerate launch -m common.driver mscoco leave-k-out --data DATA --attribution ATTR --out OUT \
        --methods unlearning pixel random [--queries release:0-9] [--rankings LABEL=FOLDER ...] \
        --config mscoco/configs/mscoco.yaml [--preset paper]       (each retraining spread over every GPU)

Leave-K-out removes the top-K images (both flips of an image) and retrains the UNet from scratch with the ``train``
recipe of the preset (``paper`` by default) and its seed. Then, against θ0: ΔL over t = 0, 5, ..., 995 with the same
noise, and the query regenerated from its noise (the released queries replay the authors' batch-500 generator)
compared by MSE and CLIP ViT-B/32 similarity of the decoded images; ``OUT/paper.md`` puts ours beside the paper's.
θ0 is, by default, the same recipe trained on every image (``--reference retrained``), so ΔL measures the removal
alone; ``--reference released`` compares against the released UNet, as a reading of the paper allows, adding the
difference between their training run and ours to every row. One retraining is about 16 A100-hours at the paper's
recipe (PAPER.md); see mscoco/README.md.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path

from common import keyed_random
from common.benchmark import Attribution, Benchmark, Generation, Retraining
from common.errors import require
from common.fingerprints import fingerprint_tensors
from common.training.train import TrainConfig
from mscoco.model import DEFAULT_COMPONENTS
from mscoco.paper import gather_tables
from mscoco.pipeline import load_model, load_query_spec, load_run, parse_ids
from mscoco.release import export_release_queries
from mscoco.train import architecture, train_mscoco, unet_arguments


class Mscoco(Benchmark):
    name = "mscoco"
    presets = "mscoco/configs/mscoco.yaml"
    stage_presets = {"leave-k-out": "paper"}
    guidance_scale = 7.5  # the authors' queries: DDPM over the 1,000 training steps, guidance 7.5 against ""
    unavailable = {"evaluate": "leave-k-out is its measure (compare puts its rows beside the paper's)"}

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

    def add_retraining_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--reference", default="retrained", choices=["retrained", "released"], help="θ0 of ΔL and regeneration"
        )
        parser.add_argument(
            "--unet-config", default=None, help="JSON of UNet arguments for retraining (default: the ranked UNet's)"
        )

    def retraining(self, args: argparse.Namespace, device, accelerator, recipe: TrainConfig) -> Retraining:
        (attribution,) = self.attributions(args, device, None, None)
        unet = attribution.model.unet
        unet_config = architecture(args.unet_config) if args.unet_config else unet_arguments(unet)
        train = asdict(recipe)
        train.pop("checkpoint_every")  # how often a training saves changes no model
        identity = {"train": train, "unet": unet_config, "data": attribution.data.fingerprint}
        identity["noise"] = keyed_random.NOISE
        released = args.reference == "released"
        metrics = {"reference": attribution.model.fingerprint() if released else "retrained"}
        metrics["decoder"] = fingerprint_tensors(*attribution.model.vae.state_dict().values())  # MSE, CLIP see pixels

        def retrain(excluded: list[int], folder: Path, seed_offset: int = 0):
            train = replace(recipe, seed=recipe.seed + seed_offset)
            model = train_mscoco(args.data, folder, train, excluded, unet_config, args.components, accelerator)
            return model.prepare_for_gradients(accelerator.device)

        return Retraining(attribution, identity, retrain, reference_retrained=not released, identity=metrics)

    def leave_k_out_tables(self, out: Path, table: str) -> str:
        return gather_tables(out)  # every row measured in OUT so far, and ours beside the paper's

    def compare(self, args: argparse.Namespace) -> str:
        return gather_tables(args.out)

    def add_generation_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--data", required=True, help="the release folder (for model.bin)")
        parser.add_argument(
            "--unet", default=None, help="UNet weights, diffusers folder or hub id (default DATA/model.bin)"
        )
        parser.add_argument("--components", default=DEFAULT_COMPONENTS, help="hub id or folder with SD2's components")
        parser.add_argument("--release", help="write released queries as folders instead of --prompts: all, or 0-9,15")

    def generation(self, args: argparse.Namespace, device, prompts: list[str] | None) -> Generation | None:
        require(
            (prompts is None) != (args.release is None), "give --prompts (new queries) or --release (released ones)"
        )
        if args.release:  # the image, the latent, the text embedding and the row of the batch it is regenerated from
            ids = None if args.release == "all" else parse_ids(args.release)
            folders = export_release_queries(args.data, args.out, ids, args.overwrite)
            print(f"wrote {len(folders)} released queries to {args.out}")
            return None
        model = load_model(args.data, args.unet, args.components, device)
        return Generation(model, [(p, {}) for p in prompts], prefix="coco")
