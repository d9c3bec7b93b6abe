"""The project files whose functions run on one attribution's path, and the deepest chain of project calls.

    python -m scripts.query_path -- tiny attribute --model M --data D --queries Q --out OUT --method unlearning
    python -m scripts.query_path --entry tiny.attribute:main -- --model M ...      (an older entry point)

The command runs twice in this process: once into ``OUT_warm`` (every module imported, nothing counted), then into
``OUT`` traced, so module bodies and class bodies that run at import are left out and only what the query's work
calls is counted. Prints the count, the files and the deepest chain. The two ``--out`` folders must not exist. Run
from the root of the checkout counted (another checkout: ``cd OLD && PYTHONPATH=OLD python NEW/scripts/query_path.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import sys
from collections import Counter
from pathlib import Path

ROOT = Path.cwd().resolve()  # the repository whose files are counted: run from its root


def ours(frame) -> bool:
    """A frame of a project function (not a module body, not this script, not a test)."""
    name = frame.f_code.co_filename
    return (
        name.startswith(str(ROOT)) and frame.f_code.co_name != "<module>" and "/tests/" not in name
        and not name.endswith("query_path.py")
    )  # fmt: skip


def trace(run) -> tuple[Counter, list[str]]:
    """Files of project functions called while ``run()`` runs, and the deepest chain of project calls."""
    files: Counter = Counter()
    deepest: list[str] = []

    def profile(frame, event, arg):
        nonlocal deepest
        if event != "call" or not ours(frame):
            return
        files[os.path.relpath(frame.f_code.co_filename, ROOT)] += 1
        chain, f = [], frame
        while f is not None:
            if ours(f):
                chain.append(f.f_code.co_name)
            f = f.f_back
        if len(chain) > len(deepest):
            deepest = chain[::-1]

    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(None)
    return files, deepest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--entry", default="common.driver:main", help="module:function called with the argv")
    parser.add_argument("argv", nargs=argparse.REMAINDER, help="-- then the command's arguments, with --out OUT")
    args = parser.parse_args()
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    module, _, name = args.entry.partition(":")
    entry = getattr(importlib.import_module(module), name)
    at = argv.index("--out") + 1
    warm = [*argv[:at], argv[at] + "_warm", *argv[at + 1 :]]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        entry(warm)
        files, deepest = trace(lambda: entry(argv))
    print(f"{len(files)} project files; deepest chain {len(deepest)} calls: {' > '.join(deepest)}")
    for file in sorted(files):
        print(f"  {file}")


if __name__ == "__main__":
    main()
