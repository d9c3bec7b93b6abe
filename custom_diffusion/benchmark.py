"""The AbC benchmark (Stable Diffusion customized by Custom Diffusion) for the driver (:mod:`common.driver`), and the
exemplars' retrieval it measures from the rankings.

    python -m common.driver abc attribute --data DATA --tasks DATA/tasks.json --out OUT [--method unlearning] \\
        [--sd CompVis/stable-diffusion-v1-4] [--config custom_diffusion/configs/abc.yaml --preset paper] \\
        [--fisher.file DATA/sd_fisher.pt] [--laion-count 100000]

For each Custom Diffusion model of the task list: the base model customized by its two files, the training set to
rank (its exemplars under the training prompt, then the first ``--laion-count`` LAION images), and its queries (the
synthesized images under their prompts). The method is prepared per model (caches in ``OUT/cache/<method>/<model>/``).
Then ``OUT/<method>/retrieval.json`` holds each query's Recall@K and average precision of the exemplars, and
``retrieval.md`` their means per test case, per concept kind and overall (earlier runs' queries kept).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch

from common.benchmark import Attribution, Benchmark
from common.errors import require
from common.files import write_json
from custom_diffusion import compare
from custom_diffusion.compare import KINDS, retrieval_row, retrieval_table
from custom_diffusion.model import CUSTOM_WEIGHTS, SD_V14, StableDiffusionModel
from custom_diffusion.release import LAION_COUNT, load_laion, task_query, training_set
from custom_diffusion.tasks import TEST_CASES, Task, load_tasks


def ensemble_member(source: str, model_dir: Path, sd: str, device) -> StableDiffusionModel:
    """A TRAK ensemble member (``--trak.ensemble``) beside the customized model of ``model_dir``: a Custom Diffusion
    folder applied to the base model, or another Stable Diffusion (hub id or folder) customized by ``model_dir``."""
    if (Path(source) / CUSTOM_WEIGHTS).is_file():
        member = StableDiffusionModel.load(sd, device).with_custom(source)
    else:
        member = StableDiffusionModel.load(source, device).with_custom(model_dir)
    return member.prepare_for_gradients(device)


class Abc(Benchmark):
    name = "abc"
    presets = "custom_diffusion/configs/abc.yaml"
    unavailable = {
        "evaluate": "its attribute stage measures the exemplars' retrieval (OUT/<method>/retrieval.json); compare puts "
        "the methods side by side",
        "leave-k-out": "its gold standard is the exemplars each customized model was taught, not retraining",
        "generate": "its queries are the release's synthesized images",
    }

    def __init__(self) -> None:
        self.rows: dict[str, dict] = {}  # query id -> retrieval row, of this run

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--data", required=True, help="the AbC data folder (custom_diffusion/scripts/download.sh)")
        parser.add_argument("--tasks", required=True, help="task list (JSON: synth_image_path, prompt, test_case, ...)")
        parser.add_argument("--sd", default=SD_V14, help="Stable Diffusion: hub id or pipeline folder")
        parser.add_argument("--laion-count", type=int, default=LAION_COUNT, help="LAION images ranked (paper: 100,000)")

    def attributions(self, args: argparse.Namespace, device, method: type, cfg) -> Iterator[Attribution]:
        fisher = getattr(cfg, "fisher", None)
        require(
            fisher is None or bool(fisher.file),
            "pass --fisher.file: the Fisher is the base model's (the released sd_fisher.pt), not each customized "
            "model's",
        )
        laion = load_laion(args.data, args.laion_count, captions=method.uses_captions)  # clip-text: caption strings
        tasks = load_tasks(args.tasks, args.data)  # every file checked before any work
        by_model: dict[Path, list[Task]] = {}
        for task in tasks:  # the authors' list interleaves models: each is loaded once
            by_model.setdefault(task.model_dir, []).append(task)
        customs = [m for m in getattr(cfg, "ensemble", ()) if (Path(m) / CUSTOM_WEIGHTS).is_file()]
        require(
            not customs or len(by_model) == 1,
            f"--trak.ensemble names Custom Diffusion folders ({customs[0] if customs else ''}), other fine-tunings of "
            f"one concept, but the tasks use {len(by_model)} customized models: attribute one model's tasks per run",
        )
        for model_dir, group in by_model.items():
            require(
                len({(t.train_prompt, t.exemplars) for t in group}) == 1,
                f"tasks of {model_dir} disagree on the training prompt or the exemplars",
            )
        for model_dir, group in by_model.items():
            yield self._attribution(args, device, model_dir, group, laion)

    @staticmethod
    def _attribution(args, device, model_dir: Path, group: list[Task], laion) -> Attribution:
        """One customized model's attribution (a function of its own, so nothing else holds the model after it)."""
        model = StableDiffusionModel.load(args.sd, device).with_custom(model_dir)
        width, laion_width = model.unet.config.cross_attention_dim, laion.text(torch.tensor([0])).shape[-1]
        require(laion_width == width, f"the LAION text embeddings are {laion_width} wide, the model's text {width}")
        data = training_set(model, group[0], laion)
        queries = [task_query(model, t) for t in group]
        members = partial(ensemble_member, model_dir=model_dir, sd=args.sd, device=device)
        info = {t.id: {"test_case": t.test_case, "kind": t.kind, "concept": model_dir.name,
                       "exemplars": len(t.exemplars)} for t in group}  # fmt: skip
        return Attribution(model.prepare_for_gradients(device), data, queries, members, model_dir.name, info)

    def attributed(self, attribution: Attribution, folders: list[Path]) -> None:
        for query, folder in zip(attribution.queries, folders, strict=True):
            fields = dict(attribution.info[query.id])
            scores = np.load(folder / "scores.npy")
            self.rows[query.id] = retrieval_row(scores, fields.pop("exemplars"), **fields)

    def table_groups(self) -> list[tuple[str, Sequence[str]]]:
        """The (field, values) whose groups ``retrieval.md`` averages, before all queries."""
        return [("test_case", TEST_CASES), ("kind", KINDS)]

    def finish(self, out: Path, is_main: bool) -> None:
        if not is_main:
            return
        path = out / "retrieval.json"
        rows = (json.loads(path.read_text()) if path.exists() else {}) | self.rows  # earlier runs' queries kept
        write_json(path, rows)
        table = retrieval_table(rows, out.name, self.table_groups())
        (out / "retrieval.md").write_text(table)
        print(table)

    def add_compare_arguments(self, parser: argparse.ArgumentParser) -> None:
        compare.add_compare_arguments(parser)

    def compare(self, args: argparse.Namespace) -> str:
        return compare.compare(args)
