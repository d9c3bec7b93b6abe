"""Pick the best step size of a sweep of tiny evaluate stage runs (one folder per step size).

    python -m tiny.sweep --out SWEEP --tags kv-a5e-05 kv-a0.0002 kv-a0.0008 [--name kv]

Reads ``SWEEP/<tag>/report.json``, ranks the runs by self-attribution (lowest median rank, then the
highest top-10 and top-1 rates; a full tie goes to the first tag given, the smallest step size in the
scripts' grids), prints the best run's step size on stdout (for scripts) and appends
the sweep's table to ``SWEEP/sweep.md``. A best step size at either end of the grid is flagged: the
optimum may lie outside it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common.errors import cli, require


def best(reports: dict[str, dict]) -> str:
    """The tag whose self-attribution is best: lowest median rank, then top-10, then top-1."""

    def key(tag: str) -> tuple:
        s = reports[tag]["self_attribution"]
        return (s["median_rank"], -s["top10"], -s["top1"])

    return min(reports, key=key)


def step_size(report: dict) -> float:
    return float(report["settings"]["unlearn"]["step_size"])


def sweep_table(name: str, reports: dict[str, dict], chosen: str) -> str:
    tags = sorted(reports, key=lambda t: step_size(reports[t]))
    lines = [
        f"### {name}",
        "",
        "| step size | self top-1 | self top-10 | median self rank | ranks | update ‖Δθ‖/‖θ‖ |",
        "|---|---|---|---|---|---|",
    ]
    for tag in tags:
        r = reports[tag]
        s = r["self_attribution"]
        mark = " **(chosen)**" if tag == chosen else ""
        lines.append(
            f"| {step_size(r):g}{mark} | {s['top1']:.0%} | {s['top10']:.0%} | {s['median_rank']:g} "
            f"| {sorted(s['ranks'])} | {r['stats'].get('relative_update_mean', float('nan')):.2%} |"
        )
    if chosen in (tags[0], tags[-1]) and len(tags) > 1:
        lines += ["", "The best step size is at the end of the grid: the optimum may lie outside it."]
    return "\n".join(lines)


@cli
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="the sweep's tiny evaluate output folder")
    parser.add_argument("--tags", nargs="+", required=True, help="one folder per step size")
    parser.add_argument("--name", default="", help="the variant's name in sweep.md")
    args = parser.parse_args()
    out = Path(args.out)
    missing = [t for t in args.tags if not (out / t / "report.json").exists()]
    require(not missing, f"no report for {', '.join(missing)} under {out}: run the tiny evaluate stage first")
    reports = {t: json.loads((out / t / "report.json").read_text()) for t in args.tags}
    require(all("unlearn" in r["settings"] for r in reports.values()), "the sweep's runs must be unlearning runs")
    chosen = best(reports)
    text = sweep_table(args.name or chosen, reports, chosen)
    with open(out / "sweep.md", "a") as f:
        f.write(text + "\n\n")
    print(text, file=sys.stderr)
    print(f"{step_size(reports[chosen]):g}")


if __name__ == "__main__":
    main()
