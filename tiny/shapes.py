"""Procedural, seeded image-caption dataset of coloured shapes for the tiny benchmark.

Each image is one shape drawn on a plain background. Captions name the shape, its colour, its
size, its vertical position and the background colour. Horizontal position is random jitter that
captions never mention, so every caption stays true for the horizontally flipped image (training
and scoring both use flips). Shapes are rendered at 4x the target resolution and box-filtered
down, so continuous jitter in position and size makes every image distinct.

The output is an image folder in the Hugging Face ``imagefolder`` layout (``metadata.jsonl`` with
``file_name`` and ``text``), extended with each image's attributes, so the same loader reads it
and a user's own folder.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from common.progress import progress_bar

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 40),
    "magenta": (210, 50, 200),
    "cyan": (40, 210, 220),
}
BACKGROUNDS = {"black": (10, 10, 10), "gray": (120, 120, 120), "white": (240, 240, 240), "brown": (110, 70, 35)}
SIZES = {"small": (0.22, 0.28), "large": (0.36, 0.44)}  # half-extent as a fraction of the image side
VERTICAL = {"top": 0.28, "middle": 0.5, "bottom": 0.72}  # centre as a fraction of the image height
ATTRIBUTES = ("shape", "colour", "size", "position", "background")
NEW_SHAPES = ("ring", "cross", "hourglass", "arch", "tee", "crescent", "heart", "chevron")  # never in pretraining
# Renderings; the pretraining set is all solid.
STYLES = ("solid", "outline", "stripes", "checker", "columns", "diagonal", "dots", "grid", "lower-half")


@dataclass
class ShapeSpec:
    """One image's attributes plus the jitter that makes it unique."""

    shape: str
    colour: str
    size: str
    position: str
    background: str
    cx: float  # horizontal centre, fraction of the width
    cy: float  # vertical centre, fraction of the height
    half: float  # half-extent, fraction of the side

    def caption(self, style: str = "full") -> str:
        """``full`` names every attribute; ``class`` only colour and shape (24 distinct captions)."""
        if style == "class":
            return f"a {self.colour} {self.shape}"
        return f"a {self.size} {self.colour} {self.shape} at the {self.position} on a {self.background} background"

    def attributes(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in ATTRIBUTES}


def sample_spec(rng: np.random.Generator) -> ShapeSpec:
    size = str(rng.choice(list(SIZES)))
    half = float(rng.uniform(*SIZES[size]))
    position = str(rng.choice(list(VERTICAL)))
    return ShapeSpec(
        shape=str(rng.choice(SHAPES)),
        colour=str(rng.choice(list(COLOURS))),
        size=size,
        position=position,
        background=str(rng.choice(list(BACKGROUNDS))),
        cx=float(rng.uniform(0.5 - 0.2, 0.5 + 0.2)),
        cy=float(VERTICAL[position] + rng.uniform(-0.05, 0.05)),
        half=half,
    )


def _shape_mask(spec: ShapeSpec, side: int) -> np.ndarray:
    """Boolean mask (side, side) of the shape, sampled at pixel centres."""
    coords = (np.arange(side) + 0.5) / side
    y, x = np.meshgrid(coords, coords, indexing="ij")
    dx, dy = (x - spec.cx) / spec.half, (y - spec.cy) / spec.half
    if spec.shape == "circle":
        return dx**2 + dy**2 <= 1.0
    if spec.shape == "square":
        return (np.abs(dx) <= 0.85) & (np.abs(dy) <= 0.85)
    if spec.shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.0
    if spec.shape == "triangle":  # apex up, so it is symmetric under a horizontal flip
        return (dy <= 0.9) & (dy >= -1.0) & (np.abs(dx) <= (dy + 1.0) / 1.9)
    # Shapes the pretraining set never shows (new concepts for the customized-model twin); all mirror-symmetric.
    if spec.shape == "ring":
        return (dx**2 + dy**2 <= 1.0) & (dx**2 + dy**2 >= 0.45**2)
    if spec.shape == "cross":
        return ((np.abs(dx) <= 0.3) & (np.abs(dy) <= 0.95)) | ((np.abs(dy) <= 0.3) & (np.abs(dx) <= 0.95))
    if spec.shape == "hourglass":  # two triangles meeting at the centre
        return (np.abs(dy) <= 0.9) & (np.abs(dx) <= np.abs(dy) + 0.08)
    if spec.shape == "arch":  # a half disc over a bar: apex up, open below
        top = (dy <= 0) & (dx**2 + dy**2 <= 0.95**2)
        return top | ((dy > 0) & (dy <= 0.8) & (np.abs(dx) >= 0.45) & (np.abs(dx) <= 0.95))
    if spec.shape == "tee":  # a bar over a stem
        return ((dy >= -0.95) & (dy <= -0.4) & (np.abs(dx) <= 0.95)) | (
            (np.abs(dx) <= 0.28) & (dy <= 0.95) & (dy >= -0.95)
        )
    if spec.shape == "crescent":  # a disc less a disc above it: horns up
        return (dx**2 + dy**2 <= 1.0) & (dx**2 + (dy + 0.55) ** 2 >= 0.8**2)
    if spec.shape == "heart":  # two lobes over a point
        lobes = ((np.abs(dx) - 0.45) ** 2 + (dy + 0.35) ** 2 <= 0.5**2) & (dy <= -0.1)
        return lobes | ((dy > -0.4) & (dy <= 0.95) & (np.abs(dx) <= 0.95 * (0.95 - dy) / 1.35))
    if spec.shape == "chevron":  # a V: two bars meeting at the bottom
        return (dy >= -0.95) & (dy <= 0.95) & (np.abs(np.abs(dx) - (0.95 - (dy + 0.95) / 2)) <= 0.28)
    raise ValueError(f"unknown shape {spec.shape!r}; choose from {SHAPES + NEW_SHAPES}")


def _style_mask(mask: np.ndarray, style: str) -> np.ndarray:
    """The pixels of ``mask`` painted in a rendering ``style`` (supersampled grid; solid: all of them)."""
    side = mask.shape[0]
    y, x = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    band = max(1, side // 16)  # one image pixel at 4x supersampling of a 16-px image
    if style == "solid":
        return mask
    if style == "outline":  # the shape's border only, one image pixel wide
        inner = mask.copy()
        for dy_, dx_ in ((band, 0), (-band, 0), (0, band), (0, -band)):
            inner &= np.roll(mask, (dy_, dx_), axis=(0, 1))
        return mask & ~inner
    if style == "stripes":  # horizontal bands, one image pixel each
        return mask & ((y // band) % 2 == 0)
    if style == "checker":
        return mask & (((y // band) + (x // band)) % 2 == 0)
    if style == "columns":  # vertical bands, one image pixel each
        return mask & ((x // band) % 2 == 0)
    if style == "diagonal":  # bands along one diagonal, two image pixels apart (mirrored, they run the other way)
        return mask & (((y // band) + (x // band)) % 3 == 0)
    if style == "dots":  # every other image pixel of every other row
        return mask & ((y // band) % 2 == 0) & ((x // band) % 2 == 0)
    if style == "grid":  # lines every third image pixel, both ways
        return mask & (((y // band) % 3 == 0) | ((x // band) % 3 == 0))
    if style == "lower-half":  # the shape filled below its centre only, outlined above
        rows = np.nonzero(mask.any(axis=1))[0]
        middle = (rows[0] + rows[-1]) / 2 if len(rows) else 0
        return _style_mask(mask, "outline") | (mask & (y >= middle))
    raise ValueError(f"unknown style {style!r}; choose from {STYLES}")


def render(spec: ShapeSpec, resolution: int, supersample: int = 4, style: str = "solid") -> np.ndarray:
    """Render one image as uint8 (resolution, resolution, 3), anti-aliased by box filtering."""
    side = resolution * supersample
    canvas = np.empty((side, side, 3), dtype=np.float64)
    canvas[:] = BACKGROUNDS[spec.background]
    canvas[_style_mask(_shape_mask(spec, side), style)] = COLOURS[spec.colour]
    pooled = canvas.reshape(resolution, supersample, resolution, supersample, 3).mean(axis=(1, 3))
    return np.round(pooled).astype(np.uint8)


CAPTION_STYLES = ("full", "class")


def generate(out_dir: str | Path, num_images: int, resolution: int = 16, seed: int = 0, captions: str = "full") -> Path:
    """Write ``num_images`` shapes as PNGs plus ``metadata.jsonl`` into ``out_dir``.

    ``captions="class"`` gives every image of a shape-and-colour class the same caption ("a red
    circle"); the images are the same as with ``"full"`` for the same seed.
    """
    if captions not in CAPTION_STYLES:
        raise ValueError(f"unknown caption style {captions!r}; choose from {', '.join(CAPTION_STYLES)}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in progress_bar(range(num_images), desc="shapes", leave=False):
        spec = sample_spec(rng)
        name = f"images/{i:05d}.png"
        Image.fromarray(render(spec, resolution)).save(out / name)
        lines.append({"file_name": name, "text": spec.caption(captions), "attributes": spec.attributes()})
    with open(out / "metadata.jsonl", "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
    info = {"generator": "tiny.shapes", "num_images": num_images, "resolution": resolution, "seed": seed}
    info["captions"] = captions
    (out / "dataset.json").write_text(json.dumps(info, indent=2) + "\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num-images", type=int, default=2000, help="number of images")
    parser.add_argument("--resolution", type=int, default=16, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed")
    parser.add_argument(
        "--captions", choices=CAPTION_STYLES, default="full", help="full: every attribute; class: colour and shape"
    )
    args = parser.parse_args()
    generate(args.out, args.num_images, args.resolution, args.seed, args.captions)
    print(f"wrote {args.num_images} images to {args.out}")


if __name__ == "__main__":
    main()
