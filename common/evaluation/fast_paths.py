"""How close fast attributions come to exact ones, at what cost: one row per setting, the run-to-run floor beside.

    python -m common.evaluation.fast_paths --exact OUT/exact --floor OUT/exact-seed1 OUT/exact-seed2 \\
        --runs "pixel 10%=OUT/pixel-10" "5 timesteps=OUT/t5" --out OUT/fast_paths.md

Every folder is a method output folder of the same queries (``QUERY/scores.npy`` and ``ranking.json``, as
``attribute`` writes them). Each run is compared query by query with the exact run
(:func:`common.evaluation.agreement.against_exact`: the exact top-10 and top 1% recovered, Spearman over the exact
top 1%) and costed from its own stats (UNet passes and seconds per query). The floor rows are exact runs that
differ only in their seeds: a fast path cannot be asked to agree with exact better than exact agrees with itself.
Writes the Markdown table to ``--out`` and the per-query values beside it (``.json``).
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

import numpy as np

from common.errors import cli, require
from common.evaluation.agreement import against_exact, compare_runs, summarize
from common.files import atomic, write_json


def run_cost(folder: Path, queries: list[str]) -> dict[str, float]:
    """Mean UNet passes and median seconds per query of a method folder over ``queries`` (NaN where a stat is
    missing; the median, so that a query slowed by other work on the machine does not move the row)."""
    stats = [json.loads((folder / q / "ranking.json").read_text()).get("stats", {}) for q in queries]

    def known(values: list) -> bool:
        return bool(values) and all(v is not None for v in values)

    forwards = [s.get("forwards") or {} for s in stats]
    score, unlearn = [f.get("score") for f in forwards], [f.get("unlearn") for f in forwards]
    seconds = [s.get("seconds_query") for s in stats]
    return {
        "score_forwards": float(np.mean(score)) if known(score) else float("nan"),
        "unlearn_passes": float(np.mean(unlearn)) if known(unlearn) else float("nan"),
        "seconds": float(np.median(seconds)) if known(seconds) else float("nan"),
    }


def fast_path_table(
    exact: Path, runs: dict[str, Path], floors: list[Path] | None = None, fraction: float = 0.01
) -> dict:
    """Agreement with ``exact`` and cost of each run and floor run, over the queries every folder shares.

    Returns:
        ``rows``: name -> {kind (exact, floor or fast), cost (:func:`run_cost`), summary (mean ± SE over queries of
        :func:`against_exact`'s measures), queries (per-query values)}; ``queries``: the names compared;
        ``fraction``.
    """
    require(0 < fraction <= 1, f"fraction must lie in (0, 1], got {fraction}")
    floors = floors or []
    named = {f"exact, other seeds {i}": f for i, f in enumerate(floors, 1)} | runs
    for name, folder in named.items():
        require(Path(folder).is_dir(), f"{name}: {folder} is not a method output folder")
    measure = partial(against_exact, fraction=fraction)
    compared = {name: compare_runs(exact, folder, measure=measure)["queries"] for name, folder in named.items()}
    shared = sorted(set.intersection(*(set(v) for v in compared.values()))) if compared else []
    require(bool(shared) or not compared, f"the runs share no query with {exact} and with each other")
    if not compared:
        shared = sorted(p.parent.name for p in Path(exact).glob("*/scores.npy"))
        require(bool(shared), f"{exact} has no query folder with scores.npy")
    rows = {"exact": {"kind": "exact", "cost": run_cost(Path(exact), shared)}}
    for name, folder in named.items():
        per_query = {q: compared[name][q] for q in shared}
        rows[name] = {
            "kind": "floor" if name not in runs else "fast",
            "folder": str(folder),
            "cost": run_cost(Path(folder), shared),
            "summary": summarize(per_query),
            "queries": per_query,
        }
    return {"rows": rows, "queries": shared, "fraction": fraction, "exact": str(exact)}


def _count(v: float) -> str:
    return "–" if not np.isfinite(v) else f"{v:,.0f}"


def _cell(summary: dict, key: str, pct: bool) -> str:
    if key not in summary:
        return "–"
    v = summary[key]
    return f"{v['mean']:.0%} ± {v['se']:.0%}" if pct else f"{v['mean']:.2f} ± {v['se']:.2f}"


def markdown(table: dict) -> str:
    """The table: cost and agreement with exact (mean ± SE over the queries) of each row."""
    pct = f"{table['fraction']:.0%}" if table["fraction"] >= 0.01 else f"{table['fraction']:g}"
    lines = [
        "| setting | scoring forwards / query | update passes / query | s / query (median) "
        f"| exact top-10 in fast top-10 | exact top {pct} in fast top {pct} | Spearman over exact top {pct} |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in table["rows"].items():
        c = row["cost"]
        secs = "–" if not np.isfinite(c["seconds"]) else f"{c['seconds']:.1f}"
        if row["kind"] == "exact":
            agree = ["(reference)"] * 3
        else:
            s = row["summary"]
            agree = [_cell(s, "top10", True), _cell(s, "top_fraction", True), _cell(s, "spearman_top_fraction", False)]
        label = f"*{name}*" if row["kind"] == "floor" else name
        lines.append(f"| {label} | {_count(c['score_forwards'])} | {_count(c['unlearn_passes'])} | {secs} | "
                     + " | ".join(agree) + " |")  # fmt: skip
    lines += ["", f"{len(table['queries'])} queries; the floor rows (italic) are exact runs with other seeds."]
    return "\n".join(lines)


def parse_runs(items: list[str]) -> dict[str, Path]:
    runs = {}
    for item in items:
        name, sep, folder = item.rpartition("=")
        require(bool(sep) and bool(name) and bool(folder), f"--runs takes NAME=FOLDER, got {item!r}")
        require(name not in runs, f"--runs names {name!r} twice")
        runs[name] = Path(folder)
    return runs


@cli
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--exact", required=True, help="the exact method's output folder (the reference)")
    parser.add_argument("--floor", nargs="*", default=[], help="exact runs that differ only in their seeds")
    parser.add_argument("--runs", nargs="*", default=[], metavar="NAME=FOLDER", help="the fast settings' folders")
    parser.add_argument("--fraction", type=float, default=0.01, help="the top fraction of N compared (default 1%%)")
    parser.add_argument("--out", required=True, help="the Markdown table to write (per-query values in .json beside)")
    args = parser.parse_args()
    exact = Path(args.exact)
    require(exact.is_dir(), f"{exact} is not a method output folder")
    table = fast_path_table(exact, parse_runs(args.runs), [Path(f) for f in args.floor], args.fraction)
    out = Path(args.out)
    text = markdown(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out.with_suffix(".json"), table)
    with atomic(out) as tmp:
        tmp.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
