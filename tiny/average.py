"""Average the scores of several tiny evaluate runs of one method (e.g. under other seeds), query by query.

    python -m tiny.average --data D --out OUT/unlearning-s01 OUT/unlearning-s0 OUT/unlearning-s1

Every query folder that all runs hold (under ``self/`` and ``generated/``) gets the mean of their
``scores.npy`` and its ranking in ``OUT/<part>/<query>``, so tiny.agreement can compare averaged runs.
The runs must rank the same queries on the same model and training set.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common.errors import cli, require
from common.outputs import average_rankings
from tiny.data import read_listing


@cli
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="tiny evaluate method folders (with self/ and generated/)")
    parser.add_argument("--data", required=True, help="the training image folder (captions of the top-k)")
    parser.add_argument("--out", required=True, help="folder of the averaged run")
    args = parser.parse_args()
    require(len(args.runs) >= 2, "give at least two runs to average")
    captions, paths = read_listing(args.data)
    runs, count = [Path(r) for r in args.runs], 0
    for part in ("self", "generated"):
        names = sorted(p.parent.name for p in (runs[0] / part).glob("*/ranking.json"))
        for name in names:
            if all((r / part / name / "ranking.json").exists() for r in runs):
                average_rankings([r / part / name for r in runs], Path(args.out) / part / name, captions, paths)
                count += 1
    require(count > 0, f"the runs {', '.join(args.runs)} share no query folder")
    print(f"averaged {count} queries of {len(runs)} runs into {args.out}")


if __name__ == "__main__":
    main()
