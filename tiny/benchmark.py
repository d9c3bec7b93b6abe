"""The tiny benchmark for the driver (:mod:`common.driver`): a tiny model, the image folder it was trained on, and
query folders (its generate stage).

    python -m common.driver tiny generate --model M --out Q [--num 8 | --prompts prompts.txt]
    python -m common.driver tiny attribute --model M --data D --queries Q --out OUT [--method NAME]
    python -m common.driver tiny leave-k-out --model M --data D --queries Q --out OUT \
        --eval.ks 10 20 80 --methods unlearning pixel random
    python -m common.driver tiny evaluate --model M --data D --out EVAL [--method NAME]   (tiny/evaluate.py)
    python -m common.driver tiny compare --out EVAL

Leave-K-out retrains with the model's own recipe (its ``model.json``) and seed; only the exclusion mode
(``--train.exclusion_mode``) may differ. θ0 is the model itself, trained by that recipe on every image.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

from common import keyed_random
from common.benchmark import Attribution, Benchmark, Generation, Retraining
from common.errors import require
from common.queries import load_queries
from common.training.train import TrainConfig
from tiny import evaluate
from tiny.model import TinyTextToImage
from tiny.pipeline import check_trained_on, load_model, load_run, set_threads, shape_prompts
from tiny.train import recipe_of, train_tiny


class Tiny(Benchmark):
    name = "tiny"
    presets = "tiny/configs/tiny.yaml"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--model", required=True, help="folder of a trained tiny model")
        parser.add_argument("--data", required=True, help="the training image folder")
        parser.add_argument("--queries", required=True, help="queries folder")
        parser.add_argument("--query-ids", nargs="*", default=None, help="only these queries")
        parser.add_argument(
            "--other-data", action="store_true", help="rank --data although the model records another training set"
        )

    def attributions(self, args: argparse.Namespace, device, method: type, cfg) -> Iterator[Attribution]:
        run = load_run(args.model, args.data, device)
        if not args.other_data:
            check_trained_on(args.model, run.data, args.data)
        queries = load_queries(args.queries, args.query_ids)
        yield Attribution(run.model, run.data, queries, partial(load_model, device=device))

    def retraining(self, args: argparse.Namespace, device, accelerator, recipe: TrainConfig) -> Retraining:
        require(accelerator.num_processes == 1, "tiny models retrain on one process: run without accelerate launch")
        run = load_run(args.model, args.data, device)
        model_cfg, original, info = recipe_of(args.model)
        original.exclusion_mode = recipe.exclusion_mode  # the one setting that may differ from the model's recipe
        require(not info["recipe"]["exclude"], f"{args.model} was itself trained with exclusions")
        fingerprint = run.data.fingerprint
        require(info["recipe"]["data"] == fingerprint, f"{args.model} was trained on another dataset than {args.data}")
        queries = load_queries(args.queries, args.query_ids)
        recipe_identity = {"train": asdict(original), "model": asdict(model_cfg), "data": fingerprint}
        recipe_identity["noise"] = keyed_random.NOISE

        def retrain(excluded: list[int], folder: Path, seed_offset: int = 0):
            train = replace(original, seed=original.seed + seed_offset)
            model = train_tiny(args.data, str(folder), model_cfg, train, excluded, str(device))
            return model.prepare_for_gradients()

        attribution = Attribution(run.model, run.data, queries, partial(load_model, device=device))
        return Retraining(attribution, recipe_identity, retrain)

    def add_generation_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--model", required=True, help="folder of a trained tiny model")
        parser.add_argument("--num", type=int, default=8, help="queries drawn from the shapes grammar (no --prompts)")

    def generation(self, args: argparse.Namespace, device, prompts: list[str] | None) -> Generation:
        require(prompts is not None or args.num >= 1, f"--num makes at least 1 query, got {args.num}")
        set_threads()
        model = TinyTextToImage.load(args.model).to(device)  # sampling needs no gradients: the default attention
        drawn = shape_prompts(args.num, args.seed) if prompts is None else [(p, {}) for p in prompts]
        return Generation(model, drawn)

    def add_evaluation_arguments(self, parser: argparse.ArgumentParser) -> None:
        evaluate.add_evaluation_arguments(parser)

    def evaluate(self, args: argparse.Namespace, device, method: type, cfg) -> str:
        return evaluate.evaluate(args, device, method, cfg)

    def add_compare_arguments(self, parser: argparse.ArgumentParser) -> None:
        evaluate.add_compare_arguments(parser)

    def compare(self, args: argparse.Namespace) -> str:
        return evaluate.compare(args)
