"""EK-FAC fitting, ours against kronfluence's, on the same model, samples and draws: seconds and agreement.

    python -m tiny.bench_ekfac --model results/quickstart/model --data results/quickstart/data [--samples 1000]

kronfluence is not a dependency of this toolkit (see README, "Curvature"): install it apart, for this benchmark
only, e.g. ``pip install --target /tmp/kf --no-deps kronfluence einops einconv opt_einsum`` and run with
``PYTHONPATH=/tmp/kf:.`` (its wheel also installs a top-level ``tests`` package, which shadows this
repository's; remove ``/tmp/kf/tests``). Both fit the empirical Fisher of the per-sample loss from the
draws of :func:`common.unlearning.fisher.fisher_batch` (kronfluence gets them as a dataset, summed loss),
in float64, on the K/V modules; the report gives each one's seconds in this run, the largest relative
difference of the corrected eigenvalues Λ, and how far the eigenbases agree (min |diag(Q_oursᵀ Q_kf)|).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time

import torch

from common.diffusion.ddpm_loss import per_sample_loss, unet_denoiser
from common.diffusion.selection import select_parameters
from common.errors import AttributionError, cli
from common.unlearning.ekfac import fit_ekfac, kronecker_modules
from common.unlearning.fisher import FisherConfig, fisher_batch
from tiny.pipeline import load_run


def kronfluence_factors(model, data, cfg: FisherConfig, module_names: list[str]) -> tuple[dict, float]:
    """kronfluence's EK-FAC factors of ``module_names`` from the same draws (its Task over a dataset of them, drawn
    beforehand), and the seconds its fit took."""
    try:
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments
        from kronfluence.task import Task
    except ImportError:
        raise AttributionError("kronfluence is not installed: see this module's docstring") from None

    alphas = model.alphas_cumprod

    draws = torch.utils.data.TensorDataset(*fisher_batch(model, data, cfg, 0, cfg.num_samples))  # drawn untimed

    class DiffusionTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x0, text, t, noise = batch
            return per_sample_loss(unet_denoiser(model), x0, text, t, noise, alphas).sum()

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model)

        def get_influence_tracked_modules(self):
            return module_names

    task = DiffusionTask()
    unet = prepare_model(copy.deepcopy(model.unet), task)
    f64 = torch.float64
    args = FactorArguments(
        strategy="ekfac",
        use_empirical_fisher=True,
        covariance_max_examples=cfg.num_samples,
        lambda_max_examples=cfg.num_samples,
        activation_covariance_dtype=f64,
        gradient_covariance_dtype=f64,
        per_sample_gradient_dtype=f64,
        lambda_dtype=f64,
    )
    with tempfile.TemporaryDirectory() as out:
        analyzer = Analyzer(analysis_name="bench", model=unet, task=task, cpu=True, output_dir=out,
                            disable_tqdm=True)  # fmt: skip
        t0 = time.time()
        analyzer.fit_all_factors(factors_name="ekfac", dataset=draws, per_device_batch_size=cfg.batch_size,
                                 factor_args=args, overwrite_output_dir=True)  # fmt: skip
        seconds = time.time() - t0
        return analyzer.load_all_factors(factors_name="ekfac"), seconds


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a trained tiny model folder")
    parser.add_argument("--data", required=True, help="its training images")
    parser.add_argument("--samples", type=int, default=1000, help="Fisher samples for both passes")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per batch (both)")
    args = parser.parse_args(argv)
    run = load_run(args.model, args.data, "cpu")
    cfg = FisherConfig(num_samples=args.samples, batch_size=args.batch_size)
    modules, _ = kronecker_modules(run.model.unet, select_parameters(run.model.unet, cfg.selection))
    t0 = time.time()
    ours, _ = fit_ekfac(run.model, run.data, cfg, progress=False)
    t_ours = time.time() - t0
    theirs, t_kf = kronfluence_factors(run.model, run.data, cfg, [m.name for m in modules])
    worst_lambda, worst_basis = 0.0, 1.0
    for m in modules:
        lam = theirs["lambda_matrix"][m.name].double() / theirs["num_lambda_processed"][m.name].double().sum()
        worst_lambda = max(worst_lambda, float((lam - ours.lambdas[m.name]).abs().max() / lam.abs().max()))
        for side in ("activation", "gradient"):
            q_kf = theirs[f"{side}_eigenvectors"][m.name].double()
            q_ours = getattr(ours, f"{side}_eigenvectors")[m.name]
            worst_basis = min(worst_basis, float(torch.diagonal(q_ours.T @ q_kf).abs().min()))
    print(f"| {len(modules)} K/V modules, {args.samples} samples | ours | kronfluence 1.0.1 |")
    print("|---|---|---|")
    print(f"| seconds (this run) | {t_ours:.1f} | {t_kf:.1f} |")
    print(f"| largest relative difference of Λ | {worst_lambda:.2e} | |")
    print(f"| least aligned eigenvector, min abs(diag(Q_oursᵀ Q_kf)) | {worst_basis:.6f} | |")


if __name__ == "__main__":
    main()
