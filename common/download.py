"""Fetching a release: Hugging Face Hub snapshots, HTTP files with resume, split 7z archives extracted in Python.

Archives are read with py7zr, split volumes (``name.7z.001, .002, ...``) through multivolumefile: no
7z binary. Each archive is extracted into a scratch folder and its files moved into the data folder
only when complete, then recorded in ``DATA/.extracted.json`` (with the member prefixes taken, or
all): a rerun skips what is complete, and a partial download or a damaged archive is named in one
line while earlier files stay as they were.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path

from common.errors import AttributionError, first_line, require
from common.files import write_json

ALL = "*"  # recorded when every member of an archive was extracted


def volumes(archive: Path) -> list[Path]:
    """The archive itself, or its split volumes ``.001, .002, ...`` in order (empty if none is there)."""
    if archive.exists():
        return [archive]
    parts = [p for p in archive.parent.glob(archive.name + ".*") if p.suffix[1:].isdigit()]
    parts.sort(key=lambda p: int(p.suffix[1:]))
    numbers = [int(p.suffix[1:]) for p in parts]
    require(numbers == list(range(1, len(parts) + 1)), f"{archive}: split volumes {numbers} are not 1..{len(parts)}")
    return parts


def open_archive(archive: Path):
    """A py7zr reader over one archive or its split volumes; a damaged archive is one line."""
    import multivolumefile
    import py7zr

    parts = volumes(archive)
    require(bool(parts), f"missing archive {archive} (or its volumes {archive.name}.001, ...)")
    try:
        if len(parts) == 1 and parts[0] == archive:
            return py7zr.SevenZipFile(archive, "r")
        return py7zr.SevenZipFile(multivolumefile.open(archive, mode="rb"), "r")
    except Exception as err:  # noqa: BLE001 - py7zr, lzma and I/O errors all mean a damaged download
        raise AttributionError(f"{archive} is damaged or incomplete ({first_line(err)}); download it again") from None


def _wanted(name: str, prefixes: list[str] | None) -> bool:
    return prefixes is None or any(name == p or name.startswith(p.rstrip("/") + "/") for p in prefixes)


def extract(archive: Path, out: Path, prefixes: Iterable[str] | None = None) -> list[str]:
    """Extract ``archive`` (or only its members under ``prefixes``) into ``out``; returns the top-level names.

    Members go to ``out/.partial/`` first and are moved into ``out`` file by file only when the whole
    archive read cleanly, so a crash or a damaged volume leaves ``out`` as it was (the scratch folder
    is cleared on the next run). Folders already in ``out`` are merged into, not replaced.
    """
    prefixes = None if prefixes is None else sorted(set(prefixes))
    scratch = out / ".partial" / archive.name
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    with open_archive(archive) as z:
        try:
            names = [n for n in z.getnames() if _wanted(n, prefixes)]
            require(bool(names), f"{archive} is empty" if prefixes is None else
                    f"{archive} holds none of the {len(prefixes)} selected paths")  # fmt: skip
            if prefixes is None:
                z.extractall(path=scratch)
            else:
                z.extract(path=scratch, targets=names)
        except AttributionError:
            raise
        except Exception as err:  # noqa: BLE001 - CRC, LZMA and I/O errors all mean a damaged download
            raise AttributionError(
                f"{archive} is damaged or incomplete ({first_line(err)}); download it again"
            ) from None
    top = sorted(p.name for p in scratch.iterdir())
    require(bool(top), f"{archive} is empty")
    for path in sorted(scratch.rglob("*")):
        if path.is_file():
            target = out / path.relative_to(scratch)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
    shutil.rmtree(out / ".partial", ignore_errors=True)
    return top


def extracted_record(out: Path) -> dict:
    """What earlier runs extracted: archive -> {"sizes": volume sizes, "prefixes": member prefixes or ["*"]}."""
    path = out / ".extracted.json"
    return json.loads(path.read_text()) if path.exists() else {}


def is_extracted(out: Path, archive: str, prefixes: Iterable[str] | None = None) -> bool:
    """Whether ``archive`` (or its members under ``prefixes``) was extracted by an earlier run."""
    done = extracted_record(out).get(archive)
    if isinstance(done, list):  # the record's first form: volume sizes of a full extraction
        return True
    if not isinstance(done, dict):
        return False
    taken = set(done.get("prefixes", []))
    return ALL in taken or (prefixes is not None and set(prefixes) <= taken)


def record(out: Path, archive: str, parts: list[Path], prefixes: Iterable[str] | None = None) -> None:
    """Note ``archive`` (its volume sizes, the prefixes taken) as extracted, atomically."""
    done = extracted_record(out)
    before = done.get(archive, {}).get("prefixes", []) if isinstance(done.get(archive), dict) else []
    taken = [ALL] if prefixes is None else sorted(set(before) | set(prefixes))
    done[archive] = {"sizes": [p.stat().st_size for p in parts], "prefixes": taken}
    write_json(out / ".extracted.json", done)


def release_files(source: Path | None, out: Path, repo: str, patterns: list[str]) -> Path:
    """The folder holding ``repo``'s files matching ``patterns``: ``source`` if given (the same layout, copied
    from elsewhere), else a Hub snapshot in ``out/hub``."""
    if source is not None:
        require(source.is_dir(), f"missing archives folder {source}")
        return source
    return hub_snapshot(repo, patterns, out / "hub")


def require_complete(out: Path, problems: list[str]) -> None:
    """One line naming the first problem of a data folder's report (and how many more there are)."""
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise AttributionError(f"{out} is incomplete: {problems[0]}{more}")


def hub_snapshot(repo: str, patterns: list[str], local_dir: Path) -> Path:
    """Files of a Hugging Face Hub dataset matching ``patterns`` under ``local_dir`` (resumed by huggingface_hub)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=repo, repo_type="dataset", allow_patterns=patterns, local_dir=local_dir))
    except Exception as err:  # noqa: BLE001 - network, authentication and hub errors alike
        raise AttributionError(
            f"cannot download {repo} from the Hugging Face Hub ({err.__class__.__name__}: {first_line(err)[:80]})"
        ) from None


def announced_size(headers, resumed: bool) -> int | None:
    """The whole file's size as the server announces it: the total of ``Content-Range`` for a resumed request, else
    ``Content-Length``; None when it does not say."""
    value = (headers.get("Content-Range") or "").rpartition("/")[2] if resumed else headers.get("Content-Length")
    return int(value) if value and value.isdigit() else None


def download(url: str, path: Path) -> None:
    """Download with resume (HTTP Range) into ``path``, checked against the size the server announces: a connection
    that closes early (which Python's HTTP client does not report) leaves the part file for the rerun to resume."""
    part = path.with_name(path.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            resumed = have and response.status == 206  # a server that ignores Range sends the whole file again
            expected = announced_size(response.headers, resumed)
            with open(part, "ab" if resumed else "wb") as f:
                shutil.copyfileobj(response, f, length=1 << 20)
        size = part.stat().st_size
        if expected is not None and size != expected:
            raise AttributionError(f"the download of {url} stopped at {size:,} of {expected:,} bytes; rerun to resume")
    except urllib.error.HTTPError as err:
        if not (have and err.code == 416):  # 416 to a resumed request: nothing is left, the part is the file
            raise AttributionError(f"cannot download {url} ({err}); rerun to resume") from None
    except OSError as err:
        raise AttributionError(f"cannot download {url} ({err}); rerun to resume") from None
    os.replace(part, path)
