"""One driver for every benchmark: ``python -m common.driver BENCHMARK STAGE [flags]``.

    python -m common.driver tiny attribute --model M --data D --queries Q --out OUT [--method NAME]
    accelerate launch -m common.driver mscoco attribute --data DATA --out OUT ...   (passes split over every process)
    python -m common.driver tiny attribute --help                                   (a benchmark's flags)

Benchmarks are found by name (:mod:`common.benchmark`: tiny, mscoco, custom_diffusion, and any installed package that
registers one). Stages:

``attribute``: rank the training set for each query with a registered method (``--method``, default unlearning). The
method is prepared once per model (curvature, pretrained losses, features or projected gradients, cached in
``OUT/cache/<method>/``, resumable) and writes ``OUT/<method>/<query id>/{config.json, scores.npy, ranking.json,
top10.png}``; finished queries with the same settings are skipped. ``--prepare-only`` stops after preparing.

``leave-k-out``: remove each method's top-K (``--methods``, and ``--rankings LABEL=FOLDER`` made elsewhere, each a
row), retrain from scratch with the benchmark's recipe and seed (``OUT/models/<recipe>/<excluded set>``, shared by
every method and query that removes the same set; interrupted trainings resume), and measure ΔL, the regeneration's
MSE and CLIP similarity and the off-target control against θ0. Rankings come from ``--attribution`` (the attribute
stage's output; missing ones are made with the preset's settings). Writes ``OUT/metrics/...``, ``OUT/table.md``,
``table.csv``, ``delta_loss.png`` and the random baseline's spread over seeds (``OUT/noise_floor.json``). Under
``accelerate launch`` every process joins every retraining and each measures its share.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from common.benchmark import Benchmark, Retraining, get_benchmark, registered
from common.config import (
    add_attribution_arguments,
    add_dataclass_arguments,
    add_method_arguments,
    dataclass_from_args,
    load_preset,
    method_from_args,
    resolve_device,
)
from common.errors import cli, require
from common.evaluation.counterfactual import (
    ClipSimilarity,
    EvalConfig,
    OffTarget,
    counterfactual_metrics,
    reference_image,
)
from common.evaluation.leave_k_out import leave_k_out, ranking_sources
from common.evaluation.tables import seed_spread
from common.files import read_json, write_json
from common.fingerprints import settings_digest
from common.methods import methods
from common.methods.base import run_method
from common.outputs import config_matches, prepare_run_dir
from common.processes import barrier, is_main, rank_world
from common.training.train import TrainConfig


def attribute(benchmark: Benchmark, argv: list[str]) -> None:
    """The ``attribute`` stage (see the module docstring)."""
    from accelerate import Accelerator

    parser = argparse.ArgumentParser(
        prog=f"python -m common.driver {benchmark.name} attribute", description="Attribute queries with a method."
    )
    benchmark.add_arguments(parser)
    parser.add_argument("--no-plot", action="store_true", help="skip top10.png")
    add_attribution_arguments(parser, f"YAML file of presets ({benchmark.presets})")
    args = load_preset(parser, argv=argv)
    cls, cfg = method_from_args(args)
    accelerator = Accelerator(cpu=args.device == "cpu")
    # One process honours --device as given (e.g. cuda:1); under accelerate launch each process takes its own.
    device = accelerator.device if accelerator.num_processes > 1 else resolve_device(args.device)
    out = Path(args.out)
    for attribution in benchmark.attributions(args, device, cls, cfg):
        cache = out / "cache" / cls.name / attribution.cache
        method = cls(cfg, attribution.model, attribution.data, cache, attribution.load_model, accelerator=accelerator)
        if args.prepare_only:  # e.g. the curvature and pretrained losses, on every GPU, before any query
            method.prepare()
            if is_main(accelerator):
                print(f"prepared in {cache}")
        else:
            folders = run_method(method, attribution.queries, out / cls.name, args.top_k, args.overwrite,
                                 plot=not args.no_plot)  # fmt: skip
            benchmark.attributed(attribution, folders)
        del method, attribution  # one model at a time on the device
    if not args.prepare_only:
        benchmark.finish(out / cls.name, is_main(accelerator))
        if is_main(accelerator):
            print(f"rankings in {out / cls.name}")


def leave_k_out_parser(benchmark: Benchmark) -> argparse.ArgumentParser:
    """The flags of the ``leave-k-out`` stage: the benchmark's, then the evaluation's, the recipe's and the methods'."""
    parser = argparse.ArgumentParser(
        prog=f"python -m common.driver {benchmark.name} leave-k-out",
        description="Leave-K-out: remove, retrain, measure.",
    )
    benchmark.add_arguments(parser)
    benchmark.add_retraining_arguments(parser)
    parser.add_argument("--attribution", default=None, help="the attribute stage's output (default OUT/attribution)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--methods", nargs="*", default=["unlearning", "pixel", "random"], choices=sorted(methods()))
    parser.add_argument("--rankings", nargs="*", default=[], metavar="LABEL=FOLDER", help="rankings made elsewhere")
    parser.add_argument("--config", default=None, help=f"YAML file of presets ({benchmark.presets})")
    preset = benchmark.stage_presets.get("leave-k-out", "default")
    parser.add_argument("--preset", default=preset, help=f"preset name in --config (default {preset})")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda (accelerate launch decides per process)")
    parser.add_argument("--overwrite", action="store_true", help="replace an output folder made under another recipe")
    add_dataclass_arguments(parser, EvalConfig, "eval")
    add_dataclass_arguments(parser, TrainConfig, "train")
    add_method_arguments(parser)
    return parser


def check_leave_k_out(retraining: Retraining, cfg: EvalConfig) -> OffTarget:
    """Every K and query checked before any ranking or retraining; the off-target control (refused now if it cannot
    be measured)."""
    data, queries = retraining.attribution.data, retraining.attribution.queries
    for k in cfg.ks:
        require(k <= len(data), f"K = {k} exceeds the training-set size {len(data)}")
    off_target = OffTarget(queries, cfg.off_target, cfg.loss_stride, cfg.seed)
    for query in queries:  # regeneration needs each query's initial noise
        require(
            query.noise is not None or query.stream is not None,
            f"query {query.id} has no saved noise, so it cannot be regenerated",
        )
    return off_target


def write_noise_floor(out: Path, exclusion_mode: str) -> None:
    """``OUT/noise_floor.json``: the random baseline's ΔL spread over its seeds, per K (printed too)."""
    records = [read_json(p, "metric file") for p in sorted((out / "metrics" / "random").rglob("*.json"))]
    spread = seed_spread(records) if records else []
    write_json(out / "noise_floor.json", {"exclusion_mode": exclusion_mode, "random_delta_loss": spread})
    for row in spread:
        print(
            f"noise floor ({exclusion_mode}): K={row['k']} ΔL sd over {row['n_seeds']} random sets "
            f"{row['sd']:.2e} (mean {row['mean']:.2e}, {row['n_queries']} queries)"
        )


def leave_k_out_stage(benchmark: Benchmark, argv: list[str]) -> None:
    """The ``leave-k-out`` stage (see the module docstring)."""
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    args = load_preset(leave_k_out_parser(benchmark), argv=argv)
    cfg, recipe = dataclass_from_args(EvalConfig, args, "eval"), dataclass_from_args(TrainConfig, args, "train")
    require(bool(args.methods or args.rankings), "nothing to evaluate: give --methods or --rankings")
    # Process i measures every world-th model while the others start the next retraining: a long wait in a
    # collective is normal here (the default NCCL timeout is 10 minutes).
    wait = InitProcessGroupKwargs(timeout=timedelta(hours=12))
    accelerator = Accelerator(cpu=args.device == "cpu", kwargs_handlers=[wait])
    device = accelerator.device if accelerator.num_processes > 1 else resolve_device(args.device)
    retraining = benchmark.retraining(args, device, accelerator, recipe)
    attribution = retraining.attribution
    model, data, queries = attribution.model, attribution.data, attribution.queries
    off_target = check_leave_k_out(retraining, cfg)
    clip = ClipSimilarity(cfg.clip_model, cfg.clip_weights)
    if not clip.available and is_main(accelerator):
        print(f"CLIP similarity off: {clip.reason}")
    identity = {"recipe": retraining.recipe, "loss_stride": cfg.loss_stride, "seed": cfg.seed}
    identity |= {"clip": [cfg.clip_model, cfg.clip_weights]} | retraining.identity
    out = Path(args.out)
    models = out / "models" / settings_digest(retraining.recipe)
    if is_main(accelerator):  # before rankings or models are written into it; only another config is wiped
        prepare_run_dir(out, identity, args.overwrite and not config_matches(out, identity))
    barrier(accelerator)
    root = Path(args.attribution or out / "attribution")
    context = {"load_model": attribution.load_model, "accelerator": accelerator}
    sources = ranking_sources(args, model, data, queries, root, max(cfg.ks), cfg.random_seeds, **context)
    retrain = lambda excluded, folder: retraining.retrain(excluded, models / folder.name)
    reference, targets = model, None
    if retraining.reference_retrained:  # our full run: the regenerations are compared with its own
        reference, targets = retrain([], models / "full"), models / "full" / "regenerated"

    def metrics(original, retrained, query):
        target = reference_image(reference, query, targets) if targets is not None else None
        return counterfactual_metrics(reference, retrained, query, cfg, clip, target, off_target)

    rank, world = rank_world(accelerator)
    table = leave_k_out(
        model, len(data), data.fingerprint, queries, sources, cfg.ks, retrain, metrics, out, identity,
        rank=rank, world=world, barrier=accelerator.wait_for_everyone, expect=off_target.expect,
    )  # fmt: skip
    if is_main(accelerator):  # every row measured in OUT so far, not only this call's
        print(benchmark.leave_k_out_tables(out, table))
        write_noise_floor(out, recipe.exclusion_mode)


def command(benchmark: str, stage: str) -> Callable[[list[str]], None]:
    """``main(argv)`` of one benchmark's stage: ``command("tiny", "attribute")(argv)`` runs as
    ``python -m common.driver tiny attribute ARGV`` does (in this process)."""
    return lambda argv: main([benchmark, stage, *argv])


STAGES: dict[str, Callable[[Benchmark, list[str]], None]] = {"attribute": attribute, "leave-k-out": leave_k_out_stage}


@cli
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2 or argv[0] in ("-h", "--help"):
        names = ", ".join(sorted(registered()))
        print(f"usage: python -m common.driver BENCHMARK STAGE [flags]\n  benchmarks: {names}\n"
              f"  stages: {', '.join(STAGES)}\n\n{__doc__}")  # fmt: skip
        sys.exit(0 if argv[:1] in (["-h"], ["--help"]) else 2)
    name, stage, *rest = argv
    benchmark = get_benchmark(name)
    require(stage in STAGES, f"unknown stage {stage!r}: choose from {', '.join(STAGES)}")
    STAGES[stage](benchmark, rest)


if __name__ == "__main__":
    main()
