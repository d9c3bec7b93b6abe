"""The attribution methods, one file each, behind one registry (:mod:`common.methods.registry`).

    from common.methods import get_method
    method = get_method("dino")(cfg, model, data, cache_dir)

A method is a :class:`common.methods.base.Method` subclass in a module of this package, decorated with
``@register``; the registry finds every module of the package on its first lookup.
"""

from common.methods.registry import get_method, methods, register

__all__ = ["get_method", "methods", "register"]
