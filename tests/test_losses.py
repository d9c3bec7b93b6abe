"""Keyed noise and per-sample losses: invariance to batch size, order and sharding."""

import pytest
import torch

from common import keyed_random
from common.diffusion import add_noise, per_sample_loss, strided_timesteps, unet_denoiser
from common.errors import AttributionError
from common.losses import LossConfig, dataset_losses


def test_keyed_noise_is_stable_and_distinct():
    a = keyed_random.keyed_normal([(0, 1, 5), (0, 1, 6)], (3, 4))
    b = keyed_random.keyed_normal([(0, 1, 6), (0, 1, 5)], (3, 4))
    assert torch.equal(a[0], b[1]) and torch.equal(a[1], b[0])
    assert not torch.allclose(a[0], a[1])
    assert keyed_random.key_seed(1, 2) != keyed_random.key_seed(2, 1)


def test_strided_timesteps_match_the_paper():
    assert strided_timesteps(20) == list(range(0, 1000, 50))
    assert strided_timesteps(10, first=50) == list(range(50, 1000, 100))
    with pytest.raises(ValueError):
        strided_timesteps(7)


def test_add_noise_by_hand():
    ac = torch.tensor([0.25, 0.64], dtype=torch.float64)
    x0, eps = torch.ones(1, 1, 1, 1, dtype=torch.float64), 2 * torch.ones(1, 1, 1, 1, dtype=torch.float64)
    assert add_noise(x0, eps, torch.tensor([1]), ac).item() == pytest.approx(0.8 + 0.6 * 2)


def test_per_sample_loss_is_mse_per_sample():
    zero = lambda x, t, c: torch.zeros_like(x)
    noise = torch.stack([torch.full((1, 2, 2), 1.0), torch.full((1, 2, 2), 3.0)]).double()
    x0 = torch.zeros_like(noise)
    loss = per_sample_loss(zero, x0, torch.zeros(2, 1, 1), torch.tensor([0, 0]), noise, torch.ones(2))
    assert loss.tolist() == [1.0, 9.0]


@pytest.mark.parametrize("batch_size", [1, 7, 32])
def test_losses_do_not_depend_on_batch_size(model, data, batch_size):
    ref = dataset_losses(
        unet_denoiser(model.unet),
        data,
        LossConfig(num_timesteps=4, batch_size=1000),
        model.alphas_cumprod,
        dtype=torch.float64,
    )
    got = dataset_losses(
        unet_denoiser(model.unet),
        data,
        LossConfig(num_timesteps=4, batch_size=batch_size),
        model.alphas_cumprod,
        dtype=torch.float64,
    )
    assert ref.shape == (len(data), 2, 4)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


def test_shards_and_order_match_the_whole(model, data):
    cfg = LossConfig(num_timesteps=4, batch_size=16)
    whole = dataset_losses(unet_denoiser(model.unet), data, cfg, model.alphas_cumprod, dtype=torch.float64)
    order = [7, 2, 11, 0, 5]
    part = dataset_losses(
        unet_denoiser(model.unet), data.subset(order), cfg, model.alphas_cumprod, sample_ids=order, dtype=torch.float64
    )
    torch.testing.assert_close(part, whole[order], rtol=1e-10, atol=1e-12)


def test_captions_are_averaged_and_flips_differ(model, data):
    cfg = LossConfig(num_timesteps=2, batch_size=64)
    both = dataset_losses(unet_denoiser(model.unet), data, cfg, model.alphas_cumprod, dtype=torch.float64)
    assert not torch.allclose(both[:, 0], both[:, 1])  # the flipped image is a different sample
    no_flip = dataset_losses(
        unet_denoiser(model.unet),
        data,
        LossConfig(num_timesteps=2, flips=False),
        model.alphas_cumprod,
        dtype=torch.float64,
    )
    torch.testing.assert_close(no_flip[:, 0], both[:, 0])


def test_other_seed_changes_losses(model, data):
    a = dataset_losses(
        unet_denoiser(model.unet), data, LossConfig(num_timesteps=2), model.alphas_cumprod, dtype=torch.float64
    )
    b = dataset_losses(
        unet_denoiser(model.unet), data, LossConfig(num_timesteps=2, seed=1), model.alphas_cumprod, dtype=torch.float64
    )
    assert not torch.allclose(a, b)


def test_nan_losses_are_refused(model, data):
    with torch.no_grad():
        next(model.unet.parameters()).fill_(float("nan"))
    with pytest.raises(AttributionError, match="NaN"):
        dataset_losses(
            unet_denoiser(model.unet), data, LossConfig(num_timesteps=2), model.alphas_cumprod, dtype=torch.float64
        )


def test_bad_loss_config_is_refused():
    with pytest.raises(AttributionError):
        LossConfig(num_timesteps=7)
