"""Attribute AbC queries with any registered method, model by model, and score the exemplars' retrieval.

    python -m custom_diffusion.attribute --data DATA --tasks DATA/tasks.json --out OUT [--method unlearning] \\
        [--sd CompVis/stable-diffusion-v1-4] [--config custom_diffusion/configs/abc.yaml --preset paper] \\
        [--fisher.file DATA/sd_fisher.pt] [--laion-count 100000]

For each Custom Diffusion model of the task list: the base model customized by its two files, the
training set to rank (its exemplars under the training prompt, then the first ``--laion-count``
LAION images), and its queries (the synthesized images under their prompts). The method is prepared
per model (caches in ``OUT/cache/<method>/<model>/``) and writes the usual run outputs in
``OUT/<method>/<query id>/``; finished queries are skipped. Then ``OUT/<method>/retrieval.json`` holds
each query's Recall@K and average precision of the exemplars, and ``retrieval.md`` their means per
test case, per concept kind and overall.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch

from common.config import add_attribution_arguments, load_preset, method_from_args
from common.errors import cli, require
from common.evaluation.retrieval import average_precision, recall_at_k
from common.files import write_json
from common.methods.base import run_method
from custom_diffusion.compare import KINDS, group_stats
from custom_diffusion.model import CUSTOM_WEIGHTS, SD_V14, StableDiffusionModel
from custom_diffusion.release import LAION_COUNT, load_laion, task_query, training_set
from custom_diffusion.tasks import TEST_CASES, Task, load_tasks

RECALL_KS = (5, 10, 100)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="the AbC data folder (custom_diffusion/scripts/download.sh)")
    parser.add_argument("--tasks", required=True, help="task list (JSON: synth_image_path, prompt, test_case, ...)")
    parser.add_argument("--sd", default=SD_V14, help="Stable Diffusion: hub id or pipeline folder")
    parser.add_argument("--laion-count", type=int, default=LAION_COUNT, help="LAION images ranked (paper: 100,000)")
    parser.add_argument("--no-plot", action="store_true", help="skip top10.png")
    add_attribution_arguments(parser, "YAML file of presets (custom_diffusion/configs/abc.yaml)")
    return parser


def retrieval_row(scores: np.ndarray, num_relevant: int, **fields) -> dict:
    """Recall@K and AP of the relevant items, which are the first ``num_relevant`` rows (exemplars first)."""
    relevant = list(range(num_relevant))
    row = {f"recall@{k}": recall_at_k(scores, relevant, k) for k in RECALL_KS}
    return row | {"ap": average_precision(scores, relevant)} | fields


def retrieval_table(rows: dict[str, dict], title: str, groups: list[tuple[str, Sequence[str]]]) -> str:
    """Mean ± SE of Recall@10 and mAP per value of each (field, values) in ``groups``, then over all queries;
    clustered as :func:`custom_diffusion.compare.clustered` (by concept, within a concept by seed)."""
    lines = [f"| {title} | queries | clusters | Recall@10 | mAP |", "|---|---|---|---|---|"]
    stats = {}
    for field, values in groups:
        stats |= {k: v for k, v in group_stats(rows, field, values).items() if k != "all"}
    stats["all"] = group_stats(rows, groups[0][0], [])["all"]
    for name, (n, recall, ap, clusters) in stats.items():
        lines.append(f"| {name} | {n} | {clusters} | {recall[0]:.3f} ± {recall[1]:.3f} | {ap[0]:.3f} ± {ap[1]:.3f} |")
    return "\n".join(lines) + "\n"


def ensemble_member(source: str, model_dir: Path, sd: str, device) -> StableDiffusionModel:
    """A TRAK ensemble member (``--trak.ensemble``) beside the customized model of ``model_dir``: a Custom Diffusion
    folder applied to the base model, or another Stable Diffusion (hub id or folder) customized by ``model_dir``."""
    if (Path(source) / CUSTOM_WEIGHTS).is_file():
        member = StableDiffusionModel.load(sd, device).with_custom(source)
    else:
        member = StableDiffusionModel.load(source, device).with_custom(model_dir)
    return member.prepare_for_gradients(device)


@cli
def main(argv: list[str] | None = None) -> None:
    from accelerate import Accelerator

    args = load_preset(build_parser(), argv=argv)
    cls, cfg = method_from_args(args)
    fisher = getattr(cfg, "fisher", None)
    require(
        fisher is None or bool(fisher.file),
        "pass --fisher.file: the Fisher is the base model's (the released sd_fisher.pt), not each customized model's",
    )
    laion = load_laion(args.data, args.laion_count, captions=cls.uses_captions)  # e.g. clip-text: caption strings
    tasks = load_tasks(args.tasks, args.data)  # every file checked before any work
    accelerator = Accelerator(cpu=args.device == "cpu")
    out = Path(args.out)
    rows: dict[str, dict] = {}
    by_model: dict[Path, list[Task]] = {}
    for task in tasks:  # the authors' list interleaves models: each is loaded once
        by_model.setdefault(task.model_dir, []).append(task)
    customs = [m for m in getattr(cfg, "ensemble", ()) if (Path(m) / CUSTOM_WEIGHTS).is_file()]
    require(
        not customs or len(by_model) == 1,
        f"--trak.ensemble names Custom Diffusion folders ({customs[0] if customs else ''}), other fine-tunings of one "
        f"concept, but the tasks use {len(by_model)} customized models: attribute one model's tasks per run",
    )
    for model_dir, group in by_model.items():
        require(
            len({(t.train_prompt, t.exemplars) for t in group}) == 1,
            f"tasks of {model_dir} disagree on the training prompt or the exemplars",
        )
        model = StableDiffusionModel.load(args.sd, accelerator.device).with_custom(model_dir)
        width = model.unet.config.cross_attention_dim
        require(
            laion.text(torch.tensor([0])).shape[-1] == width,
            f"the LAION text embeddings are {laion.text(torch.tensor([0])).shape[-1]} wide, the model's text {width}",
        )
        data = training_set(model, group[0], laion)
        queries = [task_query(model, t) for t in group]
        cache = out / "cache" / cls.name / model_dir.name
        members = partial(ensemble_member, model_dir=model_dir, sd=args.sd, device=accelerator.device)
        method = cls(
            cfg, model.prepare_for_gradients(accelerator.device), data, cache, members, accelerator=accelerator
        )
        if args.prepare_only:  # each customized model's pretrained losses (or features), before any query
            method.prepare()
            continue
        folders = run_method(method, queries, out / cls.name, args.top_k, args.overwrite, plot=not args.no_plot)
        for task, folder in zip(group, folders, strict=True):
            scores = np.load(folder / "scores.npy")
            rows[task.id] = retrieval_row(scores, len(task.exemplars), test_case=task.test_case, kind=task.kind,
                                          concept=model_dir.name)  # fmt: skip
        del model, data, method  # one Stable Diffusion at a time on the device
    if accelerator.is_main_process and not args.prepare_only:
        path = out / cls.name / "retrieval.json"
        rows = (json.loads(path.read_text()) if path.exists() else {}) | rows  # earlier runs' queries kept
        write_json(path, rows)
        table = retrieval_table(rows, cls.name, [("test_case", TEST_CASES), ("kind", KINDS)])
        (out / cls.name / "retrieval.md").write_text(table)
        print(table)


if __name__ == "__main__":
    main()
