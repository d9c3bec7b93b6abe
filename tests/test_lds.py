"""The linear datamodeling score against hand-computed values; its subsets drawn from a seed, stored and checked."""

from __future__ import annotations

import json

import numpy as np
import pytest

from common.errors import AttributionError
from common.evaluation import lds

MASKS = np.array([[1, 1, 0, 0], [0, 1, 1, 0], [1, 0, 1, 1]], dtype=bool)  # 3 subsets of 4 images


def test_lds_against_a_hand_computed_example():
    scores = {"q0": np.array([3.0, 1.0, 0.0, -1.0]), "q1": np.array([0.0, 0.0, 1.0, 2.0]), "q2": np.ones(4)}
    assert lds.predicted_outputs(scores["q0"], MASKS).tolist() == [4.0, 1.0, 2.0]
    losses = {
        "q0": np.array([[0.1, 0.1], [0.4, 0.6], [0.2, 0.4]]),  # 2 training seeds: mean 0.1, 0.5, 0.3
        "q1": np.array([0.2, 0.4, 0.6]),
        "q2": np.array([0.3, 0.2, 0.1]),
    }
    per_query = lds.lds_per_query(scores, MASKS, losses)
    # q0: g = 4, 1, 2 and f = -0.1, -0.5, -0.3 share their order; q1: g = 0, 1, 3 against f falling: -1;
    # q2: g = 2, 2, 3 (ranks 1.5, 1.5, 3) against f = -0.3, -0.2, -0.1: 1.5 / sqrt(1.5 * 2)
    assert per_query["q0"] == pytest.approx(1.0) and per_query["q1"] == pytest.approx(-1.0)
    assert per_query["q2"] == pytest.approx(1.5 / np.sqrt(3.0))
    summary = lds.lds_summary({"q0": per_query["q0"], "q1": per_query["q1"]})
    assert summary["mean"] == pytest.approx(0.0) and summary["se"] == pytest.approx(1.0)  # sd sqrt(2) over 2
    assert lds.bootstrap_interval({"q0": scores["q0"]}, MASKS, losses, draws=50) == (1.0, 1.0)
    assert lds.seed_agreement({"q0": losses["q0"]}) == {"q0": pytest.approx(1.0)}  # seeds 0.1, 0.4, 0.2 | .1, .6, .4
    assert lds.seed_agreement({"q0": np.array([[0.1, 0.3], [0.2, 0.2], [0.3, 0.1]])}) == {"q0": pytest.approx(-1.0)}
    assert lds.seed_agreement(losses) is None  # q1 and q2 were measured with one seed
    low, high = lds.bootstrap_interval(scores, MASKS, losses, draws=200)
    assert -1.0 <= low <= high <= 1.0


def test_centring_removes_what_a_subset_does_to_every_query_alike():
    shared = np.array([3.0, 1.0, 0.0, -1.0])  # the same scores for both queries (as random's are): g = 4, 1, 2
    scores = {"q0": shared, "q1": shared}
    losses = {"q0": np.array([0.1, 0.2, 0.3]), "q1": np.array([0.3, 0.5, 0.4])}
    # f = -loss; each subset's mean over the two queries is -0.2, -0.35, -0.35: centred, q0 = 0.1, 0.15, 0.05 and q1
    # its negative, so a score shared by both queries correlates with one as much as against the other
    assert lds.lds_per_query(scores, MASKS, losses) == pytest.approx({"q0": 0.5, "q1": 1.0})
    assert lds.lds_per_query(scores, MASKS, losses, centred=True) == pytest.approx({"q0": -0.5, "q1": 0.5})
    with pytest.raises(AttributionError, match="centring over queries needs at least 2 queries, got 1"):
        lds.lds_per_query({"q0": shared}, MASKS, {"q0": losses["q0"]}, centred=True)
    table = lds.lds_table({"shared": scores}, MASKS, losses, lds.LdsConfig(count=3, bootstrap=20))
    assert table["query_correlation"] == pytest.approx(0.5)  # f: (-0.1, -0.2, -0.3) against (-0.3, -0.5, -0.4)
    assert table["rows"]["shared"]["summary"]["mean"] == pytest.approx(0.75)
    assert table["rows"]["shared"]["centred"]["summary"]["mean"] == pytest.approx(0.0)
    assert "| shared | 0.750 ± 0.250 |" in lds.markdown(table) and 0 < table["rows"]["shared"]["p"] <= 1
    single = lds.lds_table({"shared": {"q0": shared}}, MASKS, {"q0": losses["q0"]}, lds.LdsConfig(count=3, bootstrap=5))
    assert "centred" not in single["rows"]["shared"] and "| – | – | – | 1 |" in lds.markdown(single)


def test_the_p_value_relabels_the_images_once_for_every_query():
    masks = np.array([[1, 0], [0, 1], [1, 0], [0, 1]], dtype=bool)  # 4 subsets, each holding one of 2 images
    scores = np.array([1.0, 0.0])  # g = 1, 0, 1, 0: the identity gives LDS 1 on q0, the swap -1, each half the time
    losses = {"q0": np.array([0.1, 0.3, 0.1, 0.3]), "q1": np.array([0.3, 0.1, 0.3, 0.1])}
    p = lds.permutation_p({"q0": scores}, masks, losses, draws=2000, chunk=7)
    assert 0.45 < p < 0.55
    # q1's output is q0's reversed: the mean over both is 0 under either relabelling when one permutation serves both
    # queries (p = 1); relabelling each query on its own would reach it only 3 times in 4
    assert lds.permutation_p({"q0": scores, "q1": scores}, masks, losses, draws=500) == 1.0
    perfect = lds.permutation_p({"q0": np.arange(8.0)}, np.eye(8, dtype=bool), {"q0": -np.arange(8.0)}, draws=300)
    assert perfect == pytest.approx(1 / 301)  # one subset per image: only the identity (1 in 8!) reaches LDS 1
    with pytest.raises(AttributionError, match="at least 1 relabelling, got 0"):
        lds.LdsConfig(permutations=0)


def test_subsets_are_drawn_from_their_seed_stored_and_refused_when_drawn_otherwise(tmp_path):
    first = lds.subsets(tmp_path / "s", 50, 8, 0.5, 3, "train-a")
    assert first.shape == (8, 50) and (first.sum(axis=1) == 25).all() and len({r.tobytes() for r in first}) == 8
    assert np.array_equal(lds.draw_subsets(50, 8, 0.5, 3), first)
    assert not np.array_equal(lds.draw_subsets(50, 8, 0.5, 4), first)
    (tmp_path / "s" / "subsets.npy").write_bytes(b"")  # read back, not drawn again, when the identity matches
    with pytest.raises(AttributionError, match="subsets.npy is damaged"):
        lds.subsets(tmp_path / "s", 50, 8, 0.5, 3, "train-a")
    lds.store_subsets(tmp_path / "s", first, {"num_train": 50, "count": 8, "fraction": 0.5, "seed": 3,
                                               "train_fingerprint": "train-a"})  # fmt: skip
    with pytest.raises(AttributionError, match=r"drawn otherwise \(seed, train_fingerprint differ\)"):
        lds.subsets(tmp_path / "s", 50, 8, 0.5, 4, "train-b")


def test_a_later_run_may_ask_for_more_subsets_or_fewer_and_keeps_the_first(tmp_path):
    first = lds.subsets(tmp_path / "s", 50, 3, 0.5, 3, "train-a")
    more = lds.subsets(tmp_path / "s", 50, 5, 0.5, 3, "train-a")
    assert more.shape == (5, 50) and np.array_equal(more[:3], first)
    assert np.load(tmp_path / "s" / "subsets.npy").shape == (5, 50)
    assert json.loads((tmp_path / "s" / "subsets.json").read_text())["count"] == 5
    fewer = lds.subsets(tmp_path / "s", 50, 2, 0.5, 3, "train-a")
    assert np.array_equal(fewer, first[:2]) and np.load(tmp_path / "s" / "subsets.npy").shape == (5, 50)
    np.save(tmp_path / "s" / "subsets.npy", ~more)  # stored masks that the seed does not draw: refused, kept
    with pytest.raises(AttributionError, match="does not hold the subsets its seed draws here"):
        lds.subsets(tmp_path / "s", 50, 8, 0.5, 3, "train-a")
    assert np.array_equal(np.load(tmp_path / "s" / "subsets.npy"), ~more)


@pytest.mark.parametrize(
    ("args", "message"),
    [((10, 4, 0.0, 0), r"fraction must lie in \(0, 1\)"), ((10, 4, 1.0, 0), r"fraction must lie in \(0, 1\)"),
     ((10, 1, 0.5, 0), "at least 2 subsets"), ((10, 4, 0.01, 0), "is 0 images")],
)  # fmt: skip
def test_bad_subset_settings_are_refused(args, message):
    with pytest.raises(AttributionError, match=message):
        lds.draw_subsets(*args)


def test_measured_outputs_must_match_the_subsets():
    with pytest.raises(AttributionError, match="2 measured outputs for 3 subsets"):
        lds.lds_per_query({"q0": np.zeros(4)}, MASKS, {"q0": np.zeros(2)})
    with pytest.raises(AttributionError, match="scores of 5 images against subsets of 4"):
        lds.predicted_outputs(np.zeros(5), MASKS)
