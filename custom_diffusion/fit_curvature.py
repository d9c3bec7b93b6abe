"""Fit the base model's curvature on the LAION subset once, for every customized model of the benchmark.

    python -m custom_diffusion.fit_curvature --data DATA --out FOLDER [--unlearn.preconditioner ekfac] \\
        [--sd CompVis/stable-diffusion-v1-4] [--laion-count 100000] [--config custom_diffusion/configs/abc.yaml \\
        --preset paper_ekfac]
    accelerate launch -m custom_diffusion.fit_curvature ...     (the batches split over every process)

As AbC uses SD v1.4's Fisher for all its models (Custom Diffusion changes only K/V, and little), the
curvature is fitted on the base model and the ranked LAION images with the Fisher stage's settings
(``--fisher.*``: selection, samples, seed), resumable, and passed to ``python -m common.driver abc attribute`` as
``--fisher.file`` with the same ``--unlearn.preconditioner``: a diagonal Fisher file (the released
``sd_fisher.pt`` is one), an EK-FAC factor folder in kronfluence's layout, or a block Fisher file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common.config import add_dataclass_arguments, dataclass_from_args, load_preset
from common.errors import cli, require
from common.unlearning.curvature import CACHE_NAMES, load_curvature
from common.unlearning.fisher import FisherConfig
from common.unlearning.unlearn import UnlearnConfig
from custom_diffusion.model import SD_V14, StableDiffusionModel
from custom_diffusion.release import LAION_COUNT, load_laion


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="the AbC data folder (custom_diffusion/scripts/download.sh)")
    parser.add_argument("--out", required=True, help="folder of the fitted curvature")
    parser.add_argument("--sd", default=SD_V14, help="Stable Diffusion: hub id or pipeline folder")
    parser.add_argument("--laion-count", type=int, default=LAION_COUNT, help="LAION images drawn from (paper: 100,000)")
    parser.add_argument("--config", default=None, help="YAML file of presets (custom_diffusion/configs/abc.yaml)")
    parser.add_argument("--preset", default="default", help="preset name in --config")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ... (under accelerate: its device)")
    add_dataclass_arguments(parser, FisherConfig, "fisher")
    add_dataclass_arguments(parser, UnlearnConfig, "unlearn")  # its preconditioner names the curvature
    return parser


@cli
def main(argv: list[str] | None = None) -> None:
    from accelerate import Accelerator

    args = load_preset(build_parser(), ["fisher", "unlearn"], argv=argv)
    cfg = dataclass_from_args(FisherConfig, args, "fisher")
    kind = dataclass_from_args(UnlearnConfig, args, "unlearn").preconditioner
    require(not cfg.file, "--fisher.file names a curvature to import; this command fits one")
    laion = load_laion(args.data, args.laion_count)
    accelerator = Accelerator(cpu=args.device == "cpu")
    model = StableDiffusionModel.load(args.sd, accelerator.device).prepare_for_gradients(accelerator.device)
    out = Path(args.out)
    load_curvature(kind, model, laion, cfg, out, accelerator=accelerator)
    if accelerator.is_main_process:
        print(f"pass --unlearn.preconditioner {kind} --fisher.file {out / CACHE_NAMES[kind]}")


if __name__ == "__main__":
    main()
