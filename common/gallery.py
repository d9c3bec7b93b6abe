"""A static gallery of an output folder: ``python -m common.gallery OUT`` writes ``OUT/gallery/index.html``.

Every ``ranking.json`` under OUT is read (any benchmark's layout: ``<method folder>/<query id>/ranking.json``, method
folders named by their path under OUT). The pages:

- ``index.html``: every query (its image, prompt and page), then the evaluation tables found in OUT (leave-K-out,
  LDS, retrieval, comparisons, fast paths) with their plots;
- ``queries/<id>.html``: the query's image and prompt beside each method's top-K (thumbnail, rank, score, caption),
  methods and K switchable (kept in the address, e.g. ``#methods=pixel,unlearning&k=5``);
- ``images/<id>.html``: one training image, and the queries whose top-K (the gallery's largest K) it is in.

Plain HTML, CSS and a little JavaScript, relative links only: it opens from the file system and from
``python -m http.server``, with no network access. Thumbnails are made once (``thumbs/``, kept across runs).
What is missing (a method without a query's ranking, an image not found) is shown where it would be and listed
on the index page.
"""

from __future__ import annotations

import argparse
import fnmatch
import html
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
from PIL import Image

from common.errors import AttributionError, cli, require
from common.fingerprints import digest
from common.outputs import read_ranking

SKIP = {"gallery", "cache", "models", "thumbs"}  # folders of an output that hold no rankings to show
TABLES = ("table.md", "lds.md", "retrieval.md", "comparison.md", "fast_paths.md", "paper.md", "fast_vs_exact.md")
PLOTS = ("delta_loss.png", "object_vs_style.png")
THUMB = 96  # pixels on the longer side
TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("common", "templates/gallery"), autoescape=True, keep_trailing_newline=True
)


@dataclass
class Gallery:
    """What the pages show: rankings by query and method, the images they name, and what could not be found."""

    out: Path
    k: int
    methods: list[str] = field(default_factory=list)
    queries: dict[str, dict] = field(default_factory=dict)  # id -> {"prompt", "image", "rankings": {method: [...]}}
    images: dict[str, dict] = field(default_factory=dict)  # training image key -> {"caption", "index", "thumb", ...}
    missing: list[str] = field(default_factory=list)


def find_rankings(out: Path, patterns: list[str] | None = None) -> dict[str, dict[str, Path]]:
    """Method folder (its path under OUT) -> query id -> ranking.json; with ``patterns``, only the method folders
    that match one (shell-style, e.g. ``unlearning*``), in their order."""
    found: dict[str, dict[str, Path]] = defaultdict(dict)
    for path in sorted(out.rglob("ranking.json")):
        parts = path.relative_to(out).parts
        if len(parts) < 3 or SKIP & set(parts):
            continue
        found["/".join(parts[:-2])][parts[-2]] = path
    require(bool(found), f"{out} holds no rankings (no <method>/<query id>/ranking.json under it)")
    if not patterns:
        return dict(found)
    chosen = {m: found[m] for p in patterns for m in sorted(found) if fnmatch.fnmatchcase(m, p)}
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(m, p) for m in found)]
    require(not unmatched, f"--methods {' '.join(unmatched)}: no such method folder in {out} (it has "
            f"{', '.join(sorted(found))})")  # fmt: skip
    return chosen


def resolve(path: str, roots: list[Path]) -> Path | None:
    """An image path as a ranking recorded it (relative to where the run started): found as is, under one of
    ``roots``, or by its last two parts under them (a moved output folder)."""
    candidates = [Path(path)] + [root / path for root in roots]
    candidates += [root / Path(*Path(path).parts[-n:]) for root in roots for n in (3, 2, 1)]
    return next((c for c in candidates if c.is_file()), None)


def thumbnail(source: Path | None, folder: Path) -> str | None:
    """A thumbnail of ``source`` in ``folder`` (made once; small images are enlarged without smoothing)."""
    if source is None:
        return None
    target = folder / f"{digest(str(source.resolve()))}.png"
    if not target.is_file() or target.stat().st_mtime < source.stat().st_mtime:
        with Image.open(source) as image:
            image = image.convert("RGB")
            scale = THUMB / max(image.size)
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            resample = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS
            folder.mkdir(parents=True, exist_ok=True)
            image.resize(size, resample).save(target)
    return target.name


def collect(out: Path, k: int, roots: list[Path], patterns: list[str] | None = None) -> Gallery:
    """Read the rankings under ``out`` (those of the method folders ``patterns`` match) and make the thumbnails of
    the images their first ``k`` entries name."""
    gallery = Gallery(out, k)
    thumbs = out / "gallery" / "thumbs"
    found = find_rankings(out, patterns)
    gallery.methods = list(found)
    for method, by_query in found.items():
        for qid, path in sorted(by_query.items()):
            try:
                ranking = read_ranking(path)
            except AttributionError as err:  # a damaged file is named, the rest still shown
                gallery.missing.append(f"{method}: query {qid}'s ranking is unreadable ({err})")
                continue
            query = gallery.queries.setdefault(qid, {"prompt": "", "thumb": None, "rankings": {}})
            info = ranking.get("query") or {}
            query["prompt"] = query["prompt"] or info.get("prompt", "")
            if query["thumb"] is None and info.get("image"):
                source = resolve(info["image"], roots + [path.parent])
                query["thumb"] = thumbnail(source, thumbs)
                if source is None:
                    gallery.missing.append(f"query {qid}: image {info['image']} not found")
            entries = []
            for entry in ranking["top_k"][:k]:
                source = resolve(entry["image"], roots) if entry.get("image") else None
                key = digest(str(source.resolve())) if source else f"missing-{digest(str(entry.get('image')))}"
                if key not in gallery.images:
                    gallery.images[key] = {"index": entry["index"], "caption": entry.get("caption", ""),
                                           "thumb": thumbnail(source, thumbs), "path": entry.get("image"),
                                           "queries": []}  # fmt: skip
                    if source is None:
                        gallery.missing.append(f"training image {entry['index']}: {entry.get('image')} not found")
                gallery.images[key]["queries"].append((qid, method, entry["rank"]))
                entries.append(entry | {"key": key})
            query["rankings"][method] = entries
    for qid, query in gallery.queries.items():
        for method in gallery.methods:
            if method not in query["rankings"]:
                gallery.missing.append(f"{method}: no ranking for query {qid}")
    return gallery


def markdown_html(text: str) -> str:
    """The Markdown the evaluation stages write (pipe tables, headings, paragraphs) as HTML."""
    blocks, table = [], []

    def cells(line: str) -> list[str]:
        return [inline(c.strip()) for c in line.strip().strip("|").split("|")]

    def flush() -> None:
        if table:
            head, *body = [cells(r) for r in table if not re.fullmatch(r"\|?[\s|:-]+\|?", r.strip())]
            rows = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in body)
            blocks.append(f"<table><tr>{''.join(f'<th>{c}</th>' for c in head)}</tr>{rows}</table>")
            table.clear()

    for line in text.splitlines():
        if line.strip().startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith("#"):
            level = min(len(line) - len(line.lstrip("#")) + 2, 6)
            blocks.append(f"<h{level}>{inline(line.lstrip('#').strip())}</h{level}>")
        elif line.strip():
            blocks.append(f"<p>{inline(line.strip())}</p>")
    flush()
    return "\n".join(blocks)


def inline(text: str) -> str:
    """Escaped text with Markdown's bold, italics and code."""
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    text = re.sub(r"(?<!\w)\*(.+?)\*(?!\w)", r"<i>\1</i>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def evaluations(out: Path) -> list[dict]:
    """The tables and plots in ``out`` (outside the gallery and the caches), each with its path under OUT."""
    found = []
    for name in TABLES + PLOTS:
        for path in sorted(out.rglob(name)):
            rel = path.relative_to(out)
            if SKIP & set(rel.parts):
                continue
            item = {"path": rel.as_posix(), "link": "../" + rel.as_posix()}
            item["html"] = markdown_html(path.read_text()) if name.endswith(".md") else None
            found.append(item)
    return found


def write_pages(gallery: Gallery) -> Path:
    """Render the pages into ``OUT/gallery`` and return the index."""
    root = gallery.out / "gallery"
    for sub in ("queries", "images"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    ks = sorted({k for k in (1, 3, 5, 10, 20, 50, 100) if k < gallery.k} | {gallery.k})
    common = {"methods": gallery.methods, "k": gallery.k, "ks": ks, "images": gallery.images}
    for qid, query in gallery.queries.items():
        page = TEMPLATES.get_template("query.html").render(qid=qid, query=query, **common)
        (root / "queries" / f"{qid}.html").write_text(page)
    for key, image in gallery.images.items():
        page = TEMPLATES.get_template("image.html").render(key=key, image=image, queries=gallery.queries, **common)
        (root / "images" / f"{key}.html").write_text(page)
    index = TEMPLATES.get_template("index.html").render(
        out=gallery.out.as_posix(), queries=gallery.queries, missing=gallery.missing,
        evaluations=evaluations(gallery.out), **common,
    )  # fmt: skip
    (root / "index.html").write_text(index)
    return root / "index.html"


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m common.gallery", description=__doc__.split("\n")[0])
    parser.add_argument("out", help="an output folder (its rankings, tables and plots are shown)")
    parser.add_argument("--k", type=int, default=10, help="images shown per method and query (at most)")
    where = "folders to look for images in when the rankings' paths are not found (a moved run's data, queries)"
    parser.add_argument("--roots", nargs="*", default=[], help=where)
    parser.add_argument("--methods", nargs="*", default=None, help="method folders to show, in this order (shell "
                        "patterns, e.g. 'unlearning*'; default: every one)")  # fmt: skip
    args = parser.parse_args(argv)
    out = Path(args.out)
    require(out.is_dir(), f"{out} is not a folder")
    require(args.k >= 1, f"--k shows at least 1 image, got {args.k}")
    gallery = collect(out, args.k, [Path(r) for r in args.roots] + [Path.cwd(), out], args.methods)
    index = write_pages(gallery)
    print(f"{len(gallery.queries)} queries, {len(gallery.methods)} methods, {len(gallery.images)} images: {index}")
    if gallery.missing:
        print(f"{len(gallery.missing)} missing (listed on the index page), e.g. {gallery.missing[0]}")


if __name__ == "__main__":
    main()
