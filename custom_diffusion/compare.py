"""Every method's AbC retrieval side by side, and the object-vs-style scatter of the paper's Figure 6.

    python -m custom_diffusion.compare OUT        (after custom_diffusion.attribute with each --method)

Reads ``OUT/<method>/retrieval.json`` for every method that has one and writes ``OUT/retrieval.md``
(Recall@10 and mAP, mean ± SE over queries, per concept kind and overall, one row per method; then each
method's AP minus each other's on the same queries) and ``OUT/object_vs_style.png`` (each method's mAP on
object concepts against its mAP on style concepts).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common.errors import cli, require
from common.evaluation.tables import mean_se, paired_against

KINDS = ("object", "style")


def gather(out: Path) -> dict[str, dict[str, dict]]:
    """method -> query id -> retrieval row, for every ``OUT/<method>/retrieval.json``."""
    found = {p.parent.name: json.loads(p.read_text()) for p in sorted(out.glob("*/retrieval.json"))}
    require(bool(found), f"no <method>/retrieval.json in {out}: run custom_diffusion.attribute first")
    return found


def group_stats(rows: dict[str, dict], field: str, values) -> dict[str, tuple[int, tuple, tuple]]:
    """name -> (queries, Recall@10 mean ± SE, AP mean ± SE) for each of ``values`` of ``field``, then "all".

    Groups without queries are left out.
    """
    groups = [(v, [r for r in rows.values() if r[field] == v]) for v in values] + [("all", list(rows.values()))]
    return {
        name: (len(members), mean_se([r["recall@10"] for r in members]), mean_se([r["ap"] for r in members]))
        for name, members in groups
        if members
    }


def summary(rows: dict[str, dict]) -> dict[str, tuple[int, tuple[float, float], tuple[float, float]]]:
    """Per concept kind (object, style) and over all queries: see :func:`group_stats`."""
    return group_stats(rows, "kind", KINDS)


def comparison_table(found: dict[str, dict[str, dict]]) -> str:
    header = "| method | " + " | ".join(f"{g}: Recall@10 | {g}: mAP" for g in (*KINDS, "all")) + " | queries |"
    lines = [header, "|---" * (2 * len(KINDS) + 4) + "|"]
    for method, rows in found.items():
        stats = summary(rows)
        cells = []
        for group in (*KINDS, "all"):
            if group in stats:
                _, (r, r_se), (a, a_se) = stats[group]
                cells += [f"{r:.3f} ± {r_se:.3f}", f"{a:.3f} ± {a_se:.3f}"]
            else:
                cells += ["–", "–"]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {len(rows)} |")
    return "\n".join(lines) + "\n"


def paired_table(found: dict[str, dict[str, dict]]) -> str:
    """Row method's AP minus column method's on the queries both ranked: mean ± SE (queries where the row's is higher).

    Pairing by query removes what the two share: how well the query shows its concept.
    """
    records = [
        {"method": method, "k": 0, "query": query, "ap": row["ap"]}
        for method, rows in found.items()
        for query, row in rows.items()
    ]
    methods = list(found)
    cells = {(r["method"], base): r for base in methods for r in paired_against(records, base, "ap")}
    lines = ["| AP minus → | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for method in methods:
        row = [cells.get((method, base)) for base in methods]
        text = [f"{c['mean']:+.3f} ± {c['se']:.3f} ({c['wins']}/{c['n']})" if c else "–" for c in row]
        lines.append(f"| {method} | " + " | ".join(text) + " |")
    return "\n".join(lines) + "\n"


def scatter(found: dict[str, dict[str, dict]], path: Path) -> bool:
    """Object mAP against style mAP, one point per method with both kinds; False when none has both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = {}
    for method, rows in found.items():
        stats = summary(rows)
        if all(k in stats for k in KINDS):
            points[method] = (stats["object"][2], stats["style"][2])
    if not points:
        return False
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for method, ((x, x_se), (y, y_se)) in points.items():
        ax.errorbar(x, y, xerr=x_se, yerr=y_se, fmt="o", capsize=2)
        ax.annotate(method, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("mAP, object concepts")
    ax.set_ylabel("mAP, style concepts")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return True


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", help="the output folder of custom_diffusion.attribute")
    args = parser.parse_args(argv)
    out = Path(args.out)
    found = gather(out)
    table = comparison_table(found) + "\n" + paired_table(found)
    (out / "retrieval.md").write_text(table)
    print(table)
    if scatter(found, out / "object_vs_style.png"):
        print(f"scatter in {out / 'object_vs_style.png'}")
    else:
        print("no scatter: no method has queries of both concept kinds yet")


if __name__ == "__main__":
    main()
