"""The driver and the benchmark contract: a benchmark written in one class runs every stage by name; an unknown
benchmark or stage is one line that lists the choices."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from common.benchmark import Attribution, Benchmark, registered
from common.data import Query
from common.driver import command, main
from tests.conftest import worker_model_and_data


class InMemory(Benchmark):
    """A whole benchmark in one class: the micro model, random images, and two queries that are training images 3
    and 7 themselves; it measures the rank of each query's own image."""

    name = "in-memory"
    presets = "tiny/configs/tiny.yaml"

    def add_arguments(self, parser):
        parser.add_argument("--images", type=int, default=10, help="training images")

    def attributions(self, args, device, method, cfg):
        model, data = worker_model_and_data(args.images)
        one = lambda i: data.images(torch.tensor([i]))[0].clone()
        text = lambda i: data.text(torch.tensor([i]), 0).clone()
        queries = [Query(f"q{i}", one(i), text(i), f"training image {i}") for i in (3, 7)]
        self.ranks: dict[str, int] = {}
        yield Attribution(model, data, queries, lambda path: model, info={"q3": {"source": 3}, "q7": {"source": 7}})

    def attributed(self, attribution, folders):
        for query, folder in zip(attribution.queries, folders):
            scores = np.load(folder / "scores.npy")
            source = attribution.info[query.id]["source"]
            self.ranks[query.id] = int((scores > scores[source]).sum())

    def finish(self, out: Path, is_main: bool):
        if is_main:
            (out / "ranks.json").write_text(json.dumps(self.ranks))


def test_a_benchmark_in_one_class_runs_by_its_module_path(tmp_path, capsys):
    attribute = command("tests.test_driver:InMemory", "attribute")
    flags = ["--out", str(tmp_path), "--method", "pixel", "--device", "cpu", "--no-plot", "--top-k", "5"]
    attribute(flags)
    ranking = json.loads((tmp_path / "pixel" / "q3" / "ranking.json").read_text())
    assert ranking["top_k"][0]["index"] == 3 and len(ranking["top_k"]) == 5
    assert json.loads((tmp_path / "pixel" / "ranks.json").read_text()) == {"q3": 0, "q7": 0}
    assert not (tmp_path / "pixel" / "q3" / "top10.png").exists()
    capsys.readouterr()
    attribute(flags)  # finished queries are skipped, the benchmark's own measure is written again
    assert "q3: already attributed with pixel" in capsys.readouterr().out
    assert json.loads((tmp_path / "pixel" / "ranks.json").read_text()) == {"q3": 0, "q7": 0}


def test_the_benchmarks_are_registered():
    assert {"tiny", "mscoco", "abc", "tiny_abc"} <= set(registered())


@pytest.mark.parametrize(
    "argv, message",
    [
        (["nope", "attribute"], "unknown benchmark 'nope': choose from abc, mscoco, tiny, tiny_abc"),
        (["tiny", "nope"], "unknown stage 'nope': choose from generate, attribute, evaluate, leave-k-out, lds"),
        (["mscoco", "evaluate", "--out", "x"], "the mscoco benchmark has no evaluate stage: leave-k-out is its"),
        (["abc", "leave-k-out", "--out", "x"], "the abc benchmark has no leave-k-out stage: its gold standard is"),
        (["abc", "generate", "--help"], "the abc benchmark has no generate stage"),
        (["tests.test_driver:InMemory", "compare", "--out", "x"], "the in-memory benchmark has no compare stage"),
        (["mscoco", "compare", "--out", "nowhere"], "nowhere holds no leave-K-out metrics"),
        (["common.config:load_preset", "attribute"], "common.config:load_preset is not a Benchmark subclass"),
        (["tests.nowhere:Mine", "attribute"], "benchmark 'tests.nowhere:Mine': cannot load tests.nowhere:Mine"),
    ],
)
def test_an_unknown_benchmark_or_stage_is_one_line_with_the_choices(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_a_second_run_into_a_folder_being_written_stops_with_one_line(tmp_path, capsys):
    """Two runs into one output folder at the same time both did all the work."""
    from common.files import folder_lock

    attribute = command("tests.test_driver:InMemory", "attribute")
    flags = ["--out", str(tmp_path), "--method", "pixel", "--device", "cpu", "--no-plot"]
    with folder_lock(tmp_path / "pixel"):  # the first run, still writing
        with pytest.raises(SystemExit):
            attribute(flags)
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (f"error: {tmp_path / 'pixel'} is being written by another run (pid {os.getpid()}); wait for it to "
                    "finish, or choose another --out")  # fmt: skip
    assert not (tmp_path / "pixel" / "q3").exists()
    attribute(flags)  # once it is done, the folder is free
    assert (tmp_path / "pixel" / "q3" / "ranking.json").is_file()
