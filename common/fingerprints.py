"""Short content hashes: what identifies a model, a data set, a weight set, a setting or a file in every cache.

Every cached artifact and run folder records the fingerprints of what made it and is refused when they differ
(:mod:`common.cache`, :mod:`common.outputs`). All are truncated sha256 hex digests, computed here and nowhere else,
so the same weights or settings give the same name in every cache:

- :func:`fingerprint_tensors`: tensors' shapes, dtypes and bytes (weights, data, curvature);
- :func:`module_fingerprint`: a network's parameters and buffers in name order (a model, a feature network);
- :func:`weight_set_fingerprint`: a named set of weights, names included (the unlearned weights of a loss pass);
- :func:`settings_digest`: a JSON-serialisable value, keys sorted (settings, recipes, identities);
- :func:`digest`: anything already turned into text or bytes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from typing import Any

import torch


def digest(*parts: str | bytes, length: int = 16) -> str:
    """The first ``length`` hex digits of the sha256 of ``parts``, concatenated (text as UTF-8)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
    return h.hexdigest()[:length]


def settings_digest(value: Any, length: int = 12, default: Callable[[Any], Any] | None = None) -> str:
    """The digest of ``value`` as JSON with sorted keys (``default`` turns other objects into JSON, e.g. ``str``)."""
    return digest(json.dumps(value, sort_keys=True, default=default), length=length)


def fingerprint_tensors(*tensors: torch.Tensor) -> str:
    """A short sha256 of tensors' shapes, dtypes and bytes."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # hashed in place: no copy of large weights
    return h.hexdigest()[:16]


def module_fingerprint(net: torch.nn.Module) -> str:
    """A network's parameters and buffers (shapes, dtypes, bytes), in name order: the same weights loaded from the
    hub or from a local copy agree."""
    state = net.state_dict()
    return fingerprint_tensors(*(state[name] for name in sorted(state)))


def weight_set_fingerprint(weights: Mapping[str, torch.Tensor] | None) -> str:
    """Identifies a named weight set (names and values); '' for none (the model's own weights)."""
    if not weights:
        return ""
    names = sorted(weights)
    return digest("\n".join(names) + fingerprint_tensors(*(weights[n] for n in names)))
