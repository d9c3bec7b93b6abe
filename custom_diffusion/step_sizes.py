"""What each cell of a twin tuning grid did to the model and to the ranking.

    python -m custom_diffusion.step_sizes OUT/tune/unlearning-ekfac-cross-attn-kv-base

A variant's tuning folder holds one folder per cell (``a<step size>-s<steps>``), each with one ranking per tune
query. Per cell, in the order of the step size (then the steps), one Markdown row of medians over queries:
- the tune mAP and the relative update (as ``OUT/tune/tune.md``);
- the query's own loss rise and the median training image's loss rise under the unlearned weights, and their
  ratio: how selectively the step raised the query's loss;
- the share of the ranked images whose loss rose (a score above 0): near 1, the step damages every image;
- the top-10 overlap and Spearman with the next larger step of the same steps: where they stay high, a larger step
  only rescales the scores; where they do not, every step size ranks differently.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

import numpy as np

from common.errors import cli, require
from common.evaluation.agreement import ranking_agreement

CELL = re.compile(r"a([0-9.eE+-]+)-s([0-9]+)")


def cells(folder: Path) -> list[tuple[float, int, Path]]:
    """The grid cells of one variant's tuning folder, by step size then steps."""
    found = []
    for path in Path(folder).iterdir():
        match = CELL.fullmatch(path.name)
        if match and (path / "retrieval.json").exists():
            found.append((float(match[1]), int(match[2]), path))
    require(bool(found), f"{folder} has no finished tuning cell (a<step size>-s<steps>/retrieval.json)")
    return sorted(found, key=lambda cell: cell[:2])


def cell_row(path: Path) -> dict[str, float]:
    """The medians over one cell's queries, and its tune mAP."""
    retrieval = json.loads((path / "retrieval.json").read_text())
    stats, rose = [], []
    for ranking in sorted(path.glob("*/*/ranking.json")):
        stats.append(json.loads(ranking.read_text())["stats"])
        rose.append(float(np.mean(np.load(ranking.parent / "scores.npy") > 0)))
    require(bool(stats), f"{path} has no ranking")

    def median(key: str) -> float:
        return statistics.median(s[key] for s in stats)

    return {
        "map": statistics.fmean(r["ap"] for r in retrieval.values()),
        "update": median("relative_update"),
        "query_rise": median("query_loss_rise"),
        "train_rise": median("median_train_loss_rise"),
        "selectivity": statistics.median(s["query_loss_rise"] / s["median_train_loss_rise"] for s in stats),
        "rose": statistics.median(rose),
    }


def agreement(a: Path, b: Path) -> dict[str, float]:
    """Mean top-10 overlap and Spearman of the queries two cells share."""
    per = []
    for scores in sorted(a.glob("*/*/scores.npy")):
        other = b / scores.relative_to(a)
        if other.exists():
            per.append(ranking_agreement(np.load(scores), np.load(other), (10,)))
    require(bool(per), f"{a} and {b} share no query")
    return {key: statistics.fmean(p[key] for p in per) for key in per[0]}


def table(folder: Path) -> str:
    grid = cells(folder)
    lines = [
        "| step size | steps | tune mAP | relative update | query loss rise | median training loss rise | ratio |"
        " ranked images whose loss rose | top-10 overlap, Spearman with the next step size |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i, (alpha, steps, path) in enumerate(grid):
        row = cell_row(path)
        following = [c for c in grid[i + 1 :] if c[1] == steps]
        agree = "–"
        if following:
            a = agreement(path, following[0][2])
            agree = f"{a['top10']:.0%}, {a['spearman']:.2f}"
        lines.append(
            f"| {alpha:g} | {steps} | {row['map']:.3f} | {row['update']:.0%} | {row['query_rise']:.3g} |"
            f" {row['train_rise']:.3g} | {row['selectivity']:.1f} | {row['rose']:.0%} | {agree} |"
        )
    return "\n".join(lines)


@cli
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", help="a variant's tuning folder, OUT/tune/unlearning-...")
    args = parser.parse_args()
    folder = Path(args.folder)
    require(folder.is_dir(), f"{folder} is not a folder")
    print(table(folder))


if __name__ == "__main__":
    main()
