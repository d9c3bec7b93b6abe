"""The gallery: pages over an output folder, what is missing named, and the query page in a real browser."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.gallery import main
from common.outputs import SCHEMA_VERSION

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200)]


def make_output(root: Path) -> Path:
    """An output folder as the attribute stage writes it: 2 methods, 2 queries (one method lacks q001), 5 training
    images (image 4's file is gone), a leave-K-out table and plot."""
    data, out = root / "data" / "images", root / "out"
    data.mkdir(parents=True)
    for i, colour in enumerate(COLOURS[:4]):
        Image.new("RGB", (16, 16), colour).save(data / f"{i:05d}.png")
    for qid in ("q000", "q001"):
        (root / "queries" / qid).mkdir(parents=True)
        Image.new("RGB", (16, 16), (90, 90, 90)).save(root / "queries" / qid / "image.png")
    orders = {"unlearning": {"q000": [2, 0, 4, 1], "q001": [1, 3, 0, 2]}, "pixel": {"q000": [0, 1, 2, 3]}}
    for method, by_query in orders.items():
        for qid, order in by_query.items():
            top = [{"rank": r, "index": i, "score": 1.0 - r / 10, "caption": f"shape {i}",
                    "image": str(data / f"{i:05d}.png")} for r, i in enumerate(order, 1)]  # fmt: skip
            ranking = {"schema": SCHEMA_VERSION, "method": method, "num_train": 5, "train_fingerprint": "t",
                       "model_fingerprint": "m", "top_k": top,
                       "query": {"id": qid, "prompt": f"prompt of {qid}", "image": str(root / "queries" / qid /
                                                                                    "image.png")}}  # fmt: skip
            (out / method / qid).mkdir(parents=True)
            (out / method / qid / "ranking.json").write_text(json.dumps(ranking))
    (out / "leave_k_out").mkdir()
    (out / "leave_k_out" / "table.md").write_text("K = 20\n\n| method | ΔL |\n|---|---|\n| **unlearning** | 6.2 |\n")
    Image.new("RGB", (40, 30), (255, 255, 255)).save(out / "leave_k_out" / "delta_loss.png")
    return out


def test_pages_show_every_ranking_and_name_what_is_missing(tmp_path, capsys):
    out = make_output(tmp_path)
    main([str(out), "--k", "3"])
    printed = capsys.readouterr().out
    assert "2 queries, 2 methods, 5 images" in printed and "2 missing" in printed
    index = (out / "gallery" / "index.html").read_text()
    assert index.count('class="query-card"') == 2 and "prompt of q001" in index
    assert "pixel: no ranking for query q001" in index and "training image 4:" in index  # named, not fatal
    assert "<td><b>unlearning</b></td>" in index and 'src="../leave_k_out/delta_loss.png"' in index
    page = (out / "gallery" / "queries" / "q000.html").read_text()
    assert page.count('class="entry"') == 6  # the top 3 of both methods
    assert page.count('class="thumb missing"') == 1  # unlearning's third, image 4
    assert "no ranking for this query" in (out / "gallery" / "queries" / "q001.html").read_text()
    thumbs = sorted((out / "gallery" / "thumbs").glob("*.png"))
    assert len(thumbs) == 6 and all(Image.open(t).size == (96, 96) for t in thumbs)  # 4 training images, 2 queries
    image_pages = list((out / "gallery" / "images").glob("*.html"))
    image0 = next(p.read_text() for p in image_pages if "Training image 0<" in p.read_text())
    assert len(re.findall(r"<tr><td><a href=", image0)) == 3  # q000 by both methods, q001 by unlearning
    links = re.findall(r'(?:href|src)="([^"#]+)', page)
    assert all(not link.startswith(("/", "http")) for link in links)  # relative links only
    assert all((out / "gallery" / "queries" / link).resolve().exists() for link in links)
    stamp = thumbs[0].stat().st_mtime_ns
    main([str(out), "--k", "3"])  # thumbnails made once
    assert thumbs[0].stat().st_mtime_ns == stamp


def test_methods_are_chosen_and_ordered_by_pattern(tmp_path, capsys):
    out = make_output(tmp_path)
    main([str(out), "--methods", "unl*", "pixel"])
    page = (out / "gallery" / "queries" / "q000.html").read_text()
    assert re.findall(r'data-method="(\w+)"', page) == ["unlearning", "pixel"]
    with pytest.raises(SystemExit):
        main([str(out), "--methods", "trak"])
    assert capsys.readouterr().err.strip().endswith("--methods trak: no such method folder in " + str(out) +
                                                    " (it has pixel, unlearning)")  # fmt: skip


def test_a_folder_without_rankings_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path)])
    assert stop.value.code == 2
    assert (
        capsys.readouterr().err.strip()
        == f"error: {tmp_path} holds no rankings (no <method>/<query id>/ranking.json under it)"
    )
    assert not (tmp_path / "gallery").exists()


def test_the_query_page_in_a_browser_switches_methods_and_k(tmp_path):
    if shutil.which("chromium") is None:
        assert not os.environ.get("REQUIRE_BROWSER"), "headless Chromium is missing (.ci/run installs it)"
        pytest.skip("needs headless Chromium (the Debian package chromium; .ci/run installs it)")
    out = make_output(tmp_path)
    main([str(out), "--k", "3"])
    page = (out / "gallery" / "queries" / "q000.html").as_uri()

    def browse(fragment: str, *extra: str) -> subprocess.CompletedProcess:
        command = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
                   "--window-size=1000,700", *extra, f"{page}#{fragment}"]  # fmt: skip
        return subprocess.run(command, capture_output=True, text=True, timeout=120)

    every = browse("", "--dump-dom")
    assert 'data-shown="6"' in every.stdout and ":CONSOLE" not in every.stderr  # no script error or message
    one = browse("methods=pixel&k=1", "--dump-dom")  # the choices the address keeps
    assert 'data-shown="1"' in one.stdout and ":CONSOLE" not in one.stderr
    sections = dict(re.findall(r'<section class="method" data-method="(\w+)"( hidden="")?', one.stdout))
    assert sections == {"unlearning": ' hidden=""', "pixel": ""}
    shot = browse("", f"--screenshot={tmp_path / 'query.png'}")
    assert shot.returncode == 0 and Image.open(tmp_path / "query.png").size == (1000, 700)
    pixels = np.asarray(Image.open(tmp_path / "query.png").convert("RGB")).reshape(-1, 3)
    assert (np.abs(pixels.astype(int) - COLOURS[2]).sum(axis=1) < 10).sum() > 500  # the thumbnails were drawn
