"""One table of every evaluated method on the tiny benchmark, from the reports of ``tiny.evaluate``.

    python -m tiny.compare --out OUT [--tags unlearning pixel trak ...]

Reads ``OUT/<tag>/report.json`` (one ``tiny.evaluate`` run each) and writes ``OUT/comparison.md``:
self-attribution, shape+colour and colour agreement of the top-10 against the base rate, and cost.
A tag without a report gets a row with the reason (e.g. a feature method whose weights are missing).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common.errors import cli, require


def row(tag: str, report: dict) -> str:
    s, sem, st = report["self_attribution"], report["semantic"], report["stats"]
    sc, col = sem.get("shape+colour", {}), sem.get("colour", {})

    def share(v: dict) -> str:
        return f"{v['top10_share']:.0%} ({v['lift']:.1f}×)" if v else "–"

    return (
        f"| {tag} | {s['top1']:.0%} | {s['top10']:.0%} | {s['median_rank']:g} | {share(sc)} | {share(col)} "
        f"| {report['seconds_prepare']:.0f} | {st['seconds_per_query']:.1f} |"
    )


def table(out: Path, tags: list[str], notes: dict[str, str]) -> str:
    """The Markdown comparison of the reports under ``out``."""
    first = None
    lines = [
        "| method | self top-1 | self top-10 | median self rank | shape+colour in top-10 (lift) "
        "| colour in top-10 (lift) | prepare s | s per query |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for tag in tags:
        path = out / tag / "report.json"
        if not path.exists():
            lines.append(f"| {tag} | {notes.get(tag, 'not run')} |||||||")
            continue
        report = json.loads(path.read_text())
        first = first or report
        lines.append(row(tag, report))
    if first is not None:
        sem = first["semantic"]
        base = ", ".join(f"{k} {v['base_rate']:.1%}" for k, v in sem.items() if k in ("shape+colour", "colour"))
        lines += ["", f"N = {first['num_train']}" + (f"; base rates: {base}." if base else ".")]
    return "\n".join(lines)


@cli
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="the tiny.evaluate output folder")
    parser.add_argument("--tags", nargs="*", default=None, help="variant folders, in table order (default: all)")
    parser.add_argument("--note", nargs="*", default=[], help="TAG=reason for rows without a report")
    args = parser.parse_args()
    out = Path(args.out)
    tags = args.tags or sorted(p.parent.name for p in out.glob("*/report.json"))
    require(bool(tags), f"no tiny.evaluate reports under {out}")
    notes = dict(n.split("=", 1) for n in args.note if "=" in n)
    text = table(out, tags, notes)
    (out / "comparison.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
