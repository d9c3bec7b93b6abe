"""Leave-K-out pieces: exclusion sets from rankings, metrics by hand, table aggregation."""

import json
import math

import numpy as np
import pytest
import torch

from common.errors import AttributionError
from common.evaluation.counterfactual import ClipSimilarity, EvalConfig, OffTarget, delta_loss, mse, query_loss
from common.evaluation.exclusion import exclusion_key, top_k_exclusion
from common.evaluation.tables import (
    aggregate,
    build_tables,
    markdown_table,
    mean_se,
    paired_against,
    paired_markdown,
    seed_spread,
)
from common.outputs import build_ranking, write_ranking


def _ranking(tmp_path, data, top_k=3, model_fingerprint="m0"):
    scores = np.arange(len(data), dtype=np.float64)  # the last index scores highest
    ranking = build_ranking({"id": "q"}, "m", scores, data, top_k=top_k, model_fingerprint=model_fingerprint)
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
    assert top_k_exclusion(path, 2, len(data), data.fingerprint, "m0") == [len(data) - 1, len(data) - 2]
    with pytest.raises(AttributionError, match="made on another model"):
        top_k_exclusion(path, 2, len(data), data.fingerprint, "m1")
    (tmp_path / "scores.npy").unlink()
    with pytest.raises(AttributionError, match="scores.npy is missing"):
        top_k_exclusion(path, 5, len(data), data.fingerprint)


def test_exclusion_keys_ignore_order():
    assert exclusion_key([3, 1, 2]) == exclusion_key([1, 2, 3, 3]) != exclusion_key([1, 2])


def test_mse_by_hand():
    assert mse(torch.zeros(1, 2, 2), torch.tensor([[[1.0, -1.0], [2.0, 0.0]]])) == pytest.approx(1.5)
    with pytest.raises(AttributionError):
        mse(torch.zeros(2), torch.zeros(3))


def test_delta_loss_is_zero_for_the_same_model_and_uses_fixed_noise(model, query):
    assert delta_loss(model, model, query, stride=100) == 0.0
    a = query_loss(model, query, stride=100, seed=0)
    assert a == query_loss(model, query, stride=100, seed=0)
    assert a != query_loss(model, query, stride=100, seed=1)
    with pytest.raises(AttributionError, match="must divide"):
        query_loss(model, query, stride=3, seed=0)


def test_off_target_is_the_mean_delta_loss_on_the_next_queries(model, data, query):
    import copy

    queries = [type(query)(f"q{i}", data.images(torch.tensor([i]))[0], data.text(torch.tensor([i]), 0), "p")
               for i in range(4)]  # fmt: skip
    retrained = copy.deepcopy(model)
    with torch.no_grad():
        for p in retrained.unet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    control = OffTarget(queries, 2, stride=100, seed=0)
    assert [q.id for q in control.others(queries[3])] == ["q0", "q1"]  # wraps; never the query itself
    record = control(model, retrained, queries[3])
    by_hand = (delta_loss(model, retrained, queries[0], 100) + delta_loss(model, retrained, queries[1], 100)) / 2
    assert record == {"off_target": 2, "off_target_delta_loss": pytest.approx(by_hand, rel=1e-12)}
    assert by_hand != 0.0
    assert control(model, model, queries[0])["off_target_delta_loss"] == 0.0
    assert OffTarget(queries, 0)(model, retrained, queries[0]) == {}  # off: nothing joins the record
    assert control.expect == {"off_target": 2} and OffTarget(queries, 0).expect is None
    with pytest.raises(AttributionError, match=r"off_target 4 exceeds the number of other queries \(3\)"):
        OffTarget(queries, 4)
    with pytest.raises(AttributionError, match="off_target"):
        EvalConfig(off_target=-1)


def test_clip_without_weights_says_so():
    clip = ClipSimilarity("ViT-B-32", "")
    assert not clip.available and clip(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.uint8)) is None
    missing = ClipSimilarity("ViT-B-32", "/nonexistent/clip.bin")
    assert not missing.available and "unavailable" in missing.reason


def test_eval_config_validates():
    with pytest.raises(AttributionError):
        EvalConfig(loss_stride=0)
    with pytest.raises(AttributionError):
        EvalConfig(ks=(0,))


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


def test_seeded_baseline_is_averaged_per_query_before_the_standard_error():
    records = [
        {"method": "random", "query": "a", "k": 5, "delta_loss": v, "seed": s} for s, v in enumerate((1.0, 3.0))
    ] + [{"method": "random", "query": "b", "k": 5, "delta_loss": v, "seed": s} for s, v in enumerate((0.0, 2.0))]
    (row,) = aggregate(records)
    assert row["n"] == 2 and row["mean"] == pytest.approx(1.5)
    assert row["se"] == pytest.approx(0.5)  # queries' means 2 and 1; pooling the 4 values would give 0.645


def _write_rankings(root, data, queries, order, model_fingerprint):
    for q in queries:
        scores = -np.arange(len(data), dtype=np.float64)
        scores[order] = np.arange(len(order), 0, -1)
        folder = root / q.id
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps({"order": order}))
        ranking = build_ranking({"id": q.id}, "m", scores, data, model_fingerprint=model_fingerprint)
        write_ranking(folder, ranking, scores)


def test_leave_k_out_driver_shares_models_and_remeasures_changed_rankings(model, data, query, tmp_path):
    from common.evaluation.leave_k_out import RankingSource, leave_k_out

    other = type(query)("q1", query.image, query.text, "another")
    fp = model.fingerprint()
    _write_rankings(tmp_path / "a", data, [query, other], [4, 2, 7], fp)
    _write_rankings(tmp_path / "b", data, [query, other], [4, 2, 9], fp)
    trained, measured, control = [], [], {}

    def retrain(excluded, folder):
        trained.append((tuple(sorted(excluded)), folder.name))
        return model

    def metrics(original, retrained, q):
        measured.append(q.id)
        return {"delta_loss": float(len(measured)), "mse": 0.0, "clip": None} | control

    sources = [RankingSource("a", tmp_path / "a"), RankingSource("b", tmp_path / "b")]
    args = (model, len(data), data.fingerprint, [query, other], sources, [1, 2, 3], retrain, metrics, tmp_path / "o")
    (tmp_path / "o").mkdir()  # as the main process (rank 0) makes it
    (tmp_path / "o" / "config.json").write_text(json.dumps({"recipe": 1}))
    assert leave_k_out(*args, {"recipe": 1}, rank=1, world=4) == ""  # joins every retraining, measures jobs 1, 5, 9
    assert len(trained) == 12 and len(measured) == 3 and len(list((tmp_path / "o" / "metrics").rglob("*.json"))) == 3
    measured.clear()
    trained.clear()
    table = leave_k_out(*args, {"recipe": 1})
    assert len(measured) == 9 and "| a |" in table and "| b |" in table  # the 3 measured by rank 1 are reused
    # K = 1, 2 give the same sets for both sources and queries; K = 3 differs between sources.
    assert sorted(set(trained)) == sorted({(s, exclusion_key(s)) for s in [(4,), (2, 4), (2, 4, 7), (2, 4, 9)]})
    leave_k_out(*args, {"recipe": 1})
    assert len(measured) == 9  # nothing redone
    _write_rankings(tmp_path / "b", data, [query], [5, 2, 9], fp)  # query q0 attributed again
    leave_k_out(*args, {"recipe": 1})
    assert len(measured) == 12  # its three K, not the stale rows
    with pytest.raises(AttributionError, match="different config"):
        leave_k_out(*args, {"recipe": 2})
    # A control asked for later: every record is measured again (the models are the retrain function's cache).
    control["off_target"] = 1
    leave_k_out(*args, {"recipe": 1}, expect={"off_target": 1})
    assert len(measured) == 24
    leave_k_out(*args, {"recipe": 1}, expect={"off_target": 1})
    assert len(measured) == 24
    _write_rankings(tmp_path / "b", data, [query], [5, 2, 9], "another model")
    with pytest.raises(AttributionError, match="made on another model"):
        leave_k_out(*args, {"recipe": 1})
