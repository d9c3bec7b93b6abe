"""Bad input a new user gave the tools: each is one line naming the file, flag or setting, before any work (each of
these used to end in a traceback, or to pass silently)."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from common.config import add_attribution_arguments, load_preset
from common.data import Query
from common.errors import AttributionError
from common.outputs import read_ranking
from common.queries import load_query, save_query


def one_line(capsys) -> str:
    (line,) = capsys.readouterr().err.strip().splitlines()
    return line


@pytest.mark.parametrize("top_k", ["0", "-5"])
def test_top_k_below_one_is_refused_before_any_work(tmp_path, capsys, top_k):
    """--top-k -5 wrote 115 entries; --top-k 0 raised IndexError after all the work."""
    from common.driver import command

    with pytest.raises(SystemExit):
        command("tests.test_driver:InMemory", "attribute")(
            ["--out", str(tmp_path), "--method", "pixel", "--top-k", top_k]
        )
    assert one_line(capsys) == f"error: --top-k lists at least 1 image, got {top_k}"
    assert not list(tmp_path.iterdir())


def test_a_reversed_query_range_is_refused():
    """release:2-0 used to select nothing and exit 0."""
    from mscoco.pipeline import parse_ids

    assert parse_ids("0-2,5") == [0, 1, 2, 5]
    with pytest.raises(AttributionError, match="query range '2-0' is empty"):
        parse_ids("2-0")


def write_rows(tmp_path, row: dict) -> None:
    (tmp_path / "pixel").mkdir(exist_ok=True)
    (tmp_path / "pixel" / "retrieval.json").write_text(json.dumps({"q0": row}).replace("Infinity", "NaN"))


@pytest.mark.parametrize(
    "row, message",
    [
        ({"recall@10": 1.0, "ap": 1.7, "kind": "object"}, "q0 has ap 1.7, not a number in [0, 1]"),
        ({"recall@10": 1.0, "ap": float("inf"), "kind": "object"}, "q0 has ap nan, not a number in [0, 1]"),
        ({"recall@10": 1.0, "ap": "0.5", "kind": "object"}, "q0 has ap '0.5', not a number in [0, 1]"),
        ({"recall@10": 1.0, "ap": 0.5}, "q0 has no kind"),
    ],
)
def test_compare_refuses_a_retrieval_row_out_of_range_or_incomplete(tmp_path, capsys, row, message):
    """ap 1.7 was reported as mAP 1.126, NaN as "nan ± nan"; a string ap or a missing kind was a traceback."""
    from common.driver import command

    write_rows(tmp_path, row)
    with pytest.raises(SystemExit):
        command("abc", "compare")(["--out", str(tmp_path)])
    assert one_line(capsys) == f"error: {tmp_path / 'pixel' / 'retrieval.json'}: {message}"


def ranking_with(tmp_path, indices: list) -> str:
    top = [
        {"rank": r + 1, "index": i, "score": 1.0 - r / 10, "caption": "", "image": None} for r, i in enumerate(indices)
    ]
    ranking = {"schema": 2, "query": {"id": "q"}, "method": "pixel", "num_train": 10, "train_fingerprint": "t",
               "model_fingerprint": "m", "top_k": top}  # fmt: skip
    (tmp_path / "ranking.json").write_text(json.dumps(ranking))
    return str(tmp_path / "ranking.json")


def test_a_ranking_with_a_repeated_or_non_integer_index_is_refused(tmp_path):
    """A repeated index removed K-1 images under the K label in leave-K-out; a string index was a traceback."""
    assert [t["index"] for t in read_ranking(ranking_with(tmp_path, [3, 1, 2]))["top_k"]] == [3, 1, 2]
    with pytest.raises(AttributionError, match="index 1 is listed twice"):
        read_ranking(ranking_with(tmp_path, [3, 1, 1]))
    with pytest.raises(AttributionError, match="top_k entry 2 has index '1', not an integer"):
        read_ranking(ranking_with(tmp_path, [3, "1", 2]))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: (f / "query.json").write_bytes(b'{"id": "q000", "prompt": "caf\xe9"}'), "query.json is damaged"),
        (lambda f: (f / "input.npy").write_bytes(b""), "input.npy is damaged or not a numeric array"),
        (lambda f: np.save(f / "input.npy", np.array([{}, 1], dtype=object)), "input.npy is damaged or not a numeric"),
        (lambda f: np.save(f / "input.npy", np.array(["a", "b"])), "input.npy holds <U1 values, not numbers"),
    ],
)
def test_a_damaged_query_folder_is_one_line_naming_the_file(tmp_path, damage, message):
    """Non-UTF-8 query.json, a zero-byte or object-dtype input.npy: tracebacks before."""
    folder = save_query(tmp_path, Query("q000", torch.zeros(3, 4, 4), torch.zeros(1, 2, 8), "a cat"), None, None, {})
    assert load_query(folder).id == "q000"
    damage(folder)
    with pytest.raises(AttributionError, match=message):
        load_query(folder)


def test_a_metadata_file_in_another_encoding_is_one_line(tmp_path):
    from tiny.data import load_image_folder

    (tmp_path / "metadata.jsonl").write_bytes(b'{"file_name": "a.png", "text": "caf\xe9"}\n')
    with pytest.raises(AttributionError, match=r"metadata.jsonl is not UTF-8 text \(byte 35\); save it as UTF-8"):
        load_image_folder(tmp_path, 8)


@pytest.mark.parametrize(
    "text, message",
    [
        ("default:\n  unlearn: {step_size: [1\n", "is not valid YAML at line 3, column 1"),
        ("default:\n  unlearn:\n    step_size: fast\n", "preset default: unlearn.step_size is 'fast', not float"),
        ("default:\n  unlearn:\n    steps: 1.5\n", "preset default: unlearn.steps is 1.5, not int"),
    ],
)
def test_a_bad_preset_file_names_the_file_and_the_key(tmp_path, text, message):
    """Malformed YAML was a traceback; a bad type was reported as a bad command-line flag."""
    (tmp_path / "c.yaml").write_text(text)
    parser = argparse.ArgumentParser()
    add_attribution_arguments(parser)
    with pytest.raises(AttributionError, match=message.replace("[", r"\[")):
        load_preset(parser, argv=["--out", "x", "--config", str(tmp_path / "c.yaml")])
    (tmp_path / "c.yaml").write_text("default:\n  unlearn:\n    step_size: 1e-3\n    steps: 2\n")
    args = load_preset(parser, argv=["--out", "x", "--config", str(tmp_path / "c.yaml")])
    assert args.__dict__["unlearn.step_size"] == 1e-3 and args.__dict__["unlearn.steps"] == 2


def test_a_folder_the_run_may_not_write_is_one_line_naming_it(capsys):
    """A read-only output folder (train, generate, attribute) ended in a PermissionError traceback."""
    from common.errors import cli

    @cli
    def main():
        raise PermissionError(13, "Permission denied", "/data/out/q000/scores.npy")

    with pytest.raises(SystemExit) as exit_:
        main()
    assert (
        exit_.value.code == 2 and one_line(capsys) == "error: cannot write /data/out/q000/scores.npy: permission denied"
    )


def test_nan_in_a_training_image_names_the_image_and_its_arrays(model, data):
    """A NaN in the training latents was reported as "the model weights are broken (step size too large?)"."""
    from common.data import ArrayTrainingSet
    from common.diffusion.keyed_losses import LossConfig, dataset_losses

    images = data.images(torch.arange(len(data))).clone()
    images[3, 0, 2, 2] = float("nan")
    broken = ArrayTrainingSet(images, data.text(torch.arange(len(data))))
    broken.source = "DATA/train_latents.npy"
    with pytest.raises(AttributionError, match=r"^training image 3 has NaN or inf in its model input "
                                               r"\(DATA/train_latents.npy\)$"):  # fmt: skip
        dataset_losses(model, broken, LossConfig(num_timesteps=2))


def test_nan_in_released_latents_is_one_line_naming_the_file_at_load(tmp_path):
    """A NaN in the MSCOCO training latents was reported as "the model weights are broken (step size too large?)", one
    in the LAION latents as "NaN or inf in the scores"."""
    from mscoco import release
    from tests.test_mscoco import write_release

    write_release(tmp_path)
    assert len(release.load_training_set(tmp_path)) == 6
    latents = np.load(tmp_path / release.TRAIN_LATENTS)
    latents[7, 1, 2, 3] = np.nan
    np.save(tmp_path / release.TRAIN_LATENTS, latents)
    at = np.ravel_multi_index((7, 1, 2, 3), latents.shape)
    with pytest.raises(AttributionError, match=rf"train_latents.npy holds NaN or inf \(element {at} of "):
        release.load_training_set(tmp_path)
