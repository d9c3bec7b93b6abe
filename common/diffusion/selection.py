"""Which weights the unlearning step updates, by diffusers ``UNet2DConditionModel`` parameter name."""

from __future__ import annotations

import re

import torch

from common.errors import AttributionError

# In diffusers' transformer blocks attn1 is self-attention and attn2 cross-attention (text).
PRESETS: dict[str, str] = {
    "cross-attn-kv": r"attn2\.to_[kv]\.",  # the paper's default: key and value projections of the text
    "cross-attn": r"attn2\.",
    "attn": r"attn[12]\.",
    "all": r".",
}


def check_selection(selection: str) -> None:
    """Refuse an unknown preset name with one line listing the choices."""
    if selection not in PRESETS:
        raise AttributionError(f"unknown weight selection {selection!r}; choose from {', '.join(PRESETS)}")


def select_parameters(model: torch.nn.Module, selection: str) -> list[str]:
    """Names of the trainable parameters matched by a preset, in the model's order.

    Raises:
        AttributionError: unknown preset, or a preset that matches nothing in this model.
    """
    check_selection(selection)
    pattern = re.compile(PRESETS[selection])
    names = [name for name, _ in model.named_parameters() if pattern.search(name)]
    if not names:
        raise AttributionError(
            f"weight selection {selection!r} matches no parameter of this model; choose from {', '.join(PRESETS)}"
        )
    return names
