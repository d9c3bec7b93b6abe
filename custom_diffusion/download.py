"""Download, extract and check the customized-model (AbC) benchmark.

    python -m custom_diffusion.download --out DATA [--select all|demo|TEST_CASE] [--laion-images | --laion-captions]
        [--archives FOLDER] [--keep-archives]

What comes from where (as the authors' ``download_abc.sh`` fetches it):

- Hugging Face Hub dataset ``sywang/GenDataAttribution``: ``json/test_<case>.json`` (each model's
  exemplars), ``imagenet_class_to_categories.json``, ``path_to_prompts.json``, and three split 7z
  archives: ``exemplar/exemplar.7z.001..`` (-> ``exemplar/``), ``synth_test/synth_test.7z.001..``
  (-> ``synth/``), ``models_test/models_test.7z.001..`` (-> ``models/``). With ``--laion-images`` also
  ``laion_subset/laion_subset.7z.001..`` (-> ``laion_subset/``, ~270 GB of images and their captions: only
  needed to look at LAION neighbours, not to score them). ``--laion-captions`` extracts only
  ``laion_subset/captions.txt`` from it, which ``clip-text`` needs; the download is the same.
- Hub dataset ``sywang/AttributeByUnlearning``, folder ``abc/``: ``sd_fisher.pt`` and the split archive
  ``laion_latents_text_embeddings/laion_latents_text_embeddings.7z.001..`` (-> ``laion_latents.npy``,
  ``laion_text_embeddings.npy``).
- The unlearning release's task lists (GitHub, ``PeterWang512/AttributeByUnlearning`` at a fixed
  commit): ``tasks/all_tasks.json`` (400 queries, 20 models) and ``tasks/demo_task.json`` (one query).

``--select`` limits what is extracted to the models, exemplars and synthesized images that the chosen
tasks use: ``demo`` (the demo task), a test case (e.g. ``test_artchive``: its 100 tasks, written to
``tasks/<case>.json``) or ``all``. The release packs every test case into the same archives, so a
selection saves disk and extraction time, not download. ``--archives FOLDER`` reads the hub files
from a folder with the same layout (copied from elsewhere) instead of the Hub. Archives are extracted
as :mod:`common.download` does (complete or not at all, recorded, skipped on a rerun); their volumes
are deleted once fully extracted (not after a selection, which the next selection needs) unless
``--keep-archives``. The report at the end checks every selected
task's files and the LAION arrays.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from common.download import download, extract, is_extracted, record, release_files, require_complete, volumes
from common.errors import AttributionError, cli, require
from common.files import read_json
from custom_diffusion.release import (
    LAION_CAPTIONS,
    LAION_COUNT,
    LAION_LATENTS,
    LAION_TEXT,
    SD_FISHER,
    load_laion,
)
from custom_diffusion.tasks import TEST_CASES, Task, load_tasks

BENCHMARK_REPO = "sywang/GenDataAttribution"
UNLEARNING_REPO = "sywang/AttributeByUnlearning"
TASKS_URL = (  # the unlearning release's task lists, at the commit this code was checked against
    "https://raw.githubusercontent.com/PeterWang512/AttributeByUnlearning/"
    "191b6bfeaed016b7b8c85fe7cfa013ddc3324dd9/custom_diffusion/tasks/{name}"
)
TASK_LISTS = ("all_tasks.json", "demo_task.json")
PLAIN = ("imagenet_class_to_categories.json", "path_to_prompts.json")
# archive (relative to the hub folder, without .001..) -> (hub repo, what it yields in DATA, selectable by task)
ARCHIVES = {
    "exemplar/exemplar.7z": (BENCHMARK_REPO, ["exemplar"], True),
    "synth_test/synth_test.7z": (BENCHMARK_REPO, ["synth"], True),
    "models_test/models_test.7z": (BENCHMARK_REPO, ["models"], True),
    "abc/laion_latents_text_embeddings/laion_latents_text_embeddings.7z": (
        UNLEARNING_REPO,
        [LAION_LATENTS, LAION_TEXT],
        False,
    ),
    "laion_subset/laion_subset.7z": (BENCHMARK_REPO, ["laion_subset"], False),
}
LAION_ARCHIVE = "laion_subset/laion_subset.7z"


def get_task_lists(out: Path, archives: Path | None) -> None:
    """``DATA/tasks/all_tasks.json`` and ``demo_task.json``: from ``archives/tasks/`` if there, else GitHub."""
    (out / "tasks").mkdir(parents=True, exist_ok=True)
    for name in TASK_LISTS:
        target = out / "tasks" / name
        if target.is_file():
            continue
        local = archives / "tasks" / name if archives is not None else None
        if local is not None and local.is_file():
            shutil.copyfile(local, target)
        else:
            print(f"downloading tasks/{name}")
            download(TASKS_URL.format(name=name), target)


def selected_tasks(out: Path, select: str) -> Path:
    """The task list of ``select``: all_tasks.json, demo_task.json, or a test case's tasks written out."""
    if select in ("all", "demo"):
        return out / "tasks" / ("all_tasks.json" if select == "all" else "demo_task.json")
    entries = read_json(out / "tasks" / "all_tasks.json", "task list")
    chosen = [e for e in entries if isinstance(e, dict) and e.get("test_case") == select]
    require(bool(chosen), f"tasks/all_tasks.json has no task of {select}")
    path = out / "tasks" / f"{select}.json"
    path.write_text(json.dumps(chosen, indent=1) + "\n")
    return path


def task_prefixes(tasks: list[Task], out: Path) -> list[str]:
    """Archive member paths the tasks use: each model folder, synthesized image and exemplar."""
    paths = {t.model_dir for t in tasks} | {t.image for t in tasks} | {p for t in tasks for p in t.exemplars}
    return sorted(str(p.relative_to(out)) for p in paths)


def get_plain(out: Path, source: Path | None, cases: list[str]) -> None:
    """The benchmark JSONs, the two ImageNet/prompt maps and sd_fisher.pt, copied into DATA."""
    wanted = {f"json/{c}.json": BENCHMARK_REPO for c in cases} | dict.fromkeys(PLAIN, BENCHMARK_REPO)
    wanted[f"abc/{SD_FISHER}"] = UNLEARNING_REPO

    def target(name: str) -> Path:
        return out / (SD_FISHER if name.startswith("abc/") else name)

    for repo in sorted(set(wanted.values())):
        names = [n for n, r in wanted.items() if r == repo and not target(n).is_file()]
        if not names:
            continue
        folder = release_files(source, out, repo, names)
        for name in names:
            require((folder / name).is_file(), f"the {repo} files lack {name}")
            target(name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(folder / name, target(name))


def get_archive(out: Path, source: Path | None, name: str, prefixes: list[str] | None, keep: bool) -> None:
    repo, yields, selectable = ARCHIVES[name]
    if is_extracted(out, name, prefixes) and all((out / y).exists() for y in [*yields, *(prefixes or [])]):
        print(f"{Path(name).name}: already extracted")
        return
    folder = release_files(source, out, repo, [f"{name}.*", name])
    archive = folder / name
    print(f"extracting {archive.name}" + (f" ({len(prefixes)} selected paths)" if prefixes else ""))
    extract(archive, out, prefixes)
    parts = volumes(archive)
    record(out, name, parts, prefixes)
    if not keep and source is None and (prefixes is None or not selectable):  # ours to delete once extracted; a
        # selection of test cases leaves them for the next selection (the archives hold every test case); a user's
        # folder is never touched
        for part in parts:
            os.remove(part)


def report(out: Path, task_file: Path, laion_count: int) -> list[str]:
    """Check every selected task's files and the LAION arrays; return the problems."""
    problems = []
    try:
        tasks = load_tasks(task_file, out)
        models = len({t.model_dir for t in tasks})
        print(f"{task_file.name}: {len(tasks)} tasks of {models} models, every file present")
    except AttributionError as err:
        problems.append(str(err))
    try:
        captioned = (out / LAION_CAPTIONS).is_file()
        laion = load_laion(out, min(laion_count, LAION_COUNT), captions=captioned)
        print(f"LAION arrays: {len(laion):,} images ranked")
        print(f"LAION captions: {'read' if captioned else 'absent (only clip-text needs them: --laion-captions)'}")
    except AttributionError as err:
        problems.append(str(err))
    fisher = out / SD_FISHER
    print(f"{SD_FISHER}: {fisher.stat().st_size:,} bytes" if fisher.is_file() else f"{SD_FISHER}: missing")
    if not fisher.is_file():
        problems.append(f"missing {fisher}")
    return problems


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="the data folder")
    parser.add_argument("--select", default="all", choices=["all", "demo", *TEST_CASES], help="tasks to fetch for")
    parser.add_argument("--laion-images", action="store_true", help="also the LAION images (~270 GB) and captions")
    parser.add_argument(
        "--laion-captions",
        action="store_true",
        help="only the LAION captions, for clip-text (from the same ~270 GB archive, deleted after unless "
        "--keep-archives: a later --laion-images downloads it again)",
    )
    parser.add_argument("--laion-count", type=int, default=LAION_COUNT, help="LAION images the report checks")
    parser.add_argument("--archives", default=None, help="read the hub files from this folder instead of the Hub")
    parser.add_argument("--keep-archives", action="store_true", help="keep downloaded volumes after extraction")
    args = parser.parse_args(argv)
    out = Path(args.out)
    source = Path(args.archives) if args.archives else None
    out.mkdir(parents=True, exist_ok=True)
    get_task_lists(out, source)
    task_file = selected_tasks(out, args.select)
    cases = sorted({e["test_case"] for e in read_json(task_file, "task list") if e.get("test_case") in TEST_CASES})
    get_plain(out, source, cases)
    tasks = load_tasks(task_file, out, check_files=False)  # fields and exemplar lists checked before any archive
    prefixes = None if args.select == "all" else task_prefixes(tasks, out)
    for name, (_, _, selectable) in ARCHIVES.items():
        if name == LAION_ARCHIVE:
            if args.laion_images or args.laion_captions:
                get_archive(out, source, name, None if args.laion_images else [LAION_CAPTIONS], args.keep_archives)
            continue
        get_archive(out, source, name, prefixes if selectable else None, args.keep_archives)
    problems = report(out, task_file, args.laion_count)
    require_complete(out, problems)
    print(f"{out}: complete for {task_file.name}")


if __name__ == "__main__":
    main()
