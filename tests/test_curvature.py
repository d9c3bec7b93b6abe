"""EK-FAC and block curvature against hand computations, their invariances, caches, imports and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.diffusion.ddpm_loss import per_sample_loss, unet_denoiser
from common.diffusion.gradients import per_sample_gradients
from common.diffusion.selection import select_parameters
from common.errors import AttributionError
from common.unlearning.block import BlockFisher, cached_block, fit_block
from common.unlearning.curvature import load_curvature, precondition
from common.unlearning.ekfac import (
    EkfacFactors,
    KroneckerModule,
    cached_ekfac,
    fit_ekfac,
    kronecker_modules,
    read_factor_folder,
    write_factor_folder,
)
from common.unlearning.fisher import FisherConfig, estimate_fisher, fisher_batch
from common.unlearning.unlearn import UnlearnConfig
from tests.conftest import micro_config
from tests.workers import curvature

CFG = FisherConfig(num_samples=24, batch_size=8, seed=3)
KEY = "mid_block.attentions.0.transformer_blocks.0.attn2.to_k"


def _probe_gradients(model, module_name, x0, text, t, noise):
    """d(summed loss)/d(module output) by a zero probe added to the output: an implementation apart from ours."""
    module = dict(model.unet.named_modules())[module_name]
    probes = []

    def add_probe(_m, _inputs, output):
        probe = torch.zeros_like(output, requires_grad=True)
        probes.append(probe)
        return output + probe

    handle = module.register_forward_hook(add_probe)
    try:
        loss = per_sample_loss(unet_denoiser(model.unet), x0, text, t, noise, model.alphas_cumprod).sum()
        (grad,) = torch.autograd.grad(loss, probes)
    finally:
        handle.remove()
    return grad


def test_ekfac_factors_of_one_module_match_hand_computation(model, data):
    factors, files = fit_ekfac(model, data, CFG, progress=False)
    tokens = samples = 0
    a_sum = g_sum = 0.0
    lam = 0.0
    q_a, q_g = files["activation_eigenvectors"][KEY], files["gradient_eigenvectors"][KEY]
    name = f"{KEY}.weight"
    for j0 in range(0, CFG.num_samples, 5):  # another batching than the fit's
        batch = fisher_batch(model, data, CFG, j0, min(j0 + 5, CFG.num_samples))
        text = batch[1]  # to_k of cross-attention reads the text embedding itself
        a_sum = a_sum + torch.einsum("bli,blj->ij", text, text)
        g = _probe_gradients(model, KEY, *batch)
        g_sum = g_sum + torch.einsum("bli,blj->ij", g, g)
        tokens += text.shape[0] * text.shape[1]
        w = per_sample_gradients(model, [name], *batch)[name]  # vmap: apart from the fit's hooks
        lam = lam + (q_g.T @ w @ q_a).pow(2).sum(0)
        samples += len(w)
    a, g = a_sum / tokens, g_sum / tokens
    torch.testing.assert_close(files["activation_covariance"][KEY] / tokens, a, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(files["gradient_covariance"][KEY] / tokens, g, rtol=1e-10, atol=1e-14)
    assert int(files["num_lambda_processed"][KEY]) == samples == CFG.num_samples
    values, vectors = torch.linalg.eigh(a)
    torch.testing.assert_close(files["activation_eigenvalues"][KEY], values, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close((vectors.T @ q_a).abs(), torch.eye(len(a), dtype=a.dtype), rtol=0, atol=1e-6)
    torch.testing.assert_close(q_g @ torch.diag(files["gradient_eigenvalues"][KEY]) @ q_g.T, g, rtol=1e-8, atol=1e-14)
    torch.testing.assert_close(factors.lambdas[KEY], lam / samples, rtol=1e-8, atol=1e-16)


def test_corrected_eigenvalues_sum_to_the_diagonal_fisher_from_the_same_draws(model, data):
    """Rotations keep squared norms: per module, Σ Λ equals Σ diag F (the two curvatures share one scale)."""
    factors, _ = fit_ekfac(model, data, CFG, progress=False)
    diagonal = estimate_fisher(model, data, CFG, progress=False)
    assert len(factors.modules) == 8 and not factors.diagonal  # the micro UNet's K/V: Linear modules, no bias
    for m in factors.modules:
        torch.testing.assert_close(factors.lambdas[m.name].sum(), diagonal[m.weight].sum(), rtol=1e-9, atol=0)
        assert not torch.allclose(factors.lambdas[m.name], diagonal[m.weight])  # another basis, not the diagonal


def _spd(n: int, seed: int) -> torch.Tensor:
    x = torch.randn(n, 2 * n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x @ x.T / (2 * n) + 0.1 * torch.eye(n, dtype=torch.float64)


def test_ekfac_step_with_exact_kronecker_eigenvalues_is_the_kronecker_solve():
    a, g = _spd(5, 0), _spd(3, 1)
    ea, qa = torch.linalg.eigh(a)
    eg, qg = torch.linalg.eigh(g)
    module = KroneckerModule("lin", "lin.weight", None, 3, 5)
    factors = EkfacFactors([module], {"lin": qa}, {"lin": qg}, {"lin": torch.outer(eg, ea)}, {})
    v = torch.randn(3, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    got = factors.direction({"lin.weight": v}, damping=0.0)["lin.weight"]
    torch.testing.assert_close(got, torch.linalg.solve(g, v) @ torch.linalg.inv(a), rtol=1e-10, atol=1e-12)
    damping = 0.3  # relative to the mean eigenvalue: the solve of (G ⊗ A + λ·mean I), G ⊗ A over row-major vec
    kron = torch.kron(g, a)
    lam = damping * float(torch.outer(eg, ea).mean())
    dense = torch.linalg.solve(kron + lam * torch.eye(15, dtype=torch.float64), v.reshape(-1)).reshape(3, 5)
    torch.testing.assert_close(
        factors.direction({"lin.weight": v}, damping)["lin.weight"], dense, rtol=1e-10, atol=1e-12
    )


def test_ekfac_bias_column_preconditions_weight_and_bias_together():
    a, g = _spd(4, 3), _spd(2, 4)  # the activation side of a biased module: 3 inputs and the ones column
    ea, qa = torch.linalg.eigh(a)
    eg, qg = torch.linalg.eigh(g)
    module = KroneckerModule("lin", "lin.weight", "lin.bias", 2, 4)
    factors = EkfacFactors([module], {"lin": qa}, {"lin": qg}, {"lin": torch.outer(eg, ea)}, {})
    w, b = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    got = factors.direction({"lin.weight": w, "lin.bias": b}, damping=0.0)
    joint = torch.linalg.solve(g, torch.cat([w, b[:, None]], 1)) @ torch.linalg.inv(a)
    torch.testing.assert_close(got["lin.weight"], joint[:, :3], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got["lin.bias"], joint[:, 3], rtol=1e-10, atol=1e-12)


def test_modules_with_a_selected_bias_and_weights_outside_linear_modules(model, data):
    modules, rest = kronecker_modules(model.unet, select_parameters(model.unet, "attn"))
    out = [m for m in modules if m.name.endswith("to_out.0")]
    assert out and all(m.bias == f"{m.name}.bias" for m in out)
    assert all(m.in_features == dict(model.unet.named_modules())[m.name].in_features + 1 for m in out)
    assert not rest  # every attention weight is in a Linear module
    _, rest = kronecker_modules(model.unet, select_parameters(model.unet, "all"))
    assert any(".conv" in n for n in rest) and any("norm" in n for n in rest)
    cfg = FisherConfig(selection="all", num_samples=128, batch_size=64)
    factors, _ = fit_ekfac(model, data, cfg, progress=False)
    diagonal = estimate_fisher(model, data, cfg, progress=False)
    for n in rest:  # outside Linear modules the EK-FAC keeps the diagonal Fisher of the same draws
        torch.testing.assert_close(factors.diagonal[n], diagonal[n], rtol=1e-9, atol=1e-18)


def test_block_fisher_is_the_mean_outer_product_and_its_step_a_dense_solve(model, data):
    cfg = FisherConfig(num_samples=130, batch_size=64)
    names = select_parameters(model.unet, "cross-attn-kv")
    blocks = fit_block(model, data, cfg, progress=False)
    n = names[0]
    total = 0.0
    for j0 in range(0, 130, 50):
        w = per_sample_gradients(model, [n], *fisher_batch(model, data, cfg, j0, min(j0 + 50, 130)))[n].flatten(1)
        total = total + w.T @ w
    torch.testing.assert_close(blocks[n], total / 130, rtol=1e-10, atol=1e-18)
    diagonal = estimate_fisher(model, data, cfg, progress=False)
    torch.testing.assert_close(torch.diagonal(blocks[n]), diagonal[n].flatten(), rtol=1e-10, atol=1e-18)
    grads = {k: torch.randn_like(diagonal[k]) for k in names}
    got = BlockFisher(blocks).direction(grads, damping=1e-2)
    f = blocks[n]
    damped = f + 1e-2 * float(torch.diagonal(f).mean()) * torch.eye(len(f), dtype=f.dtype)
    dense = torch.linalg.solve(damped, grads[n].flatten()).reshape(grads[n].shape)
    torch.testing.assert_close(got[n], dense, rtol=1e-8, atol=1e-10)


def test_factors_do_not_depend_on_the_batch_size(model, data):
    a, _ = fit_ekfac(model, data, FisherConfig(num_samples=24, batch_size=24), progress=False)
    b, _ = fit_ekfac(model, data, FisherConfig(num_samples=24, batch_size=5), progress=False)
    for m in a.modules:
        torch.testing.assert_close(b.lambdas[m.name], a.lambdas[m.name], rtol=1e-9, atol=1e-18)
        torch.testing.assert_close(b.activation_eigenvectors[m.name].abs(), a.activation_eigenvectors[m.name].abs(),
                                   rtol=0, atol=1e-7)  # fmt: skip
    one = fit_block(model, data, FisherConfig(num_samples=130, batch_size=130), progress=False)
    two = fit_block(model, data, FisherConfig(num_samples=130, batch_size=40), progress=False)
    for n in one:
        torch.testing.assert_close(two[n], one[n], rtol=1e-9, atol=1e-18)


def test_an_interrupted_fit_resumes_to_the_same_factors(model, data, tmp_path, monkeypatch):
    cfg = FisherConfig(num_samples=24, batch_size=4, checkpoint_batches=1)
    whole = cached_ekfac(model, data, cfg, tmp_path / "whole", progress=False)
    calls = {"n": 0}
    real = fisher_batch

    def failing(*args):
        calls["n"] += 1
        if calls["n"] == 10:  # the lambda pass's third batch (a probe sample and 6 covariance batches first)
            raise KeyboardInterrupt
        return real(*args)

    import common.unlearning.ekfac as ekfac

    monkeypatch.setattr(ekfac, "fisher_batch", failing)
    with pytest.raises(KeyboardInterrupt):
        cached_ekfac(model, data, cfg, tmp_path / "resumed", progress=False)
    assert sorted(p.name for p in (tmp_path / "resumed" / "partial").iterdir()) == [
        "covariance-0of1.safetensors",
        "lambda-0of1.safetensors",
    ]
    calls["n"] = 0
    monkeypatch.setattr(ekfac, "fisher_batch", lambda *a: (calls.__setitem__("n", calls["n"] + 1), real(*a))[1])
    resumed = cached_ekfac(model, data, cfg, tmp_path / "resumed", progress=False)
    assert calls["n"] == 5  # the probe sample, then only the lambda pass's last 4 of 6 batches
    assert not (tmp_path / "resumed" / "partial").exists()
    for m in whole.modules:
        torch.testing.assert_close(resumed.lambdas[m.name], whole.lambdas[m.name], rtol=1e-12, atol=0)


def test_cached_factors_are_reused_and_refused_for_another_model_data_or_setting(model, data, tmp_path):
    folder = tmp_path / "ekfac"
    first = cached_ekfac(model, data, CFG, folder, progress=False)
    stamp = (folder / "lambda_matrix.safetensors").stat().st_mtime_ns
    again = cached_ekfac(model, data, FisherConfig(num_samples=24, batch_size=3, seed=3), folder, progress=False)
    assert (
        first.fingerprint() == again.fingerprint()
        and (folder / "lambda_matrix.safetensors").stat().st_mtime_ns == stamp
    )
    with pytest.raises(AttributionError, match=r"made with another settings \(settings\); delete it"):
        cached_ekfac(model, data, FisherConfig(num_samples=30, batch_size=8, seed=3), folder, progress=False)
    with pytest.raises(AttributionError, match="made with another training set"):
        cached_ekfac(model, data.subset(range(6)), CFG, folder, progress=False)
    other = model.with_unet(__import__("copy").deepcopy(model.unet))
    with torch.no_grad():
        next(other.unet.parameters()).add_(1.0)
    with pytest.raises(AttributionError, match="made with another model"):
        cached_ekfac(other, data, CFG, folder, progress=False)
    cfg = FisherConfig(num_samples=130, batch_size=65)
    cached_block(model, data, cfg, tmp_path / "block.safetensors", progress=False)
    with pytest.raises(AttributionError, match="made with another model"):
        cached_block(other, data, cfg, tmp_path / "block.safetensors", progress=False)
    assert (folder / "lambda_matrix.safetensors").stat().st_mtime_ns == stamp  # refusals leave the files


def test_a_factor_folder_imports_when_it_fits_and_is_refused_otherwise(model, data, tmp_path):
    factors, files = fit_ekfac(model, data, CFG, progress=False)
    released = {f: {k: v.float() for k, v in t.items()} for f, t in files.items() if not f.startswith("activation_cov")}
    write_factor_folder(tmp_path / "released", released, {})  # float32, no identity: as a released folder
    got = read_factor_folder(tmp_path / "released", model, "cross-attn-kv")
    for m in factors.modules:
        torch.testing.assert_close(got.lambdas[m.name], factors.lambdas[m.name], rtol=1e-6, atol=1e-14)
    (tmp_path / "released" / "gradient_eigenvectors.safetensors").unlink()
    with pytest.raises(AttributionError, match="lacks gradient_eigenvectors.safetensors"):
        read_factor_folder(tmp_path / "released", model, "cross-attn-kv")
    _, wide = fit_ekfac(model, data, FisherConfig(selection="cross-attn", num_samples=24, batch_size=8), progress=False)
    write_factor_folder(tmp_path / "cross", wide, {})
    with pytest.raises(AttributionError, match="covers 8 modules outside selection 'cross-attn-kv'"):
        read_factor_folder(tmp_path / "cross", model, "cross-attn-kv")
    write_factor_folder(tmp_path / "kv", files, {})
    with pytest.raises(AttributionError, match="lacks 8 selected modules"):
        read_factor_folder(tmp_path / "kv", model, "cross-attn")
    from tiny.model import TinyModelConfig, TinyTextToImage

    cfg = micro_config()
    bigger = TinyTextToImage(TinyModelConfig(**{**cfg.__dict__, "text_dim": 16})).prepare_for_gradients()
    with pytest.raises(AttributionError, match=r"has shape \(8, 8\), the model needs \(16, 16\)"):
        read_factor_folder(tmp_path / "kv", bigger, "cross-attn-kv")


def test_bad_curvature_settings_are_one_line_before_any_work(model, data, tmp_path):
    with pytest.raises(AttributionError, match="unknown preconditioner 'kfac'; choose from diagonal, ekfac, block"):
        UnlearnConfig(preconditioner="kfac")
    with pytest.raises(AttributionError, match="damping must be non-negative, got -0.1"):
        UnlearnConfig(damping=-0.1)
    big = FisherConfig(selection="all", num_samples=100000, block_max_gb=0.01)
    with pytest.raises(
        AttributionError, match=r"block Fisher of selection 'all' needs [\d.,]+ GB \(\d+ tensors, the largest"
    ):
        load_curvature("block", model, data, big, tmp_path)
    with pytest.raises(AttributionError, match="at least as many Fisher samples"):
        load_curvature("block", model, data, FisherConfig(num_samples=100), tmp_path)
    few = (
        r"EK-FAC needs more Fisher samples: .*attn2.to_k has a factor of side 16 and 8 tokens per sample, so at least 2"
    )
    with pytest.raises(AttributionError, match=few):
        load_curvature("ekfac", model, data, FisherConfig(num_samples=1), tmp_path)
    with pytest.raises(AttributionError, match="does not exist"):
        load_curvature("ekfac", model, data, FisherConfig(file=str(tmp_path / "nothing")), tmp_path)
    assert not list(tmp_path.iterdir())  # nothing written


def test_undamped_curvature_refuses_zero_eigenvalues():
    module = KroneckerModule("lin", "lin.weight", None, 2, 2)
    eye = torch.eye(2, dtype=torch.float64)
    factors = EkfacFactors([module], {"lin": eye}, {"lin": eye}, {"lin": torch.tensor([[1.0, 0.0], [1.0, 1.0]])}, {})
    with pytest.raises(AttributionError, match="zero entries and damping is 0"):
        precondition({"lin.weight": torch.ones(2, 2)}, factors, 0.0)


def test_two_processes_fit_the_same_factors_as_one(tmp_path, two_processes):
    curvature(str(tmp_path), "one")  # in this process; the two under torchrun (the fixture)
    for name in ("ekfac.pt", "block.pt"):
        one, two = torch.load(tmp_path / name), torch.load(two_processes / "curvature" / name)
        assert one.keys() == two.keys() and all(v.abs().sum() > 0 for v in one.values())
        for key in one:  # batches split over the processes, summed across them: the same factors
            if key.startswith("A:"):
                torch.testing.assert_close(two[key].abs(), one[key].abs(), rtol=0, atol=1e-7)
            else:
                torch.testing.assert_close(two[key], one[key], rtol=1e-9, atol=0)
    assert not (two_processes / "curvature" / "ekfac" / "partial").exists()


@pytest.mark.parametrize("kind", ["ekfac", "block"])
def test_unlearning_with_a_curvature_scores_and_records_it(model, data, query, tmp_path, kind):
    from common.diffusion.keyed_losses import LossConfig
    from common.methods.unlearning import Unlearning, UnlearningConfig

    def config(preconditioner: str) -> UnlearningConfig:
        unlearn = UnlearnConfig(preconditioner=preconditioner, batch_size=4, accumulations=1, step_size=1e-5)
        return UnlearningConfig(FisherConfig(num_samples=130, batch_size=65), LossConfig(num_timesteps=2), unlearn)

    method = Unlearning(config(kind), model, data, tmp_path / "cache")
    scores, stats = method.score(query)
    assert scores.shape == (len(data),) and torch.isfinite(torch.as_tensor(scores)).all()
    assert stats["relative_update"] > 0 and stats["query_loss_rise"] > 0  # the step unlearns the query
    assert (
        tmp_path / "cache" / {"ekfac": "ekfac/lambda_matrix.safetensors", "block": "block_fisher.safetensors"}[kind]
    ).exists()
    assert method.identity()["unlearn"]["preconditioner"] == kind
    paper = Unlearning(config("diagonal"), model, data).identity()
    assert "preconditioner" not in paper["unlearn"]  # the paper's runs keep the identity they had
    assert not {"checkpoint_batches", "block_max_gb"} & set(paper["fisher"])
    diagonal, _ = Unlearning(config("diagonal"), model, data).score(query)
    assert not np.allclose(scores, diagonal)
