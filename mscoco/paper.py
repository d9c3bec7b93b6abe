"""Our leave-K-out table beside the paper's (``configs/paper_results.yaml``): ``OUT/paper.md``.

python -m common.driver mscoco compare --out OUT      (OUT: the leave-k-out stage's output folder; rebuilds its tables)
"""

from __future__ import annotations

import csv
from pathlib import Path

import yaml

from common.errors import require
from common.evaluation.tables import METRICS, build_tables

RESULTS = Path(__file__).parent / "configs" / "paper_results.yaml"


def paper_results() -> dict:
    return yaml.safe_load(RESULTS.read_text())


def compare_with_paper(out: str | Path) -> str:
    """Per method and metric, ``ours±se (paper; follow-up)`` for each K; write it to ``out/paper.md``.

    Ours come from ``out/table.csv`` (written by the leave-K-out driver). A K the paper did not
    measure, or a row it has no number for (a variant), shows ``–`` in the brackets.
    """
    out = Path(out)
    with open(out / "table.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    ref = paper_results()
    ours = {(r["method"], int(r["k"]), r["metric"]): (float(r["mean"]), float(r["se"])) for r in rows}
    counts = {(r["method"], int(r["k"])): int(r["n"]) for r in rows if r["metric"] == "delta_loss"}
    ks = sorted({k for _, k, _ in ours})
    methods = [m for m in ref["paper"] if any(r["method"] == m for r in rows)]  # the paper's order, then the rest
    methods += [m for m in dict.fromkeys(r["method"] for r in rows) if m not in methods]
    metrics = [m for m in METRICS if any(m == metric for _, _, metric in ours)]

    def reported(source: str, method: str, metric: str, k: int) -> str:
        values = ref[source].get(method, {}).get(metric)
        return f"{values[ref['ks'].index(k)]:g}" if values and k in ref["ks"] else "–"

    lines = [
        f"K = {' / '.join(str(k) for k in ks)}; ours mean±se over queries (the paper's Table 1; its follow-up)",
        "",
        "| method | queries | " + " | ".join(METRICS[m][0] for m in metrics) + " |",
        "|---" * (len(metrics) + 2) + "|",
    ]
    for method in methods:
        cols = []
        for metric in metrics:
            scale = METRICS[metric][1]
            parts = []
            for k in ks:
                mean, se = ours.get((method, k, metric), (None, None))
                mine = f"{mean * scale:.2f}±{se * scale:.2f}" if mean is not None else "–"
                paper, followup = reported("paper", method, metric, k), reported("followup", method, metric, k)
                parts.append(f"{mine} ({paper}" + (f"; {followup})" if followup != "–" else ")"))
            cols.append(" / ".join(parts))
        queries = " / ".join(dict.fromkeys(str(counts.get((method, k), "–")) for k in ks))  # one number if all alike
        lines.append(f"| {method} | {queries} | " + " | ".join(cols) + " |")
    text = "\n".join(lines)
    (out / "paper.md").write_text(text + "\n")
    return text


def gather_tables(out: str | Path) -> str:
    """``table.md`` (with ``table.csv``, ``delta_loss.png``) and ``paper.md`` from every metric file in ``out``.

    Each row script measures its own rows into the same folder; the tables show all rows measured so far.
    """
    out = Path(out)
    files = sorted((out / "metrics").rglob("*.json"))
    require(bool(files), f"{out} holds no leave-K-out metrics (metrics/<row>/<query>/k<K>.json)")
    methods = sorted({f.relative_to(out / "metrics").parts[0] for f in files})
    order = [m for m in paper_results()["paper"] if m in methods] + [
        m for m in methods if m not in paper_results()["paper"]
    ]
    table = build_tables(files, out, order)
    return table + "\n\n" + compare_with_paper(out)
