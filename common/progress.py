"""Progress bars that suit a terminal and a log file alike.

Where stderr is a terminal (or in a notebook) this is tqdm's bar, redrawn in place. Elsewhere (a log file, a pipe, a
batch job) a redrawn bar leaves every frame in the file: a quickstart log grew to 4 MB. There each bar instead prints
one plain line when it starts, at most one every ``LOG_INTERVAL`` seconds while it runs (tqdm's own
``TQDM_MININTERVAL`` overrides it) and one with its final count, also for bars a terminal would clear.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable
from typing import Any, TextIO

from tqdm.auto import tqdm as auto_tqdm
from tqdm.std import tqdm as std_tqdm

LOG_INTERVAL = 30.0  # seconds between two lines of one bar in a log
LOG_FORMAT = "{desc}: {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
NOTEBOOK = any(cls.__module__ == "tqdm.notebook" for cls in auto_tqdm.__mro__)
_CONTROL = re.compile(r"\r|\x1b\[[0-9;]*[A-Za-z]")  # carriage returns and cursor moves between frames


class LogLines:
    """A stream for one tqdm bar that writes each frame as a line of its own: no blank clearing frames, and no
    second line for the same count (tqdm draws the last frame again when it closes)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.encoding = getattr(stream, "encoding", None)
        self.count = None  # the text before the timing of the last line written

    def write(self, text: str) -> None:
        line = _CONTROL.sub("", text).strip()
        count = line.split(" [", 1)[0]
        if line and count != self.count:
            self.stream.write(line + "\n")
            self.count = count

    def flush(self) -> None:
        self.stream.flush()


def interactive(stream: TextIO) -> bool:
    """Whether a bar on ``stream`` is seen live (a terminal or a notebook) rather than kept in a file."""
    isatty = getattr(stream, "isatty", None)
    return NOTEBOOK or bool(isatty and isatty())


def progress_bar(iterable: Iterable | None = None, **kwargs: Any) -> std_tqdm:
    """``tqdm(iterable, **kwargs)`` on a terminal; in a log, plain lines at a modest interval (module docstring)."""
    stream = kwargs.pop("file", None) or sys.stderr
    if interactive(stream):
        return auto_tqdm(iterable, file=stream, **kwargs)
    if "TQDM_MININTERVAL" not in os.environ:
        kwargs.setdefault("mininterval", LOG_INTERVAL)
    kwargs.setdefault("bar_format", LOG_FORMAT)
    kwargs["leave"] = True  # the final count stays in the log
    return std_tqdm(iterable, file=LogLines(stream), dynamic_ncols=False, **kwargs)
