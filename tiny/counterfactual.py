"""Leave-K-out evaluation on the tiny benchmark: remove each method's top-K, retrain, measure.

    python -m tiny.counterfactual --model M --data D --queries Q --out OUT \
        --eval.ks 10 20 80 --methods unlearning pixel random

Rankings of every method come from ``--attribution`` (the layout of the attribute stage, ``python -m common.driver tiny attribute``:
``<attribution>/<method>/<query id>/``; missing ones are made here with the preset's settings);
the random baseline uses ``eval.random_seeds`` query-independent rankings; ``--rankings LABEL=FOLDER``
adds rankings made elsewhere (e.g. an unlearning variant by the attribute stage) as row LABEL. The library's driver
(:mod:`common.evaluation.leave_k_out`) retrains from scratch without each top-K with the original
recipe and seed (cached by the excluded set; interrupted trainings resume), measures ΔL and the
regeneration, and writes ``OUT/metrics/...``, ``OUT/table.md``, ``table.csv``, ``delta_loss.png``
and the random baseline's spread over seeds (``OUT/noise_floor.json``).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from functools import partial
from pathlib import Path

from common import keyed_random
from common.config import add_dataclass_arguments, add_method_arguments, dataclass_from_args, load_preset
from common.errors import cli, require
from common.evaluation.counterfactual import ClipSimilarity, EvalConfig, OffTarget, counterfactual_metrics
from common.evaluation.leave_k_out import leave_k_out, ranking_sources
from common.evaluation.tables import seed_spread
from common.files import write_json
from common.fingerprints import settings_digest
from common.methods import methods
from common.outputs import prepare_run_dir
from common.queries import load_queries
from common.training.train import TrainConfig
from tiny.pipeline import load_model, load_run
from tiny.train import recipe_of, train_tiny


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="the original tiny model (its model.json holds the recipe)")
    parser.add_argument("--data", required=True, help="the training image folder")
    parser.add_argument("--queries", required=True, help="queries folder (with saved noise)")
    parser.add_argument("--attribution", default=None, help="rankings folder (default: OUT/attribution)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--methods", nargs="+", default=["unlearning", "pixel", "random"], choices=sorted(methods()))
    parser.add_argument(
        "--rankings",
        nargs="*",
        default=[],
        metavar="LABEL=FOLDER",
        help="rankings made elsewhere (FOLDER/<query id>/ranking.json), each a row LABEL",
    )
    parser.add_argument("--config", default=None, help="YAML file of presets")
    parser.add_argument("--preset", default="default", help="preset name in --config")
    parser.add_argument("--device", default="cpu", help="device for retraining")
    parser.add_argument("--overwrite", action="store_true", help="replace an output folder made under another recipe")
    add_dataclass_arguments(parser, EvalConfig, "eval")
    add_dataclass_arguments(parser, TrainConfig, "train")
    add_method_arguments(parser)
    args = load_preset(parser, argv=argv)
    cfg = dataclass_from_args(EvalConfig, args, "eval")
    run = load_run(args.model, args.data, "cpu")
    model_cfg, recipe, info = recipe_of(args.model)
    # Only the exclusion mode may differ from the original recipe: everything else stays identical.
    recipe.exclusion_mode = dataclass_from_args(TrainConfig, args, "train").exclusion_mode
    require(not info["recipe"]["exclude"], f"{args.model} was itself trained with exclusions")
    require(
        info["recipe"]["data"] == run.data.fingerprint, f"{args.model} was trained on another dataset than {args.data}"
    )
    for k in cfg.ks:  # before any ranking or retraining
        require(k <= len(run.data), f"K = {k} exceeds the training-set size {len(run.data)}")
    queries = load_queries(args.queries)
    for query in queries:  # regeneration needs each query's initial noise: fail now, not after retraining
        require(query.noise is not None, f"query {query.id} has no saved noise ({Path(args.queries) / query.id})")
    off_target = OffTarget(queries, cfg.off_target, cfg.loss_stride, cfg.seed)
    clip = ClipSimilarity(cfg.clip_model, cfg.clip_weights)
    if not clip.available:
        print(f"CLIP similarity off: {clip.reason}")
    recipe_info = {"train": asdict(recipe), "model": asdict(model_cfg), "data": run.data.fingerprint}
    recipe_info["noise"] = keyed_random.NOISE
    recipe_id = settings_digest(recipe_info)
    # One folder, one recipe and ΔL/regeneration setting: metrics of another mode are never reused.
    identity = {"recipe": recipe_info, "loss_stride": cfg.loss_stride, "seed": cfg.seed}
    identity |= {"clip": [cfg.clip_model, cfg.clip_weights]}
    out = Path(args.out)
    prepare_run_dir(out, identity, args.overwrite)  # before the rankings are written into it
    root = Path(args.attribution or out / "attribution")
    load = partial(load_model, device="cpu")
    sources = ranking_sources(args, run.model, run.data, queries, root, max(cfg.ks), cfg.random_seeds, load_model=load)

    def retrain(excluded: list[int], folder: Path):
        model_dir = folder.parent / recipe_id / folder.name
        return train_tiny(args.data, str(model_dir), model_cfg, recipe, excluded, args.device).prepare_for_gradients()

    def metrics(original, retrained, query):
        return counterfactual_metrics(original, retrained, query, cfg, clip, off_target=off_target)

    table = leave_k_out(
        run.model, len(run.data), run.data.fingerprint, queries, sources, cfg.ks, retrain, metrics, out, identity,
        expect=off_target.expect,
    )  # fmt: skip
    print(table)
    records = [json.loads(p.read_text()) for p in sorted((out / "metrics" / "random").rglob("*.json"))]
    spread = seed_spread(records) if records else []
    write_json(out / "noise_floor.json", {"exclusion_mode": recipe.exclusion_mode, "random_delta_loss": spread})
    for row in spread:
        print(
            f"noise floor ({recipe.exclusion_mode}): K={row['k']} ΔL sd over {row['n_seeds']} random sets "
            f"{row['sd']:.2e} (mean {row['mean']:.2e}, {row['n_queries']} queries)"
        )


if __name__ == "__main__":
    main()
