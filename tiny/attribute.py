"""Attribute tiny-model queries with any registered method (default: unlearning).

    python -m tiny.attribute --model M --data D --queries Q --out OUT [--method NAME]

Prepares the method once (Fisher and pretrained losses, features, projected gradients; cached in
``OUT/cache/<method>/``) and writes ``OUT/<method>/<query id>/{ranking.json, scores.npy,
config.json, top10.png}`` per query. Finished queries with the same settings are skipped.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common.config import add_attribution_arguments, load_preset, method_from_args
from common.errors import cli
from common.methods.base import run_method
from common.queries import load_queries
from tiny.pipeline import load_model, load_run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="folder of a trained tiny model")
    parser.add_argument("--data", required=True, help="the training image folder")
    parser.add_argument("--queries", required=True, help="queries folder")
    parser.add_argument("--query-ids", nargs="*", default=None, help="only these queries")
    add_attribution_arguments(parser)
    return parser


@cli
def main(argv: list[str] | None = None) -> None:
    args = load_preset(build_parser(), argv=argv)
    cls, cfg = method_from_args(args)
    run = load_run(args.model, args.data, args.device)
    queries = load_queries(args.queries, args.query_ids)
    out = Path(args.out)
    method = cls(cfg, run.model, run.data, out / "cache" / cls.name, lambda p: load_model(p, args.device))
    if args.prepare_only:
        method.prepare()
        print(f"prepared in {out / 'cache' / cls.name}")
        return
    run_method(method, queries, out / cls.name, args.top_k, args.overwrite)
    print(f"rankings in {out / cls.name}")


if __name__ == "__main__":
    main()
