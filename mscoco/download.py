"""Download, extract and check the MSCOCO benchmark's files.

    python -m mscoco.download --out DATA [--parts release coco] [--archives FOLDER]

- ``release``: the authors' files on the Hugging Face Hub (dataset ``sywang/AttributeByUnlearning``,
  folder ``mscoco/``): ``model_fisher.7z`` (model.bin, fisher_info.pt), ``sample.7z`` (the 110 queries)
  and the split archive ``latents_text_embeddings/latents_text_embeddings.7z.001, .002, ...`` (the
  training latents and text embeddings, ~100 GB unpacked), fetched with ``huggingface_hub`` and
  extracted in Python (py7zr reads the split volumes through multivolumefile; no 7z binary).
  ``--archives FOLDER`` extracts archives already on disk (the same names, e.g. copied from elsewhere).
- ``coco``: COCO 2017 train images and caption annotations (images.cocodataset.org), for captions and
  viewable images in the outputs; scoring does not need them.

Archives are extracted as :mod:`common.download` does: a rerun skips what is complete, and a partial
download or a damaged archive is named in one line. The report at the end lists every file with its shape and
checks the arrays against each other.
"""

from __future__ import annotations

import argparse
import zipfile
from pathlib import Path

from common.download import (
    download,
    extract,
    extracted_record,
    is_extracted,
    record,
    release_files,
    require_complete,
    volumes,
)
from common.errors import AttributionError, cli
from mscoco import release

REPO = "sywang/AttributeByUnlearning"
ARCHIVES = {  # archive (relative to the hub folder) -> the files it yields (a rerun skips it when they exist)
    "mscoco/model_fisher.7z": [release.MODEL, release.FISHER],
    "mscoco/sample.7z": [release.SAMPLE_LATENTS, release.SAMPLE_TEXT, release.SAMPLE_CAPTIONS, "sample"],
    "mscoco/latents_text_embeddings/latents_text_embeddings.7z": [release.TRAIN_LATENTS, release.TRAIN_TEXT],
}
COCO = {
    "annotations_trainval2017.zip": (
        "http://images.cocodataset.org/annotations/annotations_trainval2017.zip",
        "annotations",
    ),
    "train2017.zip": ("http://images.cocodataset.org/zips/train2017.zip", "train2017"),
}


def get_release(out: Path, archives: Path | None) -> None:
    todo = {
        a: files
        for a, files in ARCHIVES.items()
        if not is_extracted(out, a) or not all((out / f).exists() for f in files)
    }
    if not todo:
        print("release: already extracted")
        return
    source = release_files(archives, out, REPO, ["mscoco/*"])
    for name in todo:
        archive = source / name
        if not volumes(archive):  # a flat folder of archives also works
            archive = source / Path(name).name
        print(f"extracting {archive.name}")
        names = extract(archive, out)
        print(f"  -> {', '.join(names)}")
        record(out, name, volumes(archive))


def get_coco(out: Path) -> None:
    for name, (url, folder) in COCO.items():
        if (out / folder).is_dir() and name in extracted_record(out):
            print(f"coco: {folder}/ already extracted")
            continue
        zip_path = out / name
        if not zip_path.exists():
            print(f"downloading {url}")
            download(url, zip_path)
        try:
            with zipfile.ZipFile(zip_path) as z:
                z.extractall(out)
        except zipfile.BadZipFile:
            raise AttributionError(f"{zip_path} is damaged or incomplete; delete it and rerun") from None
        record(out, name, [zip_path])


def report(out: Path) -> list[str]:
    """Print every file's state; return the problems (empty when the release is complete and consistent)."""
    rows = release.file_report(out)
    width = max(len(name) for name, _ in rows)
    for name, state in rows:
        print(f"  {name:<{width}}  {state}")
    problems = [f"{name}: {state}" for name, state in rows if state.startswith(("missing", "damaged"))]
    if not problems:
        try:
            data = release.load_training_set(out)
            queries = release.load_release_queries(out)
            print(f"training set: {len(data):,} images x {data.num_captions} captions; {len(queries)} queries")
        except AttributionError as err:
            problems.append(str(err))
    return problems


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="the data folder")
    parser.add_argument("--parts", nargs="+", choices=["release", "coco"], default=["release", "coco"])
    parser.add_argument("--archives", default=None, help="extract archives from this folder instead of the Hub")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if "release" in args.parts:
        get_release(out, Path(args.archives) if args.archives else None)
    if "coco" in args.parts:
        get_coco(out)
    problems = report(out)
    require_complete(out, problems)
    print(f"{out}: complete")


if __name__ == "__main__":
    main()
