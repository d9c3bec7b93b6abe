"""Measure attribution quality on the tiny benchmark.

    python -m tiny.evaluate --model M --data D --out OUT --config tiny/configs/tiny.yaml

- Self-attribution: a training image used as its own query (its pixels and caption) should rank
  near the top of its own attribution. Reports top-1 / top-10 / top-0.5% rates and the median rank.
- Semantic agreement: for generated queries, the share of the top-10 that shares each attribute
  with the query prompt, against the dataset's base rate for that attribute.
- The unlearning itself: the query's loss rise against the median training image's, and the
  relative size of the weight update.

Writes ``OUT/report.json`` and prints a Markdown summary.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from common.attribute import cached_base_losses, run_attribution
from common.config import dataclass_from_args, load_preset, resolve_device
from common.data import Query, as_numpy_uint8
from common.errors import AttributionError, cli
from common.fisher import FisherConfig
from common.fisher_cache import cached_fisher
from common.losses import LossConfig
from common.per_sample_grad import use_classic_attention
from common.queries import load_queries
from common.unlearn import UnlearnConfig
from tiny.attribute import STAGES, build_parser
from tiny.data import count_duplicates, load_image_folder
from tiny.generate import generate_queries, shape_prompts
from tiny.model import TinyTextToImage
from tiny.pipeline import set_threads, training_set
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


def scores_without_first_timestep(folder: Path) -> np.ndarray:
    """Scores recomputed from ``deltas.npy`` (N,F,T) leaving out the first timestep slot."""
    return np.load(folder / "deltas.npy")[:, :, 1:].mean(-1).max(1)


def semantic_summary(
    folders: list[Path], attributes: list[dict], prompts_attrs: list[dict], k: int = 10, drop_first: bool = False
) -> dict:
    """Per attribute: share of the top-k with the query's value, and the dataset's base rate."""
    out = {}
    combos = {"shape+colour": ("shape", "colour")} | {a: (a,) for a in ATTRIBUTES}
    for name, keys in combos.items():
        shares, bases = [], []
        for folder, q in zip(folders, prompts_attrs):
            if drop_first:
                scores = scores_without_first_timestep(folder)
                top = [{"index": int(i)} for i in np.argsort(-scores, kind="stable")[:k]]
            else:
                top = json.loads((folder / "ranking.json").read_text())["top_k"][:k]
            shares.append(np.mean([all(attributes[t["index"]][a] == q[a] for a in keys) for t in top]))
            bases.append(np.mean([all(attr[a] == q[a] for a in keys) for attr in attributes]))
        out[name] = {
            "top10_share": float(np.mean(shares)),
            "base_rate": float(np.mean(bases)),
            "lift": float(np.mean(shares) / max(np.mean(bases), 1e-12)),
        }
    return out


def unlearning_summary(folders: list[Path]) -> dict:
    stats = [json.loads((f / "ranking.json").read_text())["stats"] for f in folders]
    ratio = [s["query_loss_rise"] / max(abs(s["median_train_loss_rise"]), 1e-12) for s in stats]
    return {
        "relative_update_mean": float(np.mean([s["relative_update"] for s in stats])),
        "query_loss_rise_mean": float(np.mean([s["query_loss_rise"] for s in stats])),
        "median_train_loss_rise_mean": float(np.mean([s["median_train_loss_rise"] for s in stats])),
        "rise_ratio_median": float(np.median(ratio)),
        "seconds_per_query": float(np.mean([s["seconds_unlearn"] + s["seconds_score"] for s in stats])),
    }


def markdown(report: dict) -> str:
    s = report["self_attribution"]
    lines = [
        f"alpha = {report['unlearn']['step_size']}, N = {report['num_train']}",
        f"self-attribution ({len(s['ranks'])} training images): top-1 {s['top1']:.0%}, top-10 {s['top10']:.0%}, "
        f"top-0.5% (rank <= {s['top_0.5%_cutoff']}) {s['top_0.5%']:.0%}, median rank {s['median_rank']:g}; "
        f"ranks {sorted(s['ranks'])}",
        "",
        "| attribute | top-10 share | base rate | lift |",
        "|---|---|---|---|",
    ]
    for name, v in report["semantic"].items():
        lines.append(f"| {name} | {v['top10_share']:.0%} | {v['base_rate']:.1%} | {v['lift']:.1f}x |")
    w = report["without_first_timestep"]
    ws = w["self_attribution"]
    lines += [
        "",
        f"leaving out t = {w['timestep_left_out']} (same runs): self-attribution top-1 {ws['top1']:.0%}, "
        f"top-10 {ws['top10']:.0%}, median rank {ws['median_rank']:g}; shape+colour lift "
        f"{w['semantic'].get('shape+colour', {}).get('lift', float('nan')):.1f}x, "
        f"colour lift {w['semantic'].get('colour', {}).get('lift', float('nan')):.1f}x",
    ]
    u = report["unlearning"]
    lines += [
        "",
        f"update size |dθ|/|θ| = {u['relative_update_mean']:.2%}; query loss rise {u['query_loss_rise_mean']:.2e} "
        f"vs median training-image rise {u['median_train_loss_rise_mean']:.2e} "
        f"(median ratio {u['rise_ratio_median']:.0f}x); "
        f"{u['seconds_per_query']:.0f} s per query",
    ]
    return "\n".join(lines)


@cli
def main() -> None:
    parser = build_parser()
    parser.set_defaults(queries="")
    for action in parser._actions:
        if action.dest == "queries":
            action.required = False
    parser.add_argument("--num-self", type=int, default=20, help="training images used as their own queries")
    parser.add_argument("--num-generated", type=int, default=8, help="generated queries")
    parser.add_argument("--guidance-scale", type=float, default=1.0, help="guidance of the generated queries")
    parser.add_argument("--eval-seed", type=int, default=0, help="seed of the choice of self queries and prompts")
    args = load_preset(parser, STAGES)
    fisher_cfg, loss_cfg = (
        dataclass_from_args(FisherConfig, args, "fisher"),
        dataclass_from_args(LossConfig, args, "loss"),
    )
    unlearn_cfg = dataclass_from_args(UnlearnConfig, args, "unlearn")
    set_threads()
    out = Path(args.out)
    model = TinyTextToImage.load(args.model)
    folder = load_image_folder(args.data, model.cfg.resolution)
    if folder.attributes is None:
        raise AttributionError(f"{args.data} has no attributes in metadata.jsonl; evaluate needs the shapes dataset")
    data = training_set(model, folder)
    t0 = time.time()
    gen_dir = out / "generated_queries"
    if args.num_generated and not gen_dir.exists():
        prompts = shape_prompts(args.num_generated, args.eval_seed)
        generate_queries(model, prompts, gen_dir, args.eval_seed, guidance_scale=args.guidance_scale)
    generated = load_queries(gen_dir) if args.num_generated else []
    model.to(resolve_device(args.device))
    use_classic_attention(model.unet)
    model.unet.requires_grad_(False)
    fp = model.fingerprint()
    fisher = cached_fisher(model.unet, data, model.alphas_cumprod, fisher_cfg, out / "fisher.safetensors", fp)
    base = cached_base_losses(model.unet, data, loss_cfg, model.alphas_cumprod, out / "base_losses.safetensors", fp)
    picks = np.random.default_rng(args.eval_seed).choice(len(data), args.num_self, replace=False).tolist()
    self_queries = [
        Query(f"train{i:05d}", folder.pixels[i], data.text([i])[0], folder.captions[i][0], folder.paths[i])
        for i in picks
    ]
    common = dict(
        alphas_cumprod=model.alphas_cumprod,
        loss_cfg=loss_cfg,
        unlearn_cfg=unlearn_cfg,
        fisher=fisher,
        base=base,
        run_config={"model": fp, "data": data.fingerprint, "fisher": asdict(fisher_cfg)},
        image_of=lambda i: as_numpy_uint8(folder.pixels[i]),
        overwrite=args.overwrite,
        save_deltas=True,
    )
    self_dirs = run_attribution(model.unet, data, self_queries, out / "self", **common)
    gen_dirs = run_attribution(model.unet, data, generated, out / "generated", **common)
    ranks = [rank_of(np.load(d / "scores.npy"), i) for d, i in zip(self_dirs, picks)]
    # The effect of the first timestep (t = 0 by the paper's default), from the same runs.
    ranks_drop = [rank_of(scores_without_first_timestep(d), i) for d, i in zip(self_dirs, picks)]
    attrs = [q.extra["attributes"] for q in generated]
    report = {
        "num_train": len(data),
        "duplicates": count_duplicates(folder.pixels),
        "unlearn": asdict(unlearn_cfg),
        "loss": asdict(loss_cfg),
        "fisher": asdict(fisher_cfg),
        "self_picks": picks,
        "self_attribution": self_attribution_summary(ranks, len(data)),
        "semantic": semantic_summary(gen_dirs, folder.attributes, attrs) if generated else {},
        "without_first_timestep": {
            "timestep_left_out": loss_cfg.first_timestep,
            "self_attribution": self_attribution_summary(ranks_drop, len(data)),
            "semantic": semantic_summary(gen_dirs, folder.attributes, attrs, drop_first=True) if generated else {},
        },
        "unlearning": unlearning_summary(self_dirs + gen_dirs),
        "seconds": round(time.time() - t0, 1),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown(report) + "\n")
    print(markdown(report))


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    main()
