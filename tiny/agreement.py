"""Agreement of two tiny evaluate runs on the same queries: top-10, top-100 overlap and Spearman.

    python -m tiny.agreement OUT/unlearning OUT/unlearning-seed1 [--name "unlearning, seeds 0 vs 1"]

For run-to-run stability: two runs of a method that differ only in their seeds. Compares every query
folder the two runs share (their ``self/`` and ``generated/`` queries; with ``--like RUN`` only those
that RUN has too), prints one Markdown row (mean ± SE over queries, with the range; ``--part`` keeps
one kind) and appends it with the per-query values to ``A/agreement.jsonl``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common.errors import cli, require
from common.evaluation.agreement import compare_runs, summarize


def agreement_row(name: str, result: dict) -> str:
    s = result["summary"]

    def cell(key: str, pct: bool) -> str:
        if key not in s:
            return "–"
        v = s[key]
        if pct:
            return f"{v['mean']:.0%} ± {v['se']:.0%} ({v['min']:.0%}–{v['max']:.0%})"
        return f"{v['mean']:.2f} ± {v['se']:.2f} ({v['min']:.2f}–{v['max']:.2f})"

    n = max(v["n"] for v in s.values())
    return f"| {name} | {n} | {cell('top10', True)} | {cell('top100', True)} | {cell('spearman', False)} |"


HEADER = "| runs | queries | top-10 overlap | top-100 overlap | Spearman |\n|---|---|---|---|---|"


@cli
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("a", help="a tiny evaluate method folder (with self/ and generated/)")
    parser.add_argument("b", help="the other run's method folder")
    parser.add_argument("--name", default="", help="the row's name (default: A vs B)")
    parser.add_argument(
        "--part",
        choices=["both", "self", "generated"],
        default="both",
        help="compare only the training-image (self) or the generated queries",
    )
    parser.add_argument(
        "--like",
        metavar="RUN",
        help="compare only the queries that this other method folder has (a like-for-like row beside a smaller run)",
    )
    args = parser.parse_args()
    a, b = Path(args.a), Path(args.b)
    like = Path(args.like) if args.like else None
    if like is not None:
        require(like.is_dir(), f"{like} is not a method folder")
    wanted = ("self", "generated") if args.part == "both" else (args.part,)
    parts = [p for p in wanted if (a / p).is_dir() and (b / p).is_dir()]
    require(bool(parts), f"{a} and {b} share no {' or '.join(p + '/' for p in wanted)} query folders")
    per_query = {}
    for part in parts:
        only = {f.parent.name for f in (like / part).glob("*/scores.npy")} if like else None
        if only is not None and not only:
            continue
        per_query |= {f"{part}/{q}": v for q, v in compare_runs(a / part, b / part, only=only)["queries"].items()}
    require(bool(per_query), f"{a} and {b} share no query folder with {like}")
    result = {"queries": per_query, "summary": summarize(per_query)}
    name = args.name or f"{a.name} vs {b.name}" + (f" ({args.part})" if args.part != "both" else "")
    with open(a / "agreement.jsonl", "a") as f:
        f.write(json.dumps({"name": name, "a": str(a), "b": str(b), "part": args.part} | result) + "\n")
    print(HEADER)
    print(agreement_row(name, result))


if __name__ == "__main__":
    main()
