"""Leave-K-out on MSCOCO: remove each method's top-K, retrain with the paper's recipe, measure the query.

    python -m mscoco.counterfactual --data DATA --attribution ATTR --out OUT --methods unlearning pixel random \\
        [--queries release:0-9] [--rankings LABEL=FOLDER ...] --config mscoco/configs/mscoco.yaml --preset paper
    accelerate launch -m mscoco.counterfactual ...     (each retraining spread over every GPU)

Rankings come from ``ATTR/<method>/<query id>/`` (``python -m common.driver mscoco attribute --out ATTR``; missing ones are made
here with the preset's settings, which for unlearning means a full scoring pass per query group), and
``--rankings LABEL=FOLDER`` adds rankings made elsewhere as row LABEL (Table 2's variants). For each
(method, query, K) the top-K images (both flips) are removed and the UNet is retrained from scratch
with the ``train`` recipe and seed (``OUT/models/<recipe>/<excluded set>``, shared by every method and
query that removes the same set; interrupted trainings resume). Then, against the reference model:
ΔL over t = 0, 5, ..., 995 with the same noise, and the query regenerated from its noise (the released
queries replay the authors' batch-500 generator) compared by MSE and CLIP ViT-B/32 similarity of the
decoded images. Writes ``OUT/metrics/...``, ``OUT/table.md`` and ``OUT/paper.md`` (ours beside the paper's).

The reference θ0 is, by default, the same recipe trained on every image (``--reference retrained``), so
ΔL measures the removal alone; ``--reference released`` compares against the released UNet, as a
reading of the paper allows, adding the difference between their training run and ours to every row.
One retraining is about 16 A100-hours at the paper's recipe (PAPER.md); see mscoco/README.md.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from common import keyed_random
from common.config import add_dataclass_arguments, add_method_arguments, dataclass_from_args, load_preset
from common.diffusion.sampling import query_stream, resample
from common.errors import cli, require
from common.evaluation.counterfactual import ClipSimilarity, EvalConfig, OffTarget, counterfactual_metrics
from common.evaluation.leave_k_out import leave_k_out, ranking_sources
from common.files import atomic
from common.fingerprints import fingerprint_tensors, settings_digest
from common.methods import methods
from common.outputs import config_matches, prepare_run_dir
from common.training.train import TrainConfig
from mscoco.model import DEFAULT_COMPONENTS
from mscoco.paper import gather_tables
from mscoco.pipeline import load_query_spec, load_run
from mscoco.train import architecture, train_mscoco, unet_arguments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="the release folder (mscoco/download.sh)")
    parser.add_argument("--unet", default=None, help="the ranked UNet (default DATA/model.bin)")
    parser.add_argument("--components", default=DEFAULT_COMPONENTS, help="hub id or folder with SD2's vae/, ...")
    parser.add_argument("--queries", default="release", help="release, release:0-9,15 or a folder of query folders")
    parser.add_argument("--attribution", default=None, help="the attribute stage's output (default OUT/attribution)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--methods", nargs="*", default=["unlearning", "random"], choices=sorted(methods()), help="registered methods"
    )
    parser.add_argument("--rankings", nargs="*", default=[], metavar="LABEL=FOLDER", help="rankings made elsewhere")
    parser.add_argument(
        "--reference", default="retrained", choices=["retrained", "released"], help="θ0 of ΔL and regeneration"
    )
    parser.add_argument(
        "--unet-config", default=None, help="JSON of UNet arguments for retraining (default: the ranked UNet's)"
    )
    parser.add_argument("--config", default=None, help="YAML file of presets (mscoco/configs/mscoco.yaml)")
    parser.add_argument("--preset", default="paper", help="preset name in --config")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda (accelerate launch decides per process)")
    parser.add_argument("--overwrite", action="store_true", help="replace an output folder made under another recipe")
    add_dataclass_arguments(parser, EvalConfig, "eval")
    add_dataclass_arguments(parser, TrainConfig, "train")
    add_method_arguments(parser)
    return parser


def reference_image(reference, query, folder: Path) -> torch.Tensor:
    """The reference model's own regeneration of ``query`` (C,H,W), made once and kept in ``folder``."""
    path = folder / f"{query.id}.npy"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        with atomic(path, ".npy") as tmp:  # processes measuring the same query write the same values
            np.save(tmp, resample(reference, query).float().cpu().numpy())
    return torch.from_numpy(np.load(path))


@cli
def main(argv: list[str] | None = None) -> None:
    args = load_preset(build_parser(), argv=argv)
    cfg = dataclass_from_args(EvalConfig, args, "eval")
    recipe = dataclass_from_args(TrainConfig, args, "train")
    require(bool(args.methods or args.rankings), "nothing to evaluate: give --methods or --rankings")
    # Process i measures every world-th model while the others start the next retraining: a long wait
    # in a collective is normal here (the default NCCL timeout is 10 minutes).
    wait = InitProcessGroupKwargs(timeout=timedelta(hours=12))
    accelerator = Accelerator(cpu=args.device == "cpu", kwargs_handlers=[wait])
    run = load_run(args.data, args.unet, args.components, accelerator.device)
    for k in cfg.ks:  # before any ranking or retraining
        require(k <= len(run.data), f"K = {k} exceeds the training-set size {len(run.data)}")
    queries = load_query_spec(args.queries, args.data)
    off_target = OffTarget(queries, cfg.off_target, cfg.loss_stride, cfg.seed)  # refused now, not after retraining
    for query in queries:  # regeneration needs each query's initial noise: fail now, not after retraining
        require(
            query.noise is not None or query_stream(query) is not None,
            f"query {query.id} has no saved noise, so it cannot be regenerated",
        )
    clip = ClipSimilarity(cfg.clip_model, cfg.clip_weights)
    if not clip.available and accelerator.is_main_process:
        print(f"CLIP similarity off: {clip.reason}")
    unet_config = architecture(args.unet_config) if args.unet_config else unet_arguments(run.model.unet)
    recipe_info = {"train": asdict(recipe), "unet": unet_config, "data": run.data.fingerprint}
    recipe_info["noise"] = keyed_random.NOISE
    recipe_info["train"].pop("checkpoint_every")  # how often a training saves changes no model
    recipe_id = settings_digest(recipe_info)
    out = Path(args.out)
    reference_id = run.model.fingerprint() if args.reference == "released" else "retrained"
    identity = {"recipe": recipe_info, "loss_stride": cfg.loss_stride, "seed": cfg.seed}
    identity |= {"clip": [cfg.clip_model, cfg.clip_weights], "reference": reference_id}
    identity["decoder"] = fingerprint_tensors(*run.model.vae.state_dict().values())  # MSE and CLIP see its pixels
    models = out / "models" / recipe_id
    if accelerator.is_main_process:  # before rankings or models are written into it; only another config is wiped
        prepare_run_dir(out, identity, args.overwrite and not config_matches(out, identity))
    accelerator.wait_for_everyone()

    def retrain(excluded: list[int], folder: Path):
        model = train_mscoco(
            args.data, models / folder.name, recipe, excluded, unet_config, args.components, accelerator
        )
        return model.prepare_for_gradients(accelerator.device)

    root = Path(args.attribution or out / "attribution")
    sources = ranking_sources(
        args, run.model, run.data, queries, root, max(cfg.ks), cfg.random_seeds, accelerator=accelerator
    )
    if args.reference == "released":  # the queries are its own samples
        reference, targets = run.model, None
    else:  # our full run: regenerations are compared with its own, so only the removal differs
        reference, targets = retrain([], models / "full"), models / "full" / "regenerated"

    def metrics(original, retrained, query):
        target = reference_image(reference, query, targets) if targets is not None else None
        return counterfactual_metrics(reference, retrained, query, cfg, clip, target, off_target)

    leave_k_out(
        run.model, len(run.data), run.data.fingerprint, queries, sources, cfg.ks, retrain, metrics, out, identity,
        rank=accelerator.process_index, world=accelerator.num_processes, barrier=accelerator.wait_for_everyone,
        expect=off_target.expect,
    )  # fmt: skip
    if accelerator.is_main_process:  # every row measured in OUT so far, not only this call's
        print(gather_tables(out))


if __name__ == "__main__":
    main()
