"""Candidate re-ranking: the exact method scores only a cheap method's top M (common.methods.candidates)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from common.data import Query
from common.diffusion.keyed_losses import LossConfig
from common.errors import AttributionError
from common.methods.base import run_method
from common.methods.candidates import CandidatesConfig, build_method, interleaved, merged_scores, top_candidates
from common.methods.pixel import Pixel, PixelConfig
from common.methods.text_condition import TextCondition, TextConditionConfig
from common.methods.unlearning import Unlearning, UnlearningConfig
from common.unlearning.fisher import FisherConfig
from common.unlearning.unlearn import UnlearnConfig


def _config(candidates: CandidatesConfig | None = None) -> UnlearningConfig:
    return UnlearningConfig(
        FisherConfig(num_samples=24),
        LossConfig(num_timesteps=4),
        UnlearnConfig(step_size=1e-3, batch_size=8, accumulations=2),
        candidates=candidates or CandidatesConfig(),
    )


def _reranked(model, data, count: float, cache) -> Unlearning:
    method = Unlearning(_config(CandidatesConfig("pixel", count)), model, data, cache)
    method.use_candidates(Pixel(PixelConfig(), model, data))
    return method


def test_merged_scores_put_the_candidates_first_by_exact_score_then_the_rest_in_the_cheap_order():
    cheap = np.array([0.9, 0.1, 0.5, 0.7, 0.3, 0.8])
    candidates = top_candidates(cheap, 3)
    assert candidates.tolist() == [0, 3, 5]  # the cheap top 3, ascending
    exact = np.array([[-2.0, 1.0], [3.0, 0.5], [0.25, 0.0]])  # (M, F); flip-max 1.0, 3.0, 0.25
    merged = merged_scores(exact, candidates, cheap)
    order = np.argsort(-merged.max(1), kind="stable")
    assert order.tolist() == [3, 0, 5, 2, 4, 1]  # exact order of the candidates, then cheap order of the others
    assert sorted(order.tolist()) == list(range(6))
    np.testing.assert_array_equal(merged[candidates], exact)
    assert merged[2].tolist() == [-0.75, -0.75] and merged[1, 0] == -2.75  # floor 0.25 - 1, falling by one
    assert top_candidates(np.array([1.0, 1.0, 1.0]), 2).tolist() == [0, 1]  # ties by index


def test_several_cheap_methods_take_turns_by_hand():
    a = np.array([0.9, 0.1, 0.5, 0.7, 0.3, 0.8])  # order 0, 5, 3, 2, 4, 1
    b = np.array([0.0, 1.0, 0.2, 0.9, 0.8, 0.1])  # order 1, 3, 4, 2, 5, 0
    # turns: a's 0, b's 1, a's 5, b's 3, (a's 3 placed), b's 4, a's 2, then every image is placed
    turns = interleaved([a, b])
    assert np.argsort(-turns, kind="stable").tolist() == [0, 1, 5, 3, 4, 2]
    assert turns.tolist() == [0.0, -1.0, -5.0, -3.0, -4.0, -2.0]
    assert top_candidates(turns, 3).tolist() == [0, 1, 5]
    assert np.argsort(-interleaved([a]), kind="stable").tolist() == np.argsort(-a, kind="stable").tolist()
    assert np.argsort(-interleaved([b, a]), kind="stable").tolist() == [1, 0, 3, 5, 4, 2]  # b takes the first turn
    with pytest.raises(AttributionError, match="differing lengths"):
        interleaved([a, b[:5]])


def test_candidate_scores_equal_the_full_pass_at_their_indices(model, data, query, tmp_path):
    full, _ = Unlearning(_config(), model, data, tmp_path / "full").score_flips(query)
    method = _reranked(model, data, 5, tmp_path / "cache")
    merged, stats = method.score_flips(query)
    cheap = Pixel(PixelConfig(), model, data).score(query)[0]
    picked = top_candidates(cheap, 5)
    assert stats["candidates"] == {"method": "pixel", "count": 5, "indices": picked.tolist()}
    assert 0 <= stats["seconds_candidates"] <= stats["seconds_query"]
    per_image = (2 if model.flips else 1) * 2 * 4  # orientations x captions x scoring timesteps
    assert stats["forwards"] == {"unlearn": 8 * 2, "score": 5 * per_image}  # draws x batches; candidates only
    np.testing.assert_array_equal(merged[picked], full[picked])  # bit for bit: noise keyed by training index
    rest = np.setdiff1d(np.arange(len(data)), picked)
    assert merged.max(1)[rest].max() < merged.max(1)[picked].min()
    assert np.argsort(-merged.max(1)[rest], kind="stable").tolist() == np.argsort(-cheap[rest], kind="stable").tolist()
    assert method.last_deltas is None  # analyses that read every image's rises are not given a part of them


def test_candidates_of_two_cheap_methods_hold_the_top_of_each(model, data, query, tmp_path):
    full, _ = Unlearning(_config(), model, data, tmp_path / "full").score_flips(query)
    method = Unlearning(_config(CandidatesConfig("pixel+text-condition", 4)), model, data, tmp_path / "cache")
    pixel, text = Pixel(PixelConfig(), model, data), TextCondition(TextConditionConfig(), model, data)
    method.use_candidates(pixel, text)
    merged, stats = method.score_flips(query)
    cheap = [pixel.score(query)[0], text.score(query)[0]]
    picked = top_candidates(interleaved(cheap), 4)
    assert stats["candidates"] == {"method": "pixel+text-condition", "count": 4, "indices": picked.tolist()}
    for scores in cheap:  # the first two of each cheap ranking
        assert set(np.argsort(-scores, kind="stable")[:2].tolist()) <= set(picked.tolist())
    np.testing.assert_array_equal(merged[picked], full[picked])
    rest = np.setdiff1d(np.arange(len(data)), picked)
    assert merged.max(1)[rest].max() < merged.max(1)[picked].min()
    identity = method.identity()["candidates"]
    assert identity["method"] == "pixel+text-condition" and identity["settings"] == [pixel.identity(), text.identity()]
    with pytest.raises(AttributionError, match="come from pixel\\+text-condition, not text-condition\\+pixel"):
        method.use_candidates(text, pixel)


def test_every_image_as_a_candidate_reproduces_the_exact_ranking_with_and_without_a_cache(model, data, query, tmp_path):
    full, stats = Unlearning(_config(), model, data, tmp_path / "full").score_flips(query)
    flips = 2 if model.flips else 1
    assert stats["forwards"]["score"] == 12 * flips * 2 * 4  # images x orientations x captions x timesteps
    for cache in (tmp_path / "cache", None):
        merged, stats = _reranked(model, data, len(data), cache).score_flips(query)
        np.testing.assert_array_equal(merged, full)
        assert stats["candidates"]["count"] == len(data)
    merged, _ = _reranked(model, data, 0.25, None).score_flips(query)  # a fraction: ceil(0.25 * 12) = 3
    picked = top_candidates(Pixel(PixelConfig(), model, data).score(query)[0], 3)
    np.testing.assert_array_equal(merged[picked], full[picked])


def test_a_run_records_the_candidate_method_and_reuses_only_its_own_outputs(model, data, query, tmp_path):
    (folder,) = run_method(_reranked(model, data, 4, tmp_path / "cache"), [query], tmp_path / "out", plot=False)
    config = json.loads((folder / "config.json").read_text())
    pixel = Pixel(PixelConfig(), model, data).identity()
    assert config["settings"]["candidates"] == {"method": "pixel", "count": 4, "settings": pixel}
    ranking = json.loads((folder / "ranking.json").read_text())
    assert len(ranking["stats"]["candidates"]["indices"]) == 4
    exact = Unlearning(_config(), model, data, tmp_path / "cache")
    assert "candidates" not in exact.identity()  # off: the identity of runs made before candidates existed
    with pytest.raises(AttributionError, match="candidates.count differ"):
        run_method(_reranked(model, data, 5, tmp_path / "cache"), [query], tmp_path / "out", plot=False)


def test_bad_candidate_settings_are_refused_before_any_work(model, data, tmp_path):
    for count, message in ((0, "must be positive"), (-1, "must be positive"), (2.5, "whole number")):
        with pytest.raises(AttributionError, match=message):
            CandidatesConfig("pixel", count)
    for name, message in (("pixel+", "has an empty name"), ("pixel+pixel", "names a method twice")):
        with pytest.raises(AttributionError, match=message):
            CandidatesConfig(name, 3)
    method = _reranked(model, data, 13, tmp_path / "cache")
    with pytest.raises(AttributionError, match="13 candidates of 12 training images"):
        method.prepare()
    assert not (tmp_path / "cache").exists()  # refused before the Fisher or any loss pass
    with pytest.raises(AttributionError, match="no such method attached"):
        Unlearning(_config(CandidatesConfig("pixel", 3)), model, data).prepare()
    with pytest.raises(AttributionError, match="unknown method 'pixels'"):
        cfg = _config(CandidatesConfig("pixels", 3))
        build_method(Unlearning, cfg, SimpleNamespace(), model, data, lambda name: None)
    with pytest.raises(AttributionError, match="another method than the exact one"):
        Unlearning(_config(CandidatesConfig("unlearning", 3)), model, data).use_candidates(
            Unlearning(_config(), model, data)
        )


def test_the_driver_scores_the_candidates_its_flags_name(tmp_path):
    from common.driver import command

    attribute = command("tests.test_driver:InMemory", "attribute")
    small = ["--fisher.num_samples", "32", "--loss.num_timesteps", "4", "--unlearn.batch_size", "8"]
    flags = ["--out", str(tmp_path), "--device", "cpu", "--no-plot", *small, "--unlearn.accumulations", "2"]
    attribute([*flags, "--tag", "exact"])
    attribute([*flags, "--tag", "fast", "--candidates.method", "pixel", "--candidates.count", "0.4"])
    attribute([*flags, "--method", "pixel"])
    for q in ("q3", "q7"):
        exact, fast = (np.load(tmp_path / tag / q / "scores.npy") for tag in ("exact", "fast"))
        picked = top_candidates(np.load(tmp_path / "pixel" / q / "scores.npy"), 4)  # 0.4 of 10 images
        stats = json.loads((tmp_path / "fast" / q / "ranking.json").read_text())["stats"]
        assert stats["candidates"]["indices"] == picked.tolist()
        np.testing.assert_allclose(fast[picked], exact[picked], rtol=1e-6, atol=0)
        assert np.sort(np.argsort(-fast)[:4]).tolist() == picked.tolist()
    assert (tmp_path / "cache" / "pixel").is_dir()  # the candidate method's cache, shared with its own runs


def test_a_cheap_method_without_its_weights_is_one_line_before_any_work(tmp_path, capsys):
    from common.driver import command

    attribute = command("tests.test_driver:InMemory", "attribute")
    flags = ["--out", str(tmp_path), "--device", "cpu", "--no-plot", "--fisher.num_samples", "32"]
    missing = str(tmp_path / "no-dino")
    with pytest.raises(SystemExit):
        attribute([*flags, "--candidates.method", "dino", "--candidates.count", "0.4", "--dino.weights", missing])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"error: DINO weights '{missing}' not found: pass --dino.weights PATH")
    assert not list(tmp_path.rglob("fisher*")) and not list(tmp_path.rglob("base_losses"))  # no Fisher, no losses


def test_queries_scored_in_one_pass_keep_their_own_candidates(model, data, query, tmp_path):
    other = Query("q1", data.images(torch.tensor([8]))[0].clone(), data.text(torch.tensor([8]), 1).clone(), "another")
    alone = {q.id: _reranked(model, data, 4, tmp_path / "alone").score_flips(q) for q in (query, other)}
    cfg = _config(CandidatesConfig("pixel", 4))
    cfg.scoring.query_batch_size = 2  # one pass over the union of both queries' candidates
    together = Unlearning(cfg, model, data, tmp_path / "together")
    together.use_candidates(Pixel(PixelConfig(), model, data))
    results = list(together.score_many([query, other]))
    assert [q.id for q, _, _ in results] == ["q0", "q1"]
    for q, scores, stats in results:
        np.testing.assert_array_equal(scores, alone[q.id][0])
        assert stats["candidates"] == alone[q.id][1]["candidates"]
    assert alone["q0"][1]["candidates"]["indices"] != alone["q1"][1]["candidates"]["indices"]


def test_a_fast_path_is_measured_against_the_exact_scores_by_hand():
    from common.evaluation.agreement import against_exact

    exact = np.arange(300, 0, -1, dtype=np.float64)  # image i scores 300 - i: the exact order is 0, 1, 2, ...
    fast = exact.copy()
    fast[9] = -1.0  # image 9 leaves the fast top-10, image 10 enters it
    fast[[0, 1, 2]] = [298.5, 298.7, 300.5]  # the exact top 3 (1% of 300), in the reverse order
    assert against_exact(exact, fast) == {"top10": 0.9, "top_fraction": 1.0, "spearman_top_fraction": -1.0}
    assert against_exact(exact, exact, 0.02) == {"top10": 1.0, "top_fraction": 1.0, "spearman_top_fraction": 1.0}
    with pytest.raises(AttributionError, match="different training sets"):
        against_exact(exact, fast[:10])
    with pytest.raises(AttributionError, match="fraction must lie"):
        against_exact(exact, fast, 0.0)
