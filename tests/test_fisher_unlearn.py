"""Fisher estimation, weight selection and the unlearning update, against hand computations."""

import pytest
import torch

from common import keyed_random
from common.diffusion.ddpm_loss import per_sample_loss, unet_denoiser
from common.diffusion.gradients import mean_gradient, per_sample_gradients
from common.diffusion.keyed_losses import LossConfig
from common.diffusion.selection import select_parameters
from common.errors import AttributionError
from common.methods.unlearning import query_losses
from common.unlearning.fisher import (
    FisherConfig,
    _draws,
    cached_fisher,
    estimate_fisher,
    import_fisher,
    newton_direction,
)
from common.unlearning.unlearn import UnlearnConfig, query_draws, query_gradient, unlearn

KV = "cross-attn-kv"


def test_presets_select_the_right_weights(model):
    kv = select_parameters(model.unet, KV)
    assert kv and all(".attn2.to_k." in n or ".attn2.to_v." in n for n in kv)
    cross = select_parameters(model.unet, "cross-attn")
    attn = select_parameters(model.unet, "attn")
    assert set(kv) < set(cross) < set(attn) < set(select_parameters(model.unet, "all"))


def test_unknown_and_empty_selection_list_the_choices(model):
    with pytest.raises(AttributionError, match="cross-attn-kv, cross-attn, attn, all"):
        select_parameters(model.unet, "kv-only")
    with pytest.raises(AttributionError, match="matches no parameter"):
        select_parameters(torch.nn.Linear(2, 2), "attn")


def _loss_grad(model, names, x0, text, t, noise):
    """One sample's gradient by plain autograd (no vmap): the reference for the fast paths."""
    params = dict(model.unet.named_parameters())
    for n in names:
        params[n].requires_grad_(True)
    try:
        loss = per_sample_loss(unet_denoiser(model.unet), x0, text, t, noise, model.alphas_cumprod).mean()
        return dict(zip(names, torch.autograd.grad(loss, [params[n] for n in names])))
    finally:
        for n in names:
            params[n].requires_grad_(False)


def test_per_sample_gradients_match_autograd_one_by_one(model, data):
    names = select_parameters(model.unet, KV)
    idx = torch.arange(5)
    x0, text = data.images(idx), data.text(idx)
    t, noise = torch.tensor([0, 100, 400, 700, 999]), torch.randn(5, 3, 8, 8, dtype=torch.float64)
    per = per_sample_gradients(model, names, x0, text, t, noise)
    mean = mean_gradient(model, names, x0, text, t, noise)
    for j in range(5):
        ref = _loss_grad(model, names, x0[j : j + 1], text[j : j + 1], t[j : j + 1], noise[j : j + 1])
        for n in names:
            torch.testing.assert_close(per[n][j], ref[n], rtol=1e-8, atol=1e-12)
    for n in names:
        torch.testing.assert_close(per[n].mean(0), mean[n], rtol=1e-8, atol=1e-12)


def test_fisher_is_the_mean_of_squared_gradients_by_hand(model, data):
    cfg = FisherConfig(num_samples=6, batch_size=4, seed=2)
    names = select_parameters(model.unet, KV)
    fisher = estimate_fisher(model, data, cfg, progress=False)
    idx, flip, cap, t = _draws(0, 6, len(data), data.num_captions, cfg, model.num_train_timesteps, True)
    total = {n: 0.0 for n in names}
    for j in range(6):
        noise = keyed_random.keyed_normal([(2, keyed_random.Purpose.FISHER, 2, j)], data.image_shape, torch.float64)
        g = _loss_grad(model, names, data.images(idx[j : j + 1], flip[j : j + 1]), data.text(idx[j : j + 1], cap[j]),
                       t[j : j + 1], noise)  # fmt: skip
        for n in names:
            total[n] = total[n] + g[n].pow(2)
    for n in names:
        torch.testing.assert_close(fisher[n], total[n] / 6, rtol=1e-8, atol=1e-14)


def test_fisher_is_finite_nonnegative_and_batch_invariant(model, data):
    a = estimate_fisher(model, data, FisherConfig(num_samples=30, batch_size=30), False)
    b = estimate_fisher(model, data, FisherConfig(num_samples=30, batch_size=7), False)
    assert set(a) == set(select_parameters(model.unet, KV))
    for n in a:
        assert torch.isfinite(a[n]).all() and (a[n] >= 0).all() and a[n].sum() > 0
        torch.testing.assert_close(a[n], b[n], rtol=1e-9, atol=1e-15)


def test_a_model_trained_without_flips_gets_no_flipped_draws(model, data):
    cfg = FisherConfig(num_samples=40)
    _, with_flips, _, t1 = _draws(0, 40, len(data), 2, cfg, 1000, True)
    _, no_flips, _, t2 = _draws(0, 40, len(data), 2, cfg, 1000, False)
    assert with_flips.any() and not no_flips.any() and torch.equal(t1, t2)


def test_cached_fisher_reuses_and_refuses_another_model_data_or_setting(model, data, tmp_path):
    path = tmp_path / "fisher.safetensors"
    cfg = FisherConfig(num_samples=8, batch_size=8)
    first = cached_fisher(model, data, cfg, path, progress=False)
    again = cached_fisher(model, data, FisherConfig(num_samples=8, batch_size=3), path, progress=False)
    torch.testing.assert_close(first, again)  # the batch size is not part of the identity
    with pytest.raises(AttributionError, match="another settings"):
        cached_fisher(model, data, FisherConfig(num_samples=9), path)
    with pytest.raises(AttributionError, match="another training set"):
        cached_fisher(model, data.subset(range(6)), cfg, path)
    with torch.no_grad():
        next(model.unet.parameters()).add_(1.0)
    with pytest.raises(AttributionError, match="another model"):
        cached_fisher(model, data, cfg, path)


def test_nan_and_damaged_fisher_files_are_refused(model, data, tmp_path):
    from safetensors.torch import save_file

    names = select_parameters(model.unet, KV)
    params = dict(model.unet.named_parameters())
    bad = {n: torch.ones_like(params[n]) for n in names}
    bad[names[0]] = bad[names[0]] * float("nan")
    save_file(bad, str(tmp_path / "nan.safetensors"))
    with pytest.raises(AttributionError, match="NaN"):
        import_fisher(tmp_path / "nan.safetensors", model, KV)
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "nan.safetensors").read_bytes()[:50])
    with pytest.raises(AttributionError, match="is damaged or incomplete"):
        import_fisher(tmp_path / "cut.safetensors", model, KV)
    with pytest.raises(AttributionError, match="missing Fisher file"):
        import_fisher(tmp_path / "absent.pt", model, KV)


def test_imported_fisher_must_cover_the_selected_weights(model, tmp_path):
    names = select_parameters(model.unet, KV)
    params = dict(model.unet.named_parameters())
    full = {f"unet.{n}": torch.rand_like(params[n]) for n in names}
    torch.save(full, tmp_path / "fisher_info.pt")
    got = import_fisher(tmp_path / "fisher_info.pt", model, KV, prefix="unet.")
    torch.testing.assert_close(got[names[0]], full[f"unet.{names[0]}"].double())
    with pytest.raises(AttributionError, match="lacks"):
        import_fisher(tmp_path / "fisher_info.pt", model, "cross-attn", prefix="unet.")  # q and out too
    other = dict(full)
    other[f"unet.{names[1]}"] = torch.rand(3, 3)
    torch.save(other, tmp_path / "wrong.pt")
    with pytest.raises(AttributionError, match="has shape"):
        import_fisher(tmp_path / "wrong.pt", model, KV, prefix="unet.")


def test_damping_keeps_zero_entries_finite():
    g = {"w": torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)}
    f = {"w": torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)}
    d = newton_direction(g, f, damping=0.5)["w"]
    assert torch.isfinite(d).all()
    torch.testing.assert_close(d, torch.tensor([1 / 0.5, 2 / 1.5, 3 / 2.5], dtype=torch.float64))
    with pytest.raises(AttributionError, match="3 zero entries and damping is 0"):
        newton_direction(g, {"w": torch.zeros(3, dtype=torch.float64)}, damping=0.0)
    with pytest.raises(AttributionError, match="1 zero entries"):
        newton_direction(g, f, damping=0.0)
    undamped = newton_direction(g, {"w": torch.tensor([4.0, 1.0, 2.0], dtype=torch.float64)}, damping=0.0)["w"]
    torch.testing.assert_close(undamped, torch.tensor([0.25, 2.0, 1.5], dtype=torch.float64))  # the original's F^-1 g


def _fisher(model, data):
    return estimate_fisher(model, data, FisherConfig(num_samples=24, batch_size=24), False)


def test_query_gradient_is_the_mean_over_every_accumulation_and_draw(model, query):
    cfg = UnlearnConfig(batch_size=3, accumulations=2, seed=5)
    names = select_parameters(model.unet, KV)
    got = query_gradient(model, names, query, cfg, step=1)
    total = {n: 0.0 for n in names}
    for acc in range(2):
        t, cap = query_draws(query, cfg, 1, acc, 1000)
        assert len(set(t.tolist())) == 3  # distinct timesteps within a batch
        for j in range(3):
            key = (5, keyed_random.Purpose.QUERY, query.key, 1, acc, j)
            noise = keyed_random.keyed_normal([key], query.image.shape, torch.float64)
            grad = _loss_grad(model, names, query.image[None], query.text[cap[j : j + 1]], t[j : j + 1], noise)
            for n in names:
                total[n] = total[n] + grad[n]
    for n in names:  # every tensor, not just the first
        torch.testing.assert_close(got[n], total[n] / 6, rtol=1e-8, atol=1e-13)


@pytest.mark.parametrize("method", ["newton", "sgd"])
def test_update_changes_only_selected_weights_and_raises_query_loss(model, data, query, method):
    cfg = UnlearnConfig(method=method, step_size=1e-3 if method == "newton" else 1.0, batch_size=8, accumulations=2)
    result = unlearn(model, query, cfg, _fisher(model, data), num_train=len(data), progress=False)
    selected = set(select_parameters(model.unet, KV))
    before, after = dict(model.unet.named_parameters()), dict(result.model.unet.named_parameters())
    for name, p in before.items():
        assert torch.equal(p, after[name]) != (name in selected), name
    assert 0 < result.relative_update < 1
    loss_cfg = LossConfig(num_timesteps=20)
    assert float(query_losses(result.model, query, loss_cfg).mean()) > float(
        query_losses(model, query, loss_cfg).mean()
    )


def test_newton_step_matches_the_formula(model, data, query):
    fisher = _fisher(model, data)
    cfg = UnlearnConfig(step_size=1e-3, batch_size=4, accumulations=1, damping=0.1)
    result = unlearn(model, query, cfg, fisher, num_train=len(data), progress=False)
    names = select_parameters(model.unet, KV)
    g = query_gradient(model, names, query, cfg, 0)
    mean_f = sum(fisher[n].sum() for n in names) / sum(fisher[n].numel() for n in names)
    params, new = dict(model.unet.named_parameters()), dict(result.model.unet.named_parameters())
    for n in names:
        expected = params[n] + 1e-3 / len(data) * g[n] / (fisher[n] + 0.1 * mean_f)
        torch.testing.assert_close(new[n], expected)


def test_sgd_step_ascends_the_query_gradient(model, query):
    cfg = UnlearnConfig(method="sgd", step_size=0.5, batch_size=4, accumulations=1)
    result = unlearn(model, query, cfg, None, progress=False)
    names = select_parameters(model.unet, KV)
    g = query_gradient(model, names, query, cfg, 0)
    params, new = dict(model.unet.named_parameters()), dict(result.model.unet.named_parameters())
    for n in names:  # θ + α g, not θ − α g
        torch.testing.assert_close(new[n], params[n] + 0.5 * g[n])


def test_bad_unlearn_config_is_refused(model, query):
    with pytest.raises(AttributionError, match="unknown unlearning method"):
        UnlearnConfig(method="adam")
    with pytest.raises(AttributionError, match="1000 diffusion steps"):
        unlearn(model, query, UnlearnConfig(method="sgd", batch_size=2000), progress=False)
