"""Aggregate counterfactual metrics into the paper's Table 1 layout: mean ± standard error over queries."""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path

METRICS = {  # name: (column title, scale shown, higher is better)
    "delta_loss": ("ΔL ×10⁻³ ↑", 1e3, True),
    "mse": ("MSE ×10⁻² ↑", 1e2, True),
    "clip": ("CLIP sim ×10⁻¹ ↓", 1e1, False),
    # the off-target control: the same removal's ΔL on other queries (near 0 for a removal specific to its query)
    "off_target_delta_loss": ("off-target ΔL ×10⁻³", 1e3, False),
}


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error (sample standard deviation / sqrt(n); 0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def aggregate(records: list[dict]) -> list[dict]:
    """Rows (method, k, metric, mean, se, n) from records with ``method``, ``k``, ``query`` and metric values.

    Records of the same (method, K, query) — a seeded baseline's repeats — are averaged first, so the
    standard error is over queries (n = queries), not over queries × seeds: the seeds' models are
    shared by every query and are not independent observations. A metric that is ``None`` (e.g. CLIP
    without weights) is left out of that metric's row.
    """
    per_query: dict[tuple[str, int, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        for metric in METRICS:
            if r.get(metric) is not None:
                per_query[(r["method"], int(r["k"]), metric)][r.get("query", "")].append(float(r[metric]))
    rows = []
    for (method, k, metric), groups in sorted(per_query.items()):
        values = [sum(vs) / len(vs) for vs in groups.values()]
        mean, se = mean_se(values)
        rows.append({"method": method, "k": k, "metric": metric, "mean": mean, "se": se, "n": len(values)})
    return rows


def seed_spread(records: list[dict], method: str = "random", metric: str = "delta_loss") -> list[dict]:
    """The retraining noise floor: per K, a metric's spread over removal seeds for the same query.

    Rows (k, mean, sd, n_queries, n_seeds): ``sd`` is the root mean over queries of the sample
    variance across seeds, i.e. how much ΔL moves when *which* K random images are removed changes.
    """
    groups: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r["method"] == method and r.get(metric) is not None:
            groups[int(r["k"])][r["query"]].append(float(r[metric]))
    rows = []
    for k, per_query in sorted(groups.items()):
        variances = [
            sum((v - sum(vs) / len(vs)) ** 2 for v in vs) / (len(vs) - 1) for vs in per_query.values() if len(vs) > 1
        ]
        values = [v for vs in per_query.values() for v in vs]
        rows.append(
            {
                "k": k,
                "mean": sum(values) / len(values),
                "sd": math.sqrt(sum(variances) / len(variances)) if variances else float("nan"),
                "n_queries": len(per_query),
                "n_seeds": max(len(vs) for vs in per_query.values()),
            }
        )
    return rows


def paired_against(records: list[dict], baseline: str = "random", metric: str = "delta_loss") -> list[dict]:
    """Per method and K: the metric minus the baseline's for the same query (baseline seeds averaged).

    Pairing by query removes the query-to-query spread that both share. Rows (method, k, mean, se,
    n, wins): ``wins`` counts the queries where the method's value exceeds the baseline's.
    """
    base: dict[tuple[int, str], list[float]] = defaultdict(list)
    for r in records:
        if r["method"] == baseline and r.get(metric) is not None:
            base[(int(r["k"]), r["query"])].append(float(r[metric]))
    diffs: dict[tuple[str, int], list[float]] = defaultdict(list)
    for r in records:
        key = (int(r["k"]), r["query"])
        if r["method"] != baseline and r.get(metric) is not None and key in base:
            diffs[(r["method"], key[0])].append(float(r[metric]) - sum(base[key]) / len(base[key]))
    rows = []
    for (method, k), values in sorted(diffs.items()):
        mean, se = mean_se(values)
        rows.append(
            {"method": method, "k": k, "mean": mean, "se": se, "n": len(values), "wins": sum(v > 0 for v in values)}
        )
    return rows


def paired_markdown(rows: list[dict], method_order: list[str] | None = None) -> str:
    """The rows of :func:`paired_against` as a Markdown table, one column per K."""
    ks = sorted({r["k"] for r in rows})
    cell = {(r["method"], r["k"]): r for r in rows}
    lines = ["ΔL ×10⁻³ minus random's for the same query (mean±se; queries above random)", ""]
    lines += ["| method | " + " | ".join(f"K = {k}" for k in ks) + " |", "|---" * (len(ks) + 1) + "|"]
    for method in [m for m in (method_order or sorted({r["method"] for r in rows})) if m != "random"]:
        parts = [cell.get((method, k)) for k in ks]
        cells = [f"{c['mean'] * 1e3:.2f}±{c['se'] * 1e3:.2f} ({c['wins']}/{c['n']})" if c else "–" for c in parts]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(rows: list[dict], path: str | Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["method", "k", "metric", "mean", "se", "n"])
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(rows: list[dict], method_order: list[str] | None = None) -> str:
    """One row per method, one column per metric with ``mean±se`` for each K separated by ``/``."""
    ks = sorted({r["k"] for r in rows})
    methods = method_order or sorted({r["method"] for r in rows})
    cell = {(r["method"], r["k"], r["metric"]): r for r in rows}
    metrics = [m for m in METRICS if any(r["metric"] == m for r in rows)]
    head = "| method | " + " | ".join(METRICS[m][0] for m in metrics) + " |"
    lines = [f"K = {' / '.join(str(k) for k in ks)}", "", head, "|---" * (len(metrics) + 1) + "|"]
    for method in methods:
        cols = []
        for m in metrics:
            scale = METRICS[m][1]
            parts = []
            for k in ks:
                r = cell.get((method, k, m))
                parts.append(f"{r['mean'] * scale:.2f}±{r['se'] * scale:.2f}" if r else "–")
            cols.append(" / ".join(parts))
        lines.append(f"| {method} | " + " | ".join(cols) + " |")
    return "\n".join(lines)


def plot_metric(rows: list[dict], path: str | Path, metric: str = "delta_loss") -> None:
    """PNG of a metric against K, one line per method, with standard-error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for method in sorted({r["method"] for r in rows}):
        pts = sorted((r["k"], r["mean"], r["se"]) for r in rows if r["method"] == method and r["metric"] == metric)
        if pts:
            ks, means, ses = zip(*pts)
            ax.errorbar(ks, means, yerr=ses, marker="o", capsize=3, label=method)
    ax.set_xlabel("K (training images removed)")
    ax.set_ylabel(METRICS[metric][0])
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_tables(metric_files: list[Path], out_dir: str | Path, method_order: list[str] | None = None) -> str:
    """Read metric JSON files, write ``table.csv``, ``table.md`` and ``delta_loss.png``; return the Markdown."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = [json.loads(Path(p).read_text()) for p in metric_files]
    rows = aggregate(records)
    write_csv(rows, out / "table.csv")
    text = markdown_table(rows, method_order)
    paired = paired_against(records)
    if paired:
        text += "\n\n" + paired_markdown(paired, method_order)
    (out / "table.md").write_text(text + "\n")
    plot_metric(rows, out / "delta_loss.png")
    return text
