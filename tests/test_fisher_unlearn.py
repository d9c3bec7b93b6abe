"""Fisher estimation, weight selection and the unlearning update."""

import pytest
import torch

from common.errors import AttributionError
from common.fisher import FisherConfig, estimate_fisher, load_fisher, save_fisher
from common.per_sample_grad import mean_gradient, per_sample_gradients
from common.selection import select_parameters
from common.unlearn import UnlearnConfig, newton_direction, unlearn

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


def test_per_sample_gradients_average_to_the_batch_gradient(model, data):
    names = select_parameters(model.unet, KV)
    idx = torch.arange(5)
    x0, text = data.images(idx), data.text(idx)
    t, noise = torch.tensor([0, 100, 400, 700, 999]), torch.randn(5, 3, 8, 8, dtype=torch.float64)
    per = per_sample_gradients(model.unet, names, x0, text, t, noise, model.alphas_cumprod)
    mean = mean_gradient(model.unet, names, x0, text, t, noise, model.alphas_cumprod)
    for n in names:
        assert per[n].shape == (5, *mean[n].shape)
        torch.testing.assert_close(per[n].mean(0), mean[n], rtol=1e-8, atol=1e-12)


def test_fisher_is_finite_nonnegative_and_batch_invariant(model, data, tmp_path):
    a = estimate_fisher(model.unet, data, model.alphas_cumprod, FisherConfig(num_samples=30, batch_size=30), False)
    b = estimate_fisher(model.unet, data, model.alphas_cumprod, FisherConfig(num_samples=30, batch_size=7), False)
    assert set(a) == set(select_parameters(model.unet, KV))
    for n in a:
        assert torch.isfinite(a[n]).all() and (a[n] >= 0).all() and a[n].sum() > 0
        torch.testing.assert_close(a[n], b[n], rtol=1e-9, atol=1e-15)
    save_fisher(tmp_path / "f.safetensors", a, FisherConfig(num_samples=30), "abc")
    loaded, meta = load_fisher(tmp_path / "f.safetensors", list(a))
    assert meta["model"] == "abc" and '"num_samples": 30' in meta["config"]
    torch.testing.assert_close(loaded[next(iter(a))], a[next(iter(a))])


def test_nan_fisher_file_is_refused(tmp_path):
    save_fisher(tmp_path / "f.safetensors", {"w": torch.tensor([1.0, float("nan")])}, FisherConfig(), "m")
    with pytest.raises(AttributionError, match="NaN"):
        load_fisher(tmp_path / "f.safetensors")
    with pytest.raises(AttributionError, match="missing Fisher file"):
        load_fisher(tmp_path / "absent.safetensors")


def test_damping_keeps_zero_entries_finite():
    g = {"w": torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)}
    f = {"w": torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)}
    d = newton_direction(g, f, damping=0.5)["w"]
    assert torch.isfinite(d).all()
    torch.testing.assert_close(d, torch.tensor([1 / 0.5, 2 / 1.5, 3 / 2.5], dtype=torch.float64))
    with pytest.raises(AttributionError, match="undefined"):
        newton_direction(g, {"w": torch.zeros(3, dtype=torch.float64)}, damping=0.0)


def _fisher(model, data):
    return estimate_fisher(model.unet, data, model.alphas_cumprod, FisherConfig(num_samples=24, batch_size=24), False)


@pytest.mark.parametrize("method", ["newton", "sgd"])
def test_update_changes_only_selected_weights_and_raises_query_loss(model, data, query, method):
    cfg = UnlearnConfig(method=method, step_size=1e-3 if method == "newton" else 1.0, batch_size=8, accumulations=2)
    result = unlearn(
        model.unet, query, model.alphas_cumprod, cfg, _fisher(model, data), num_train=len(data), progress=False
    )
    selected = set(select_parameters(model.unet, KV))
    before, after = dict(model.unet.named_parameters()), dict(result.model.named_parameters())
    for name, p in before.items():
        assert torch.equal(p, after[name]) != (name in selected), name
    assert 0 < result.relative_update < 1


def test_newton_step_matches_the_formula(model, data, query):
    fisher = _fisher(model, data)
    cfg = UnlearnConfig(step_size=1e-3, batch_size=4, accumulations=1, damping=0.1)
    result = unlearn(model.unet, query, model.alphas_cumprod, cfg, fisher, num_train=len(data), progress=False)
    from common.unlearn import query_gradient

    names = select_parameters(model.unet, KV)
    g = query_gradient(model.unet, names, query, model.alphas_cumprod, cfg, 0)
    mean_f = sum(fisher[n].sum() for n in names) / sum(fisher[n].numel() for n in names)
    n0 = names[0]
    expected = dict(model.unet.named_parameters())[n0] + 1e-3 / len(data) * g[n0] / (fisher[n0] + 0.1 * mean_f)
    torch.testing.assert_close(dict(result.model.named_parameters())[n0], expected)


def test_bad_unlearn_config_is_refused():
    with pytest.raises(AttributionError, match="unknown unlearning method"):
        UnlearnConfig(method="adam")
    with pytest.raises(AttributionError, match="batch_size"):
        UnlearnConfig(batch_size=2000)
