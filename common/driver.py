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
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from common.benchmark import Benchmark, get_benchmark, registered
from common.config import add_attribution_arguments, load_preset, method_from_args, resolve_device
from common.errors import cli, require
from common.methods.base import run_method
from common.processes import is_main


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


def command(benchmark: str, stage: str) -> Callable[[list[str]], None]:
    """``main(argv)`` of one benchmark's stage: ``command("tiny", "attribute")(argv)`` runs as
    ``python -m common.driver tiny attribute ARGV`` does (in this process)."""
    return lambda argv: main([benchmark, stage, *argv])


STAGES: dict[str, Callable[[Benchmark, list[str]], None]] = {"attribute": attribute}


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
