"""The tiny benchmark's own measure of any registered method (the driver's evaluate stage), and the table of
every measured method (its compare stage).

    python -m common.driver tiny evaluate --model M --data D --out OUT --config tiny/configs/tiny.yaml [--method NAME]
    python -m common.driver tiny compare --out OUT [--tags unlearning pixel trak ...]

- Self-attribution: a training image used as its own query (its pixels and caption) should rank
  near the top of its own attribution. Reports top-1 / top-10 / top-0.5% rates and the median rank.
- Semantic agreement: for generated queries, the share of the top-10 that shares each attribute
  with the query prompt, against the dataset's base rate for that attribute.
- Cost: the method's preparation time and its time per query.
- For unlearning, the update itself: the query's loss rise against the median training image's,
  and the relative size of the weight update (from the rankings' stats).

Evaluate writes ``OUT/<method>/report.json`` and ``report.md`` and prints the Markdown summary. Compare reads
every ``OUT/<tag>/report.json`` and writes ``OUT/comparison.md``: self-attribution, shape+colour and colour agreement
of the top-10 against the base rate, and cost. A tag without a report gets a row with the reason (e.g. a feature
method whose weights are missing).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from common.data import Query
from common.errors import AttributionError, require
from common.files import write_json
from common.methods.base import run_method
from common.methods.candidates import build_method
from common.outputs import prepare_run_dir
from common.queries import generate_queries, load_queries
from tiny.data import count_duplicates
from tiny.pipeline import TinyRun, check_trained_on, load_model, load_run, shape_prompts
from tiny.shapes import ATTRIBUTES


def rank_of(scores: np.ndarray, index: int) -> int:
    """1-based rank of ``index`` when sorted by score descending (ties count against it)."""
    return int((scores >= scores[index]).sum())


def self_attribution_summary(ranks: list[int], n: int) -> dict:
    r = np.asarray(ranks)
    cutoff = max(1, int(round(0.005 * n)))
    return {
        "ranks": ranks,
        "top1": float((r <= 1).mean()),
        "top10": float((r <= 10).mean()),
        "top_0.5%": float((r <= cutoff).mean()),
        "top_0.5%_cutoff": cutoff,
        "median_rank": float(np.median(r)),
    }


def semantic_summary(folders: list[Path], attributes: list[dict], prompts_attrs: list[dict], k: int = 10) -> dict:
    """Per attribute: share of the top-k with the query's value, and the dataset's base rate."""
    out = {}
    combos = {"shape+colour": ("shape", "colour")} | {a: (a,) for a in ATTRIBUTES}
    for name, keys in combos.items():
        shares, bases = [], []
        for folder, q in zip(folders, prompts_attrs):
            top = json.loads((folder / "ranking.json").read_text())["top_k"][:k]
            shares.append(np.mean([all(attributes[t["index"]][a] == q[a] for a in keys) for t in top]))
            bases.append(np.mean([all(attr[a] == q[a] for a in keys) for attr in attributes]))
        out[name] = {
            "top10_share": float(np.mean(shares)),
            "base_rate": float(np.mean(bases)),
            "lift": float(np.mean(shares) / max(np.mean(bases), 1e-12)),
        }
    return out


def stats_summary(folders: list[Path]) -> dict:
    """Mean time per query, and for unlearning the update's size and the loss rises."""
    stats = [json.loads((f / "ranking.json").read_text())["stats"] for f in folders]
    out = {"seconds_per_query": float(np.mean([s["seconds_query"] for s in stats]))}
    if all("query_loss_rise" in s for s in stats):
        ratio = [s["query_loss_rise"] / max(abs(s["median_train_loss_rise"]), 1e-12) for s in stats]
        out |= {
            "relative_update_mean": float(np.mean([s["relative_update"] for s in stats])),
            "query_loss_rise_mean": float(np.mean([s["query_loss_rise"] for s in stats])),
            "median_train_loss_rise_mean": float(np.mean([s["median_train_loss_rise"] for s in stats])),
            "rise_ratio_median": float(np.median(ratio)),
        }
    return out


def markdown(report: dict) -> str:
    s = report["self_attribution"]
    lines = [
        f"method {report['method']}, N = {report['num_train']}; prepared in {report['seconds_prepare']:.0f} s, "
        f"{report['stats']['seconds_per_query']:.1f} s per query",
        f"self-attribution ({len(s['ranks'])} training images): top-1 {s['top1']:.0%}, top-10 {s['top10']:.0%}, "
        f"top-0.5% (rank <= {s['top_0.5%_cutoff']}) {s['top_0.5%']:.0%}, median rank {s['median_rank']:g}; "
        f"ranks {sorted(s['ranks'])}",
    ]
    if report["semantic"]:
        lines += ["", "| attribute | top-10 share | base rate | lift |", "|---|---|---|---|"]
        for name, v in report["semantic"].items():
            lines.append(f"| {name} | {v['top10_share']:.0%} | {v['base_rate']:.1%} | {v['lift']:.1f}x |")
    u = report["stats"]
    if "relative_update_mean" in u:
        lines += [
            "",
            f"update size |dθ|/|θ| = {u['relative_update_mean']:.2%}; query loss rise "
            f"{u['query_loss_rise_mean']:.2e} vs median training-image rise {u['median_train_loss_rise_mean']:.2e} "
            f"(median ratio {u['rise_ratio_median']:.0f}x)",
        ]
    return "\n".join(lines)


def add_evaluation_arguments(parser: argparse.ArgumentParser) -> None:
    """The evaluate stage's flags beyond the driver's (the generated queries are shared by the methods of ``--out``)."""
    parser.add_argument("--model", required=True, help="folder of a trained tiny model")
    parser.add_argument("--data", required=True, help="the shapes training folder (with attributes)")
    parser.add_argument(
        "--other-data", action="store_true", help="rank --data although the model records another training set"
    )
    parser.add_argument("--tag", default="", help="name of this variant's folder (default: the method's name)")
    parser.add_argument("--num-self", type=int, default=20, help="training images used as their own queries")
    parser.add_argument(
        "--self-picks", type=int, nargs="+", default=None, help="these training indices as self queries instead"
    )
    parser.add_argument("--num-generated", type=int, default=8, help="generated queries (the first of OUT's)")
    parser.add_argument(
        "--cache", default=None, help="folder of the method's prepared artifacts (default OUT/<tag>/cache)"
    )
    parser.add_argument("--guidance-scale", type=float, default=1.0, help="guidance of the generated queries")
    parser.add_argument("--eval-seed", type=int, default=0, help="seed of the choice of self queries and prompts")


def self_queries(run: TinyRun, picks: list[int]) -> list[Query]:
    """Training images as their own queries: their pixels and first caption."""
    f, data = run.folder, run.data
    return [Query(f"train{i:05d}", f.pixels[i], data.text([i])[0], f.captions[i][0], f.paths[i]) for i in picks]


def generated_queries(run: TinyRun, folder: Path, args: argparse.Namespace) -> list[Query]:
    """The first ``--num-generated`` queries sampled from the model; made once per output folder and reused
    only by runs of the same model, prompt seed and guidance (another is refused, naming the folder)."""
    identity = {"model": run.model.fingerprint(), "prompt_seed": args.eval_seed, "guidance_scale": args.guidance_scale}
    prepare_run_dir(folder, identity)
    if not any(folder.glob("*/query.json")):
        prompts = shape_prompts(args.num_generated, args.eval_seed)
        generate_queries(run.model, prompts, folder, args.eval_seed, guidance_scale=args.guidance_scale)
    queries = load_queries(folder)
    require(
        len(queries) >= args.num_generated,
        f"{folder} holds {len(queries)} generated queries, fewer than --num-generated {args.num_generated}; "
        "choose another --out",
    )
    return queries[: args.num_generated]


def self_picks(args: argparse.Namespace, n: int) -> list[int]:
    """The training images used as their own queries: ``--self-picks``, else ``--num-self`` drawn by the eval seed."""
    if args.self_picks is None:
        return np.random.default_rng(args.eval_seed).choice(n, args.num_self, replace=False).tolist()
    bad = [i for i in args.self_picks if not 0 <= i < n]
    require(not bad, f"--self-picks {bad[0] if bad else ''} is outside the training set (N = {n})")
    return list(args.self_picks)


def evaluate(args: argparse.Namespace, device, cls: type, cfg) -> str:
    """Self-attribution, semantic agreement and cost of method ``cls`` with ``cfg``; the Markdown report."""
    run = load_run(args.model, args.data, device)
    if not args.other_data:
        check_trained_on(args.model, run.data, args.data)
    if run.folder.attributes is None:
        raise AttributionError(f"{args.data} has no attributes in metadata.jsonl; evaluate needs the shapes dataset")
    picks = self_picks(args, len(run.data))
    root = Path(args.out)
    out = root / (args.tag or cls.name)
    generated = generated_queries(run, root / "generated_queries", args) if args.num_generated else []
    cache = Path(args.cache) if args.cache else out / "cache"

    def cache_for(name: str) -> Path:  # a candidate method's cache beside the method's own
        return cache if name == cls.name else cache / "candidates" / name

    method = build_method(cls, cfg, args, run.model, run.data, cache_for, load_model=lambda p: load_model(p, device))
    t0 = time.time()
    method.prepare()
    seconds_prepare = time.time() - t0

    def keep_deltas(folder: Path, query: Query, stats: dict) -> None:
        # Unlearning's per-orientation, per-timestep loss rises (N,F,T): for analyses such as dropping t = 0.
        if getattr(method, "last_deltas", None) is not None:
            np.save(folder / "deltas.npy", method.last_deltas)

    kw = {"overwrite": args.overwrite, "on_scores": keep_deltas}
    self_dirs = run_method(method, self_queries(run, picks), out / "self", **kw)
    gen_dirs = run_method(method, generated, out / "generated", **kw)
    ranks = [rank_of(np.load(d / "scores.npy"), i) for d, i in zip(self_dirs, picks)]
    attrs = [q.extra["attributes"] for q in generated]
    report = {
        "method": cls.name,
        "settings": method.identity(),
        "num_train": len(run.data),
        "duplicates": count_duplicates(run.folder.pixels),
        "self_picks": picks,
        "self_attribution": self_attribution_summary(ranks, len(run.data)),
        "semantic": semantic_summary(gen_dirs, run.folder.attributes, attrs) if generated else {},
        "stats": stats_summary(self_dirs + gen_dirs),
        "seconds_prepare": round(seconds_prepare, 1),
    }
    write_json(out / "report.json", report)
    (out / "report.md").write_text(markdown(report) + "\n")
    return markdown(report)


def table_row(tag: str, report: dict) -> str:
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
        lines.append(table_row(tag, report))
    if first is not None:
        sem = first["semantic"]
        base = ", ".join(f"{k} {v['base_rate']:.1%}" for k, v in sem.items() if k in ("shape+colour", "colour"))
        lines += ["", f"N = {first['num_train']}" + (f"; base rates: {base}." if base else ".")]
    return "\n".join(lines)


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tags", nargs="*", default=None, help="variant folders, in table order (default: all)")
    parser.add_argument("--note", nargs="*", default=[], help="TAG=reason for rows without a report")


def compare(args: argparse.Namespace) -> str:
    """``OUT/comparison.md`` from the evaluate reports of ``args.out``; the table."""
    out = Path(args.out)
    tags = args.tags or sorted(p.parent.name for p in out.glob("*/report.json"))
    require(bool(tags), f"no evaluate reports (<tag>/report.json) under {out}")
    notes = dict(n.split("=", 1) for n in args.note if "=" in n)
    text = table(out, tags, notes)
    (out / "comparison.md").write_text(text + "\n")
    return text
