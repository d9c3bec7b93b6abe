"""Leave-K-out pieces: exclusion sets from rankings, metrics by hand, table aggregation."""

import json
import math

import numpy as np
import pytest
import torch

from common.counterfactual import ClipSimilarity, EvalConfig, delta_loss, mse, query_loss
from common.errors import AttributionError
from common.exclusion import exclusion_key, random_exclusion, top_k_exclusion
from common.outputs import build_ranking, write_ranking
from common.pixel import pixel_scores
from common.tables import aggregate, build_tables, markdown_table, mean_se, paired_against, paired_markdown, seed_spread


def _ranking(tmp_path, data, top_k=3):
    scores = np.arange(len(data), dtype=np.float64)  # the last index scores highest
    ranking = build_ranking({"id": "q"}, "m", scores, data, top_k=top_k)
    write_ranking(tmp_path, ranking, scores)
    return tmp_path / "ranking.json"


def test_top_k_comes_from_the_ranking_and_then_the_scores(data, tmp_path):
    path = _ranking(tmp_path, data)
    n = len(data)
    assert top_k_exclusion(path, 2, n, data.fingerprint) == [n - 1, n - 2]
    assert top_k_exclusion(path, 5, n, data.fingerprint) == [n - 1, n - 2, n - 3, n - 4, n - 5]


def test_bad_k_and_foreign_rankings_are_refused(data, tmp_path):
    path = _ranking(tmp_path, data)
    with pytest.raises(AttributionError, match="must lie in"):
        top_k_exclusion(path, len(data) + 1, len(data), data.fingerprint)
    with pytest.raises(AttributionError, match="ranks another training set"):
        top_k_exclusion(path, 2, len(data), "0000")
    with pytest.raises(AttributionError, match="ranks another training set"):
        top_k_exclusion(path, 2, len(data) - 1, data.fingerprint)
    (tmp_path / "scores.npy").unlink()
    with pytest.raises(AttributionError, match="scores.npy is missing"):
        top_k_exclusion(path, 5, len(data), data.fingerprint)


def test_random_sets_are_seeded_and_keys_ignore_order():
    a, b = random_exclusion(100, 10, seed=0), random_exclusion(100, 10, seed=0)
    assert a == b and len(set(a)) == 10 and random_exclusion(100, 10, seed=1) != a
    assert exclusion_key([3, 1, 2]) == exclusion_key([1, 2, 3, 3]) != exclusion_key([1, 2])


def test_pixel_scores_take_the_better_flip(data, query):
    scores = pixel_scores(data, query)
    assert scores.shape == (len(data),) and scores[3] == pytest.approx(1.0)
    flipped_query = type(query)("f", query.image.flip(-1), query.text, "")
    assert pixel_scores(data, flipped_query)[3] == pytest.approx(1.0)


def test_mse_by_hand():
    assert mse(torch.zeros(1, 2, 2), torch.tensor([[[1.0, -1.0], [2.0, 0.0]]])) == pytest.approx(1.5)
    with pytest.raises(AttributionError):
        mse(torch.zeros(2), torch.zeros(3))


def test_delta_loss_is_zero_for_the_same_model_and_uses_fixed_noise(model, query):
    assert delta_loss(model.unet, model.unet, query, model.alphas_cumprod, stride=100) == 0.0
    a = query_loss(model.unet, query, model.alphas_cumprod, stride=100, seed=0)
    assert a == query_loss(model.unet, query, model.alphas_cumprod, stride=100, seed=0)
    assert a != query_loss(model.unet, query, model.alphas_cumprod, stride=100, seed=1)


def test_clip_without_weights_says_so():
    clip = ClipSimilarity("ViT-B-32", "")
    assert not clip.available and clip(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.uint8)) is None
    missing = ClipSimilarity("ViT-B-32", "/nonexistent/clip.bin")
    assert not missing.available and "unavailable" in missing.reason


def test_eval_config_validates():
    with pytest.raises(AttributionError):
        EvalConfig(loss_stride=3)


def test_mean_and_standard_error_by_hand():
    mean, se = mean_se([1.0, 2.0, 3.0, 6.0])
    assert mean == 3.0 and se == pytest.approx(math.sqrt(14 / 3 / 4))
    assert mean_se([5.0]) == (5.0, 0.0)


def test_table_aggregation_against_a_hand_made_example(tmp_path):
    records = [
        {"method": "unlearning", "query": "a", "k": 10, "delta_loss": 0.004, "mse": 0.02, "clip": None},
        {"method": "unlearning", "query": "b", "k": 10, "delta_loss": 0.006, "mse": 0.04, "clip": None},
        {"method": "random", "query": "a", "k": 10, "delta_loss": 0.001, "mse": 0.01, "clip": None},
        {"method": "random", "query": "a", "k": 20, "delta_loss": 0.003, "mse": 0.03, "clip": None},
    ]
    rows = {(r["method"], r["k"], r["metric"]): r for r in aggregate(records)}
    assert rows[("unlearning", 10, "delta_loss")]["mean"] == pytest.approx(0.005)
    assert rows[("unlearning", 10, "delta_loss")]["se"] == pytest.approx(0.001)
    assert rows[("random", 10, "mse")]["n"] == 1 and ("random", 10, "clip") not in rows
    text = markdown_table(aggregate(records), ["unlearning", "random"])
    assert "| unlearning | 5.00±1.00 / – | 3.00±1.00 / – |" in text
    files = []
    for i, r in enumerate(records):
        files.append(tmp_path / f"{i}.json")
        files[-1].write_text(json.dumps(r))
    text = build_tables(files, tmp_path / "table", ["unlearning", "random"])
    assert "| unlearning | 3.00±0.00 (1/1) |" in text  # query a only: b has no random removal at K = 10
    assert (tmp_path / "table" / "table.csv").read_text().startswith("method,k,metric,mean,se,n")
    assert (tmp_path / "table" / "delta_loss.png").stat().st_size > 1000


def test_seed_spread_by_hand():
    records = (
        [
            {"method": "random", "query": "a", "k": 5, "delta_loss": v}
            for v in (1.0, 3.0)  # variance 2
        ]
        + [
            {"method": "random", "query": "b", "k": 5, "delta_loss": v}
            for v in (0.0, 2.0, 4.0)  # variance 4
        ]
        + [{"method": "unlearning", "query": "a", "k": 5, "delta_loss": 100.0}]
    )
    (row,) = seed_spread(records)
    assert row["k"] == 5 and row["n_queries"] == 2 and row["n_seeds"] == 3
    assert row["mean"] == pytest.approx(10 / 5)
    assert row["sd"] == pytest.approx(math.sqrt((2 + 4) / 2))
    assert math.isnan(seed_spread(records[:1])[0]["sd"])  # one seed: no spread to measure


def test_paired_against_random_by_hand():
    records = [
        {"method": "random", "query": "a", "k": 5, "delta_loss": 1.0},
        {"method": "random", "query": "a", "k": 5, "delta_loss": 3.0},  # query a: random mean 2
        {"method": "random", "query": "b", "k": 5, "delta_loss": 0.0},  # query b: random mean 0
        {"method": "unlearning", "query": "a", "k": 5, "delta_loss": 5.0},  # +3
        {"method": "unlearning", "query": "b", "k": 5, "delta_loss": -1.0},  # -1
        {"method": "unlearning", "query": "c", "k": 5, "delta_loss": 9.0},  # no random for c: left out
    ]
    (row,) = paired_against(records)
    assert (row["method"], row["k"], row["n"], row["wins"]) == ("unlearning", 5, 2, 1)
    assert row["mean"] == pytest.approx(1.0) and row["se"] == pytest.approx(2.0)
    assert "| unlearning | 1000.00±2000.00 (1/2) |" in paired_markdown([row])
