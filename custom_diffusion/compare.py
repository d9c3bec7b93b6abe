"""Every method's AbC retrieval side by side, and the object-vs-style scatter of the paper's Figure 6.

    python -m common.driver abc compare --out OUT        (after python -m common.driver abc attribute per --method)

Reads ``OUT/<method>/retrieval.json`` for every method that has one and writes ``OUT/retrieval.md``
(Recall@10 and mAP per concept kind and overall, one row per method; then each method's AP minus each other's on
the same queries) and ``OUT/object_vs_style.png`` (each method's mAP on object concepts against its mAP on style
concepts).

Means and standard errors are **clustered by concept**: the queries of one customized model are not independent,
so each concept's queries (all its seeds) are averaged first and the SE is over concepts; a paired difference
likewise, per concept on the queries both methods ranked ("wins" counts concepts). Within one concept the clusters
are its seeds; rows without a concept are taken as independent queries. With ``OUT/shows.json`` (the twin's
``shows`` step: which queries show their concept, by a stated rule) the same tables follow for those queries only.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from common.errors import require, require_file
from common.evaluation.retrieval import average_precision, recall_at_k
from common.evaluation.tables import mean_se
from common.files import read_json

KINDS = ("object", "style")
RECALL_KS = (5, 10, 100)
# The levels a retrieval row may name, coarsest first: statistics average within the coarsest that varies.
CLUSTERS = ("concept", "seed")


def cluster_level(rows: list[dict]) -> str | None:
    """The coarsest of :data:`CLUSTERS` that every row names and that takes more than one value; None: per query."""
    for level in CLUSTERS:
        if all(level in r for r in rows) and len({r[level] for r in rows}) > 1:
            return level
    return None


def clustered(rows: list[dict], value) -> tuple[float, float, int]:
    """Mean ± SE of ``value(row)`` over clusters (see :func:`cluster_level`) and the number of clusters."""
    level = cluster_level(rows)
    groups: dict = {}
    for i, r in enumerate(rows):
        groups.setdefault(r[level] if level else i, []).append(value(r))
    mean, se = mean_se([sum(v) / len(v) for v in groups.values()])
    return mean, se, len(groups)


def read_rows(path: Path) -> dict[str, dict]:
    """One method's ``retrieval.json``, checked: every row has a kind and Recall@10 and AP in [0, 1] (one line naming
    the file and the query otherwise)."""
    rows = read_json(path, "retrieval file", "attribute again")
    require(isinstance(rows, dict), f"{path}: expected query id -> row")
    for query, row in rows.items():
        require(isinstance(row, dict) and "kind" in row, f"{path}: {query} has no kind")
        for key in ("recall@10", "ap"):
            value = row.get(key)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1
            require(ok, f"{path}: {query} has {key} {value!r}, not a number in [0, 1]")
    return rows


def gather(out: Path) -> dict[str, dict[str, dict]]:
    """method -> query id -> retrieval row, for every ``OUT/<method>/retrieval.json``."""
    found = {p.parent.name: read_rows(p) for p in sorted(out.glob("*/retrieval.json"))}
    require(
        bool(found),
        f"no <method>/retrieval.json in {out}: run python -m common.driver abc attribute first",
    )
    return found


def group_stats(rows: dict[str, dict], field: str, values) -> dict[str, tuple[int, tuple, tuple, int]]:
    """name -> (queries, Recall@10 mean ± SE, AP mean ± SE, clusters) for each of ``values`` of ``field``, then
    "all"; clustered (:func:`clustered`). Groups without queries are left out.
    """
    groups = [(v, [r for r in rows.values() if r[field] == v]) for v in values] + [("all", list(rows.values()))]
    out = {}
    for name, members in groups:
        if members:
            *recall, _ = clustered(members, lambda r: r["recall@10"])
            *ap, n = clustered(members, lambda r: r["ap"])
            out[name] = (len(members), tuple(recall), tuple(ap), n)
    return out


def retrieval_row(scores: np.ndarray, num_relevant: int, **fields) -> dict:
    """Recall@K and AP of the relevant items, which are the first ``num_relevant`` rows (exemplars first)."""
    relevant = list(range(num_relevant))
    row = {f"recall@{k}": recall_at_k(scores, relevant, k) for k in RECALL_KS}
    return row | {"ap": average_precision(scores, relevant)} | fields


def retrieval_table(rows: dict[str, dict], title: str, groups: list[tuple[str, Sequence[str]]]) -> str:
    """Mean ± SE of Recall@10 and mAP per value of each (field, values) in ``groups``, then over all queries;
    clustered as :func:`clustered` (by concept, within a concept by seed)."""
    lines = [f"| {title} | queries | clusters | Recall@10 | mAP |", "|---|---|---|---|---|"]
    stats = {}
    for field, values in groups:
        stats |= {k: v for k, v in group_stats(rows, field, values).items() if k != "all"}
    stats["all"] = group_stats(rows, groups[0][0], [])["all"]
    for name, (n, recall, ap, clusters) in stats.items():
        lines.append(f"| {name} | {n} | {clusters} | {recall[0]:.3f} ± {recall[1]:.3f} | {ap[0]:.3f} ± {ap[1]:.3f} |")
    return "\n".join(lines) + "\n"


def summary(rows: dict[str, dict]) -> dict[str, tuple[int, tuple, tuple, int]]:
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
                _, (r, r_se), (a, a_se), _ = stats[group]
                cells += [f"{r:.3f} ± {r_se:.3f}", f"{a:.3f} ± {a_se:.3f}"]
            else:
                cells += ["–", "–"]
        n = stats["all"][3]
        unit = "concepts" if cluster_level(list(rows.values())) == "concept" else "clusters"
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {len(rows)} ({n} {unit}) |")
    return "\n".join(lines) + "\n"


def paired(rows: dict[str, dict], base: dict[str, dict]) -> tuple[float, float, int, int] | None:
    """AP of ``rows`` minus ``base``'s on the queries both ranked, clustered: mean, SE, clusters where it is higher,
    clusters; None when they share no query."""
    shared = [q for q in rows if q in base]
    if not shared:
        return None
    diffs = [rows[q] | {"diff": rows[q]["ap"] - base[q]["ap"]} for q in shared]
    level = cluster_level(diffs)
    groups: dict = {}
    for i, d in enumerate(diffs):
        groups.setdefault(d[level] if level else i, []).append(d["diff"])
    means = [sum(v) / len(v) for v in groups.values()]
    mean, se = mean_se(means)
    return mean, se, sum(m > 0 for m in means), len(means)


def paired_table(found: dict[str, dict[str, dict]]) -> str:
    """Row method's AP minus column method's on the queries both ranked: clustered mean ± SE (clusters where the row's
    is higher / clusters).

    Pairing by query removes what the two share: how well the query shows its concept.
    """
    methods = list(found)
    lines = ["| AP minus → | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for method in methods:
        text = []
        for base in methods:
            cell = paired(found[method], found[base]) if base != method else None
            text.append(f"{cell[0]:+.3f} ± {cell[1]:.3f} ({cell[2]}/{cell[3]})" if cell else "–")
        lines.append(f"| {method} | " + " | ".join(text) + " |")
    return "\n".join(lines) + "\n"


def shown_only(found: dict[str, dict[str, dict]], shows: dict[str, dict]) -> dict[str, dict[str, dict]]:
    """Each method's rows of the queries that ``shows`` (query id -> {"shows": bool, ...}) marks as showing."""
    return {m: {q: r for q, r in rows.items() if shows.get(q, {}).get("shows")} for m, rows in found.items()}


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


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shows",
        default=None,
        help="which queries show their concept (default OUT/shows.json; a control of the twin whose queries keep "
        "their own images takes the twin's)",
    )


def compare(args: argparse.Namespace) -> str:
    """``OUT/retrieval.md`` (the methods side by side, then the queries that show their concept) and the scatter."""
    out = Path(args.out)
    shows_file = Path(args.shows) if args.shows else out / "shows.json"
    if args.shows:
        require_file(shows_file, "--shows file")
    found = gather(out)
    table = comparison_table(found) + "\n" + paired_table(found)
    if shows_file.is_file():
        shows = json.loads(shows_file.read_text())
        subset = {m: rows for m, rows in shown_only(found, shows).items() if rows}
        rule = shows.get("_rule", {}).get("text", "see shows.json")
        shown = sum(1 for q, v in shows.items() if not q.startswith("_") and v["shows"])
        table += f"\n### The queries that show their concept ({shown} of {len(shows) - 1}; {rule})\n\n"
        table += (comparison_table(subset) + "\n" + paired_table(subset)) if subset else "none\n"
    (out / "retrieval.md").write_text(table)
    if scatter(found, out / "object_vs_style.png"):
        return table + f"\nscatter in {out / 'object_vs_style.png'}"
    return table + "\nno scatter: no method has queries of both concept kinds yet"
