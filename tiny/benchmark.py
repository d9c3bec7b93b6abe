"""The tiny benchmark for the driver (:mod:`common.driver`): a tiny model, the image folder it was trained on, and
query folders (``tiny.generate``).

    python -m common.driver tiny attribute --model M --data D --queries Q --out OUT [--method NAME]
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from functools import partial

from common.benchmark import Attribution, Benchmark
from common.queries import load_queries
from tiny.pipeline import load_model, load_run


class Tiny(Benchmark):
    name = "tiny"
    presets = "tiny/configs/tiny.yaml"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--model", required=True, help="folder of a trained tiny model")
        parser.add_argument("--data", required=True, help="the training image folder")
        parser.add_argument("--queries", required=True, help="queries folder")
        parser.add_argument("--query-ids", nargs="*", default=None, help="only these queries")

    def attributions(self, args: argparse.Namespace, device, method: type, cfg) -> Iterator[Attribution]:
        run = load_run(args.model, args.data, device)
        queries = load_queries(args.queries, args.query_ids)
        yield Attribution(run.model, run.data, queries, partial(load_model, device=device))
