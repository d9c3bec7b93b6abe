"""Train the tiny text-to-image model from scratch on an image folder.

    python -m tiny.train --data results/quickstart/data --out results/quickstart/model

Writes ``model.safetensors`` + ``model.json`` (architecture, recipe, excluded indices, data
fingerprint). A finished model with the same recipe is reused; an interrupted one resumes from
``checkpoint.safetensors``. Several processes (``accelerate launch -m tiny.train ...``) share every
batch; the first one writes the model.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, replace
from pathlib import Path

import torch
from accelerate import Accelerator

from common.config import add_dataclass_arguments, dataclass_from_args, load_preset, resolve_device
from common.errors import AttributionError, cli, require
from common.model import read_model_json
from common.training.runs import finished, read_exclusions, train_and_save
from common.training.train import TrainConfig
from tiny.data import load_image_folder
from tiny.model import TinyModelConfig, TinyTextToImage
from tiny.pipeline import training_set


def recipe_of(model_dir: str | Path) -> tuple[TinyModelConfig, TrainConfig, dict]:
    """A trained model's architecture, training recipe and ``model.json`` contents."""
    path = Path(model_dir) / "model.json"
    info = read_model_json(path)
    require("recipe" in info and "model" in info, f"{path} records no training recipe")
    train = dict(info["recipe"]["train"])
    train.pop("num_train_timesteps", None)  # older files; the model's schedule decides
    try:
        return TinyModelConfig(**info["model"]), TrainConfig(**train), info
    except TypeError as err:
        raise AttributionError(f"{path} is damaged ({err})") from None


def train_tiny(
    data_dir: str,
    out: str,
    model_cfg: TinyModelConfig,
    cfg: TrainConfig,
    exclude: list[int],
    device: str = "cpu",
    progress: bool = True,
) -> TinyTextToImage:
    """Train (or reuse, or resume) a tiny model into ``out``."""
    out_dir = Path(out)
    exclude = sorted({int(i) for i in exclude})
    folder = load_image_folder(data_dir, model_cfg.resolution)
    torch.manual_seed(cfg.seed)
    model = TinyTextToImage(model_cfg, flips=cfg.flips)
    data = training_set(model, folder)
    recipe = {"train": asdict(cfg), "exclude": exclude, "data": data.fingerprint}
    if finished(out_dir, recipe, asdict(model_cfg)):
        return TinyTextToImage.load(out_dir)
    accelerator = Accelerator(cpu=resolve_device(device).type == "cpu")
    model.to(accelerator.device)

    def save(summary: dict) -> None:
        model.to("cpu").save(out_dir, {"recipe": recipe, "summary": summary})

    train_and_save(model, data, cfg, exclude, out_dir, save, accelerator, progress)
    return model.to("cpu")


@cli
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="image folder with metadata.jsonl")
    parser.add_argument("--out", required=True, help="output folder for the model")
    parser.add_argument("--exclude", default=None, help="file of training indices to leave out")
    parser.add_argument("--config", default=None, help="YAML file of presets")
    parser.add_argument("--preset", default="default", help="preset name in --config")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--ensemble",
        type=int,
        default=1,
        help="also train N-1 independent models (seeds seed+1, ...) into OUT-seed<s>: TRAK's ensemble members",
    )
    add_dataclass_arguments(parser, TinyModelConfig, "model")
    add_dataclass_arguments(parser, TrainConfig, "train")
    args = load_preset(parser, ["model", "train"])
    model_cfg, cfg = (
        dataclass_from_args(TinyModelConfig, args, "model"),
        dataclass_from_args(TrainConfig, args, "train"),
    )
    exclude = read_exclusions(args.exclude)
    train_tiny(args.data, args.out, model_cfg, cfg, exclude, args.device)
    members = [ensemble_member(args.out, cfg.seed + k) for k in range(1, args.ensemble)]
    for k, folder in enumerate(members, 1):
        train_tiny(args.data, folder, model_cfg, replace(cfg, seed=cfg.seed + k), exclude, args.device)
    if members:
        print("ensemble members (e.g. --trak.ensemble): " + " ".join(members))


def ensemble_member(out: str, seed: int) -> str:
    """Where ``--ensemble`` puts the model trained with ``seed``: a sibling folder ``<out>-seed<seed>``."""
    return f"{str(out).rstrip('/')}-seed{seed}"


if __name__ == "__main__":
    main()
