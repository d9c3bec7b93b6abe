"""User-facing errors: one clear line, no traceback, earlier results untouched."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import Any


class AttributionError(Exception):
    """An error caused by the user's input (files, arguments, folders), reported as one line."""


def require(condition: bool, message: str) -> None:
    """Raise :class:`AttributionError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise AttributionError(message)


def require_file(path: Any, what: str = "file") -> None:
    """Raise a one-line error naming ``path`` if it does not exist."""
    from pathlib import Path

    if not Path(path).exists():
        raise AttributionError(f"missing {what}: {path}")


def first_line(err: BaseException) -> str:
    """An exception as one short line: its type and the first line of its message."""
    text = str(err).strip().splitlines()
    return f"{err.__class__.__name__}: {text[0][:200]}" if text else err.__class__.__name__


def cli(main: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a script's ``main`` so input errors (and a folder it may not write) print one line and exit with
    status 2."""

    @wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except AttributionError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        except PermissionError as err:  # e.g. a read-only output folder: the path, not a traceback
            print(f"error: cannot write {err.filename or 'a file'}: permission denied", file=sys.stderr)
            sys.exit(2)

    return wrapper
