"""The tiny benchmark's report tools: self-attribution summaries, the step-size sweep and the comparison table."""

import json
import subprocess
import sys

import pytest

from tiny.evaluate import rank_of, self_attribution_summary, table
from tiny.sweep import best, sweep_table


def _report(ranks, step, update=0.02, n=500):
    return {
        "method": "unlearning",
        "num_train": n,
        "settings": {"unlearn": {"step_size": step, "selection": "cross-attn-kv"}},
        "self_attribution": self_attribution_summary(ranks, n),
        "semantic": {},
        "stats": {"seconds_per_query": 2.0, "relative_update_mean": update},
        "seconds_prepare": 10.0,
    }


def test_rank_counts_ties_against_the_image():
    import numpy as np

    assert rank_of(np.array([0.5, 0.9, 0.5, 0.1]), 0) == 3  # ties with index 2 count against it
    assert rank_of(np.array([0.5, 0.9, 0.5, 0.1]), 1) == 1


def test_self_attribution_summary_by_hand():
    s = self_attribution_summary([1, 3, 12, 400], 500)
    assert s["top1"] == 0.25 and s["top10"] == 0.5 and s["median_rank"] == 7.5
    assert s["top_0.5%_cutoff"] == 2 and s["top_0.5%"] == 0.25


def test_sweep_picks_the_lowest_median_rank_then_top10():
    reports = {
        "a": _report([1, 2, 50, 60], 1e-4),  # median 26
        "b": _report([5, 6, 7, 8], 4e-4),  # median 6.5, top-10 100%
        "c": _report([1, 1, 12, 13], 1.6e-3),  # median 6.5, top-10 50%
    }
    assert best(reports) == "b"
    text = sweep_table("kv", reports, "b")
    rows = [line for line in text.splitlines() if line.startswith("| 0")]
    assert [r.split(" | ")[0] for r in rows] == ["| 0.0001", "| 0.0004 **(chosen)**", "| 0.0016"]
    assert "end of the grid" not in text
    assert "end of the grid" in sweep_table("kv", reports, "a")


def test_sweep_command_prints_the_step_size_and_refuses_missing_reports(tmp_path):
    for tag, ranks, step in [("x1", [30, 40], 1e-5), ("x2", [2, 3], 1e-4)]:
        (tmp_path / tag).mkdir()
        (tmp_path / tag / "report.json").write_text(json.dumps(_report(ranks, step)))
    cmd = [sys.executable, "-m", "tiny.sweep", "--out", str(tmp_path), "--name", "kv", "--tags"]
    done = subprocess.run(cmd + ["x1", "x2"], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "0.0001"
    assert "### kv" in (tmp_path / "sweep.md").read_text()
    bad = subprocess.run(cmd + ["x1", "x3"], capture_output=True, text=True)
    assert bad.returncode != 0 and bad.stderr.strip().splitlines()[-1].startswith("error: no report for x3")


@pytest.mark.parametrize("with_note", [True, False])
def test_comparison_keeps_a_row_for_a_missing_report(tmp_path, with_note):
    (tmp_path / "kv").mkdir()
    (tmp_path / "kv" / "report.json").write_text(json.dumps(_report([1, 3], 2e-4)))
    notes = {"clip": "no weights"} if with_note else {}
    text = table(tmp_path, ["kv", "clip"], notes)
    assert "| kv | 50% | 100% | 2 |" in text
    assert f"| clip | {'no weights' if with_note else 'not run'} |" in text
    assert text.endswith("N = 500.")  # no generated queries: no base rates


def test_average_ranks_and_spearman_by_hand():
    import numpy as np

    from common.evaluation.agreement import average_ranks, ranking_agreement, spearman

    assert average_ranks(np.array([10.0, 20.0, 20.0, 5.0])).tolist() == [2.0, 3.5, 3.5, 1.0]
    a = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    assert spearman(a, a * 7 + 1) == pytest.approx(1.0) and spearman(a, -a) == pytest.approx(-1.0)
    # d = rank differences (0, 0, 1, -1, 0): rho = 1 - 6 * 2 / (5 * 24) = 0.9
    assert spearman(a, np.array([1.0, 2.0, 4.0, 3.0, 5.0])) == pytest.approx(0.9)
    assert np.isnan(spearman(a, np.ones(5)))
    b = np.array([5.0, 4.0, 3.0, 2.0, 1.0])  # top-2 of a: {4, 3}; of b: {0, 1}
    got = ranking_agreement(a, b, ks=(2, 5))
    assert got["top2"] == 0.0 and got["top5"] == 1.0 and got["spearman"] == pytest.approx(-1.0)
    with pytest.raises(Exception, match="different training sets"):
        ranking_agreement(a, np.ones(4))


def test_agreement_command_compares_shared_query_folders(tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    base = rng.normal(size=300)
    for run, noise in (("a", 0.0), ("b", 0.05)):
        for part, q in (("self", "train00001"), ("generated", "g000"), ("generated", "g001")):
            folder = tmp_path / run / part / q
            folder.mkdir(parents=True)
            np.save(folder / "scores.npy", base + noise * rng.normal(size=300) + (q == "g001") * rng.normal(size=300))
            (folder / "ranking.json").write_text(json.dumps({"model_fingerprint": "m"}))
    (tmp_path / "a" / "self" / "only_in_a").mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "tiny.agreement", str(tmp_path / "a"), str(tmp_path / "b"), "--name", "x"],
        capture_output=True,
        text=True,
        check=True,
    )
    row = done.stdout.strip().splitlines()[-1]
    assert row.startswith("| x | 3 | ")
    record = json.loads((tmp_path / "a" / "agreement.jsonl").read_text().splitlines()[-1])
    assert set(record["queries"]) == {"self/train00001", "generated/g000", "generated/g001"}
    assert record["queries"]["generated/g000"]["spearman"] > 0.99
    assert record["queries"]["generated/g001"]["spearman"] < 0.9  # b's g001 has independent noise added
    assert record["summary"]["top10"]["n"] == 3
    generated = subprocess.run(
        [sys.executable, "-m", "tiny.agreement", str(tmp_path / "a"), str(tmp_path / "b"), "--part", "generated"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert generated.stdout.strip().splitlines()[-1].startswith("| a vs b (generated) | 2 | ")
    record = json.loads((tmp_path / "a" / "agreement.jsonl").read_text().splitlines()[-1])
    assert set(record["queries"]) == {"generated/g000", "generated/g001"} and record["part"] == "generated"
    smaller = tmp_path / "c" / "generated" / "g001"  # a run on fewer queries: --like compares only those
    smaller.mkdir(parents=True)
    np.save(smaller / "scores.npy", base)
    like = subprocess.run(
        [
            sys.executable,
            "-m",
            "tiny.agreement",
            str(tmp_path / "a"),
            str(tmp_path / "b"),
            "--like",
            str(tmp_path / "c"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert like.stdout.strip().splitlines()[-1].startswith("| a vs b | 1 | ")
    record = json.loads((tmp_path / "a" / "agreement.jsonl").read_text().splitlines()[-1])
    assert set(record["queries"]) == {"generated/g001"}
    (tmp_path / "b" / "generated" / "g000" / "ranking.json").write_text(json.dumps({"model_fingerprint": "other"}))
    bad = subprocess.run(
        [sys.executable, "-m", "tiny.agreement", str(tmp_path / "a"), str(tmp_path / "b")],
        capture_output=True,
        text=True,
    )
    assert bad.stderr.strip().splitlines()[-1] == "error: g000: the two rankings come from different models"


def test_average_command_means_the_scores_of_shared_queries(tmp_path):
    import numpy as np

    from tiny.shapes import generate

    generate(tmp_path / "data", 30, resolution=8, seed=1)
    rng = np.random.default_rng(0)
    kept = {}
    for run in ("a", "b"):
        for q in ("g000", "g001") if run == "a" else ("g000",):
            folder = tmp_path / run / "generated" / q
            folder.mkdir(parents=True)
            scores = rng.normal(size=30)
            kept[(run, q)] = scores
            np.save(folder / "scores.npy", scores.astype(np.float32))
            top = [
                {"rank": r + 1, "index": int(i), "score": float(scores[i]), "caption": "", "image": ""}
                for r, i in enumerate(np.argsort(-scores)[:5])
            ]
            ranking = {"schema": 2, "query": {"id": q}, "method": "unlearning", "num_train": 30}
            ranking |= {"train_fingerprint": "d", "model_fingerprint": "m", "top_k": top}
            (folder / "ranking.json").write_text(json.dumps(ranking))
    cmd = [sys.executable, "-m", "tiny.average", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "ab")]
    done = subprocess.run(cmd + [str(tmp_path / "a"), str(tmp_path / "b")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    mean = np.load(tmp_path / "ab" / "generated" / "g000" / "scores.npy")
    want = (kept[("a", "g000")].astype(np.float32) + kept[("b", "g000")].astype(np.float32)) / 2
    assert np.allclose(mean, want, atol=1e-6) and not (tmp_path / "ab" / "generated" / "g001").exists()
    ranking = json.loads((tmp_path / "ab" / "generated" / "g000" / "ranking.json").read_text())
    best = int(np.argmax(want))
    assert ranking["top_k"][0]["index"] == best and ranking["model_fingerprint"] == "m"
    assert ranking["top_k"][0]["caption"].startswith("a ")  # from the data folder's metadata
    ranking["model_fingerprint"] = "other"
    (tmp_path / "b" / "generated" / "g000" / "ranking.json").write_text(json.dumps(ranking))
    bad = subprocess.run(cmd + [str(tmp_path / "a"), str(tmp_path / "b")], capture_output=True, text=True)
    assert "another model fingerprint than" in bad.stderr.strip().splitlines()[-1]


def _shapes_folder(path, attrs):
    path.mkdir(parents=True)
    keys = ("shape", "colour", "size", "position", "background")
    lines = [
        json.dumps({"file_name": f"images/{i:05d}.png", "text": "x", "attributes": dict(zip(keys, a))})
        for i, a in enumerate(attrs)
    ]
    (path / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def test_neighbour_shares_and_base_rates_by_hand(tmp_path):
    from common.errors import AttributionError
    from common.outputs import SCHEMA_VERSION
    from tiny.data import read_attributes
    from tiny.neighbours import base_rates, neighbour_shares

    # 4 images: 0 and 1 red squares on black; 2 a red square on white; 3 a blue circle on black.
    attrs = [
        ("square", "red", "s", "top", "black"),
        ("square", "red", "s", "top", "black"),
        ("square", "red", "l", "top", "white"),
        ("circle", "blue", "l", "mid", "black"),
    ]
    _shapes_folder(tmp_path / "data", attrs)
    got = read_attributes(tmp_path / "data")
    folder = tmp_path / "run" / "self" / "train00000"
    folder.mkdir(parents=True)
    top = [
        {"rank": r, "index": i, "score": 1.0 - r / 10, "caption": "x", "image": "x"}
        for r, i in enumerate([0, 3, 2, 1], 1)
    ]  # the image itself first: skipped
    ranking = {
        "schema": SCHEMA_VERSION,
        "query": {"id": "train00000"},
        "method": "m",
        "num_train": 4,
        "train_fingerprint": "d",
        "model_fingerprint": "m",
        "top_k": top,
    }
    (folder / "ranking.json").write_text(json.dumps(ranking))
    shares = neighbour_shares(tmp_path / "run", got, k=2)  # the two best others: 3, then 2
    assert shares == {"shape+colour": 0.5, "background": 0.5, "size": 0.0, "position": 0.5, "queries": 1}
    # Ordered pairs with the same label over 4 * 3: shape+colour {0,1,2} -> 6/12; background {0,1,3} -> 6/12;
    # size {0,1}, {2,3} -> 4/12; position {0,1,2} -> 6/12.
    assert base_rates(got) == pytest.approx({"shape+colour": 0.5, "background": 0.5, "size": 1 / 3, "position": 0.5})
    with pytest.raises(AttributionError, match="lists fewer than 5 images"):
        neighbour_shares(tmp_path / "run", got, k=4)  # only 3 others listed
