"""The fast-path table: each fast run against exact query by query, its cost, the floor rows beside."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from common.errors import AttributionError
from common.evaluation import fast_paths


def _run(folder: Path, scores: dict[str, np.ndarray], seconds: float, score_forwards: int | None, model="m0") -> Path:
    for name, s in scores.items():
        (folder / name).mkdir(parents=True)
        np.save(folder / name / "scores.npy", s)
        stats = {"seconds_query": seconds}
        if score_forwards is not None:
            stats["forwards"] = {"unlearn": 16, "score": score_forwards}
        (folder / name / "ranking.json").write_text(json.dumps({"model_fingerprint": model, "stats": stats}))
    return folder


@pytest.fixture
def runs(tmp_path: Path) -> dict[str, Path]:
    exact = {"q0": np.arange(200, 0, -1, dtype=np.float64), "q1": np.arange(200, dtype=np.float64)}
    fast = {k: v.copy() for k, v in exact.items()}
    fast["q0"][[0, 1]] = [199.5, 200.5]  # q0's exact top 2 (1% of 200) swapped: Spearman -1, recall kept
    fast["q1"][199] = -1.0  # q1's exact top-1 falls out: top-10 9 of 10, top 2 1 of 2
    floor = {"q0": exact["q0"], "q1": exact["q1"], "q2": exact["q1"]}  # q2 only here: not compared
    return {
        "exact": _run(tmp_path / "exact", exact, 10.0, 4000),
        "fast": _run(tmp_path / "fast", fast, 1.0, 400),
        "floor": _run(tmp_path / "floor", floor, 12.0, 4000),
    }


def test_each_run_is_measured_against_exact_per_query_and_costed_from_its_stats(runs):
    table = fast_paths.fast_path_table(runs["exact"], {"fast": runs["fast"]}, [runs["floor"]])
    assert table["queries"] == ["q0", "q1"]
    rows = table["rows"]
    assert list(rows) == ["exact", "exact, other seeds 1", "fast"]
    assert rows["exact"]["cost"]["score_forwards"] == 4000 and rows["exact"]["cost"]["seconds"] == 10.0
    fast = rows["fast"]
    assert fast["kind"] == "fast" and fast["cost"]["score_forwards"] == 400 and fast["cost"]["unlearn_passes"] == 16
    assert fast["queries"]["q0"] == {"top10": 1.0, "top_fraction": 1.0, "spearman_top_fraction": -1.0}
    assert fast["queries"]["q1"]["top10"] == 0.9 and fast["queries"]["q1"]["top_fraction"] == 0.5
    assert fast["queries"]["q1"]["spearman_top_fraction"] == -1.0  # 199 then 198 exact; -1 then 198 fast
    assert fast["summary"]["top10"]["mean"] == pytest.approx(0.95)
    assert fast["summary"]["top10"]["se"] == pytest.approx(0.05)
    assert rows["exact, other seeds 1"]["summary"]["top10"]["mean"] == 1.0
    text = fast_paths.markdown(table)
    assert "| fast | 400 | 16 | 1.0 | 95% ± 5% | 75% ± 25% | -1.00 ± 0.00 |" in text
    assert "| *exact, other seeds 1* | 4,000 | 16 | 12.0 | 100% ± 0% |" in text


def test_a_run_without_forward_counts_shows_a_dash_and_the_cli_writes_table_and_values(runs, tmp_path, monkeypatch):
    old = _run(tmp_path / "old", {"q0": np.arange(200.0), "q1": np.arange(200.0)}, 5.0, None)
    out = tmp_path / "table" / "fast_paths.md"
    argv = ["fast_paths", "--exact", str(runs["exact"]), "--runs", f"old run={old}", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    fast_paths.main()
    assert "| old run | – | – | 5.0 |" in out.read_text()
    values = json.loads(out.with_suffix(".json").read_text())
    assert values["rows"]["old run"]["queries"]["q1"]["top10"] == 1.0


def test_bad_input_is_refused_in_one_line(runs, tmp_path):
    other = _run(tmp_path / "other", {"q0": np.arange(200.0)}, 1.0, 10, model="m1")
    with pytest.raises(AttributionError, match="different models"):
        fast_paths.fast_path_table(runs["exact"], {"other": other})
    with pytest.raises(AttributionError, match="not a method output folder"):
        fast_paths.fast_path_table(runs["exact"], {"gone": tmp_path / "gone"})
    with pytest.raises(AttributionError, match="NAME=FOLDER"):
        fast_paths.parse_runs(["no-folder"])
    with pytest.raises(AttributionError, match="twice"):
        fast_paths.parse_runs(["a=x", "a=y"])
    with pytest.raises(AttributionError, match="fraction"):
        fast_paths.fast_path_table(runs["exact"], {"fast": runs["fast"]}, fraction=1.5)
