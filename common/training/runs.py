"""A trained model's folder: its recipe, reuse of a finished one, resumption of an interrupted one.

Every benchmark stores a trained model as weights plus ``model.json`` holding the architecture
(``model``), the recipe (``recipe``: training settings, excluded indices, data fingerprint) and a
``summary``. A folder is trained once: the same recipe finds it finished and reuses it, another
recipe is refused, and a run killed midway continues from ``checkpoint.safetensors``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

from accelerate import Accelerator

from common.data import ArrayTrainingSet
from common.errors import AttributionError
from common.model import DiffusionModel, read_model_json
from common.training.train import TrainConfig, train

CHECKPOINT = "checkpoint.safetensors"
UNSAVED = ("checkpoint_every",)  # recipe settings that do not change the trained weights


def read_exclusions(path: str | None) -> list[int]:
    """Indices from a JSON list or a text file with one index per line."""
    if not path:
        return []
    text = Path(path).read_text() if Path(path).exists() else None
    if text is None:
        raise AttributionError(f"missing exclusion file: {path}")
    try:
        values = json.loads(text) if text.lstrip().startswith("[") else [int(x) for x in text.split()]
    except ValueError:
        raise AttributionError(f"{path}: expected integers, one per line or a JSON list") from None
    return sorted({int(v) for v in values})


def same_recipe(a: dict | None, b: dict) -> bool:
    """Recipes match; without exclusions the exclusion mode is irrelevant (every mode is the same run), and how
    often a run saves its checkpoint never matters."""
    if a is None:
        return False

    def key(r: dict) -> dict:
        train = {k: v for k, v in r["train"].items() if (r["exclude"] or k != "exclusion_mode") and k not in UNSAVED}
        return r | {"train": train}

    return key(a) == key(b)


def finished(out_dir: str | Path, recipe: dict, architecture: dict) -> bool:
    """Whether ``out_dir`` holds a finished model of this recipe and architecture.

    Raises:
        AttributionError: it holds a model trained otherwise (never overwritten).
    """
    path = Path(out_dir) / "model.json"
    if not path.exists():
        return False
    info = read_model_json(path)
    if same_recipe(info.get("recipe"), recipe) and info.get("model") == json.loads(json.dumps(architecture)):
        print(f"reusing the trained model in {out_dir}")
        return True
    raise AttributionError(f"{out_dir} holds a model trained with another recipe; choose another --out")


def train_and_save(
    model: DiffusionModel,
    data: ArrayTrainingSet,
    cfg: TrainConfig,
    exclude: Sequence[int],
    out_dir: str | Path,
    save: Callable[[dict], None],
    accelerator: Accelerator,
    progress: bool = True,
) -> dict:
    """Train ``model`` (resuming from the folder's checkpoint), then ``save(summary)`` on the main process."""
    checkpoint = Path(out_dir) / CHECKPOINT
    summary = train(model, data, cfg, exclude, checkpoint, progress, accelerator)
    accelerator.free_memory()  # the accelerator keeps every prepared model and optimizer until told otherwise
    if accelerator.is_main_process:
        save(summary)
        checkpoint.unlink(missing_ok=True)
        print(f"trained in {summary['seconds']} s, final loss {summary['final_loss']:.4f}: {out_dir}")
    accelerator.wait_for_everyone()
    return summary
