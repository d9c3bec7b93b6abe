"""Train the MSCOCO UNet from scratch on the released arrays, optionally without some training images.

    python -m mscoco.train --data DATA --out MODEL [--exclude FILE] --config mscoco/configs/mscoco.yaml --preset paper
    accelerate launch -m mscoco.train ...     (every GPU takes a share of each batch of 128)

The paper's recipe (``paper`` preset): 200 epochs at batch 128 (184,824 steps), AdamW at a constant
1e-4; the leave-K-out models are this recipe and seed without the excluded images. Writes
``MODEL/model.safetensors``, its diffusers ``config.json`` and ``model.json`` (architecture, recipe,
excluded indices, data fingerprint). A finished model with the same recipe is reused; an interrupted
run resumes from ``MODEL/checkpoint.safetensors``. The result loads wherever a UNet is asked for
(``--unet MODEL/model.safetensors``).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

from common.config import add_dataclass_arguments, dataclass_from_args, load_preset, resolve_device
from common.errors import AttributionError, cli, require_file
from common.files import write_json
from common.training.runs import finished, read_exclusions, train_and_save
from common.training.train import TrainConfig
from mscoco import release
from mscoco.model import DEFAULT_COMPONENTS, UNET_CONFIG, MscocoModel, load_unet

WEIGHTS = "model.safetensors"


def canonical_architecture(arguments: dict) -> dict:
    """UNet constructor arguments without those equal to diffusers' defaults (as JSON), so the same
    architecture is recorded alike whether it came from a config file or a loaded UNet's config."""
    import inspect

    defaults = {
        name: p.default
        for name, p in inspect.signature(UNet2DConditionModel.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    plain = json.loads(json.dumps(arguments))
    default = json.loads(json.dumps({k: defaults[k] for k in plain if k in defaults}))
    return {k: v for k, v in sorted(plain.items()) if k in defaults and default.get(k) != v}


def architecture(config_file: str | None = None) -> dict:
    """The UNet's constructor arguments: the paper's, with those of a JSON file (e.g. smaller widths) on top."""
    overrides = {}
    if config_file:
        require_file(config_file, "UNet config")
        try:
            overrides = json.loads(Path(config_file).read_text())
        except json.JSONDecodeError:
            raise AttributionError(f"{config_file} is not valid JSON") from None
    return canonical_architecture(UNET_CONFIG | overrides)


def unet_arguments(unet: UNet2DConditionModel) -> dict:
    """The architecture of a UNet (:func:`canonical_architecture` of its config), to train another like it."""
    return canonical_architecture(dict(unet.config))


def train_mscoco(
    data_dir: str | Path,
    out: str | Path,
    cfg: TrainConfig,
    exclude: list[int] = (),
    unet_config: dict | None = None,
    components: str | Path | None = DEFAULT_COMPONENTS,
    accelerator: Accelerator | None = None,
    progress: bool = True,
) -> MscocoModel:
    """Train (or reuse, or resume) the MSCOCO UNet into ``out``; SD2's text encoder only for caption dropout."""
    out_dir = Path(out)
    exclude = sorted({int(i) for i in exclude})
    unet_config = unet_config or architecture()
    data = release.load_training_set(data_dir)
    recipe = {"train": asdict(cfg), "exclude": exclude, "data": data.fingerprint}
    if finished(out_dir, recipe, unet_config):
        return MscocoModel(load_unet(out_dir / WEIGHTS), components)
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    torch.manual_seed(cfg.seed)
    unet = UNet2DConditionModel(**unet_config)
    model = MscocoModel(unet.to(accelerator.device), components)

    def save(summary: dict) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in unet.state_dict().items()}
        save_file(state, str(out_dir / WEIGHTS))
        unet.save_config(out_dir)
        write_json(out_dir / "model.json", {"model": unet_config, "recipe": recipe, "summary": summary})

    train_and_save(model, data, cfg, exclude, out_dir, save, accelerator, progress)
    return model


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="the release folder (mscoco/download.sh)")
    parser.add_argument("--out", required=True, help="output folder for the model")
    parser.add_argument("--exclude", default=None, help="file of training indices to leave out")
    parser.add_argument("--unet-config", default=None, help="JSON of UNet arguments replacing the paper's")
    parser.add_argument(
        "--components", default=DEFAULT_COMPONENTS, help="SD2 text encoder source (the empty caption's condition)"
    )
    parser.add_argument("--config", default=None, help="YAML file of presets (mscoco/configs/mscoco.yaml)")
    parser.add_argument("--preset", default="paper", help="preset name in --config")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda (accelerate launch decides per process)")
    add_dataclass_arguments(parser, TrainConfig, "train")
    args = load_preset(parser, ["train"], argv)
    cfg = dataclass_from_args(TrainConfig, args, "train")
    accelerator = Accelerator(cpu=resolve_device(args.device).type == "cpu")
    train_mscoco(
        args.data, args.out, cfg, read_exclusions(args.exclude), architecture(args.unet_config), args.components,
        accelerator,
    )  # fmt: skip


if __name__ == "__main__":
    main()
