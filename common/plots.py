"""Pictures: a query next to its top attributed training images."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np


def plot_top_images(
    path: str | Path,
    query_image: np.ndarray,
    query_caption: str,
    images: list[np.ndarray],
    scores: list[float],
    captions: list[str],
    title: str = "",
) -> None:
    """Save a PNG: the query on the left, then the top images with score and caption under each.

    Args:
        query_image: uint8 (H,W,3).
        images: uint8 (H,W,3) each, highest score first.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    fig, axes = plt.subplots(1, n + 1, figsize=(1.9 * (n + 1), 2.9))
    axes = np.atleast_1d(axes)
    panels = [(query_image, "query", query_caption)] + [
        (im, f"#{i + 1}  {s:.3g}", c) for i, (im, s, c) in enumerate(zip(images, scores, captions))
    ]
    for ax, (im, head, cap) in zip(axes, panels):
        ax.imshow(im, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(head, fontsize=8, color="crimson" if head == "query" else "black")
        ax.set_xlabel("\n".join(textwrap.wrap(cap, 22)[:4]), fontsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_image_rows(path: str | Path, rows: list[tuple[str, list[tuple[str, np.ndarray]]]], title: str = "") -> None:
    """Save a PNG of labelled rows of images: ``rows`` is [(row label, [(image title, uint8 (H,W,3)), ...]), ...]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = max(len(images) for _, images in rows)
    fig, axes = plt.subplots(len(rows), width, figsize=(1.1 * width + 0.6, 1.25 * len(rows) + 0.3), squeeze=False)
    for (label, images), line in zip(rows, axes):
        for i, ax in enumerate(line):
            ax.set_xticks([])
            ax.set_yticks([])
            if i >= len(images):
                ax.axis("off")
                continue
            ax.imshow(images[i][1], interpolation="nearest")
            ax.set_title(images[i][0], fontsize=7)
        line[0].set_ylabel(label, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
