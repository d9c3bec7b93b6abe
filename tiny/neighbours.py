"""What the top-10 of a training image share with it: shape+colour, background, size, position.

    python -m tiny.neighbours --data D RUN [RUN ...]

For each tiny evaluate stage run (``RUN/self/<train id>/ranking.json``), the share of each query's
10 best-ranked *other* training images that have the query image's attribute, averaged over the
queries, against the base rate (the share over all other images). Tells what a method's ranking
follows beyond the image itself (on the shapes set, pixel similarity follows the background, the
largest area; unlearning mostly the shape and colour). Prints one Markdown table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from common.errors import cli, require
from common.outputs import read_ranking
from tiny.data import read_attributes

ATTRIBUTES = {
    "shape+colour": ("shape", "colour"),
    "background": ("background",),
    "size": ("size",),
    "position": ("position",),
}


def neighbour_shares(run: Path, attrs: list[dict], k: int = 10) -> dict[str, float]:
    """Mean share of each attribute among the top-``k`` other images of every self query of ``run``."""
    paths = sorted((run / "self").glob("*/ranking.json"))
    require(bool(paths), f"{run / 'self'} holds no training-image queries")
    shares = {name: [] for name in ATTRIBUTES}
    for path in paths:
        ranking = read_ranking(path)
        require(ranking["num_train"] == len(attrs), f"{path} ranks {ranking['num_train']} images, not {len(attrs)}")
        query = int(ranking["query"]["id"].removeprefix("train"))
        others = [int(r["index"]) for r in ranking["top_k"] if int(r["index"]) != query][:k]
        require(len(others) == k, f"{path} lists fewer than {k + 1} images")
        for name, keys in ATTRIBUTES.items():
            same = [all(attrs[i][a] == attrs[query][a] for a in keys) for i in others]
            shares[name].append(float(np.mean(same)))
    return {name: float(np.mean(v)) for name, v in shares.items()} | {"queries": len(paths)}


def base_rates(attrs: list[dict]) -> dict[str, float]:
    """Share of other images with the same attribute, averaged over all images."""
    n = len(attrs)
    rates = {}
    for name, keys in ATTRIBUTES.items():
        labels = [tuple(a[k] for k in keys) for a in attrs]
        _, counts = np.unique(np.array([str(x) for x in labels]), return_counts=True)
        rates[name] = float(np.sum(counts * (counts - 1)) / (n * (n - 1)))
    return rates


@cli
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="the tiny.shapes training folder")
    parser.add_argument("runs", nargs="+", help="tiny evaluate method folders (with self/)")
    args = parser.parse_args()
    attrs = read_attributes(Path(args.data))
    rows = [(Path(run).name, neighbour_shares(Path(run), attrs)) for run in args.runs]
    base = base_rates(attrs)
    print("| run | queries | " + " | ".join(ATTRIBUTES) + " |")
    print("|---|---|" + "---|" * len(ATTRIBUTES))
    for name, s in rows:
        print(f"| {name} | {s['queries']} | " + " | ".join(f"{s[a]:.0%}" for a in ATTRIBUTES) + " |")
    print("| base rate | – | " + " | ".join(f"{base[a]:.1%}" for a in ATTRIBUTES) + " |")


if __name__ == "__main__":
    main()
