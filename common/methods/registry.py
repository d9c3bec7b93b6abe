"""The registry of attribution methods, by name.

Every module of the ``common.methods`` package is imported on the first lookup, and each method class registers
itself with :func:`register`: adding a method is adding one file. Nothing depends on the order of the imports.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from common.errors import AttributionError

_METHODS: dict[str, type] = {}
_FOUND = False


def register(cls: type) -> type:
    """Class decorator: add a :class:`common.methods.base.Method` subclass under its ``name``."""
    if cls.name in _METHODS and _METHODS[cls.name] is not cls:
        raise ValueError(f"two methods are named {cls.name!r}")
    _METHODS[cls.name] = cls
    return cls


def methods() -> dict[str, type]:
    """Every method class by name: the modules of the ``common.methods`` package, each imported once."""
    global _FOUND
    if not _FOUND:
        package = __name__.rpartition(".")[0]
        for module in pkgutil.iter_modules([str(Path(__file__).parent)]):
            importlib.import_module(f"{package}.{module.name}")
        _FOUND = True
    return dict(_METHODS)


def get_method(name: str) -> type:
    """The method class registered as ``name``; an unknown name is one line listing the choices."""
    found = methods()
    if name not in found:
        raise AttributionError(f"unknown method {name!r}; choose from {', '.join(sorted(found))}")
    return found[name]
