"""The attribution methods, one file each, behind one registry.

    from common.methods import get_method
    method = get_method("dino")(cfg, model, data, cache_dir)

A method module registers its class with :func:`register` when imported; importing this package
imports them all, so the registry always lists every method.
"""

from __future__ import annotations

from common.errors import AttributionError

METHODS: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: add a :class:`common.methods.base.Method` subclass under its ``name``."""
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"two methods are named {cls.name!r}")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type:
    """The method class registered as ``name``; an unknown name is one line listing the choices."""
    if name not in METHODS:
        raise AttributionError(f"unknown method {name!r}; choose from {', '.join(sorted(METHODS))}")
    return METHODS[name]


# method modules (each registers itself)
from common.methods import pixel  # noqa: E402, F401, I001
from common.methods import random  # noqa: E402, F401
from common.methods import unlearning  # noqa: E402, F401
from common.methods import abc_features, clip_image, clip_text, dino, dinov2  # noqa: E402, F401
from common.methods import trak  # noqa: E402, F401
from common.methods import journey_trak  # noqa: E402, F401
from common.methods import d_trak  # noqa: E402, F401
from common.methods import text_condition  # noqa: E402, F401
