"""Keyed noise and per-sample losses: invariance to batch size, order and sharding."""

import pytest
import torch

from common import keyed_random
from common.diffusion.ddpm_loss import add_noise, per_sample_loss, strided_timesteps, unet_denoiser
from common.diffusion.keyed_losses import LossConfig, dataset_losses
from common.errors import AttributionError


def test_keyed_noise_is_stable_and_distinct():
    a = keyed_random.keyed_normal([(0, 1, 5), (0, 1, 6)], (3, 4))
    b = keyed_random.keyed_normal([(0, 1, 6), (0, 1, 5)], (3, 4))
    assert torch.equal(a[0], b[1]) and torch.equal(a[1], b[0])
    assert not torch.allclose(a[0], a[1])
    assert keyed_random.key_seed(1, 2) != keyed_random.key_seed(2, 1)


@pytest.mark.parametrize(
    "counter, key, expected",
    [  # Random123's known-answer vectors for philox4x32-10 (tests/kat_vectors of its distribution)
        ("00000000 00000000 00000000 00000000", "00000000 00000000", "6627e8d5 e169c58d bc57ac4c 9b00dbd8"),
        ("ffffffff ffffffff ffffffff ffffffff", "ffffffff ffffffff", "408f276d 41c83b0e a20bc7c6 6d5451fd"),
        ("243f6a88 85a308d3 13198a2e 03707344", "a4093822 299f31d0", "d16cfe09 94fdcceb 5001e420 24126ea1"),
    ],
)
def test_philox_matches_the_reference_known_answers(counter, key, expected):
    def words(text):
        return [torch.tensor([int(w, 16)]) for w in text.split()]

    out = keyed_random.philox4x32(words(counter), words(key))
    assert " ".join(f"{int(w):08x}" for w in out) == expected


def test_keyed_noise_is_the_same_in_any_batch():
    keys = keyed_random.key_rows(3, keyed_random.Purpose.SCORE, torch.arange(64) * 7919, 1, 2, torch.arange(64) % 20)
    whole = keyed_random.keyed_normal(keys, (4, 16, 16))
    for size in (1, 7, 64):
        parts = torch.cat([keyed_random.keyed_normal(keys[i : i + size], (4, 16, 16)) for i in range(0, 64, size)])
        assert torch.equal(parts, whole)
    as_list = keyed_random.keyed_normal([tuple(k) for k in keys.tolist()], (4, 16, 16), torch.float64)
    torch.testing.assert_close(as_list.float(), whole, rtol=0, atol=0)  # list keys = tensor keys, float64 cast
    odd = keyed_random.keyed_normal(keys[:5], (3, 5))  # an odd count per row is the prefix of a longer draw
    assert torch.equal(odd.flatten(1), keyed_random.keyed_normal(keys[:5], (16,))[:, :15])


def test_keyed_noise_is_standard_normal_and_uncorrelated():
    z = keyed_random.keyed_normal(keyed_random.key_rows(0, 1, torch.arange(400)), (1024,), torch.float64)
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01  # 409,600 draws: SE 0.0016, 0.0011
    assert abs((z**4).mean().item() - 3) < 0.05  # kurtosis (SE about 0.015)
    corr = torch.corrcoef(z)[~torch.eye(400, dtype=torch.bool)]  # neighbouring keys: 1024 pairs each
    assert abs(corr.mean().item()) < 1e-3 and abs(corr.std().item() - 1 / 32) < 1e-3  # as for independent rows
    assert corr.abs().max() < 0.2  # 6.4 standard errors
    u = keyed_random.keyed_uniform(keyed_random.key_rows(9, torch.arange(1000)), 8)
    assert 0 < u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.01
    counts = torch.bincount(keyed_random.below(u.flatten(), 5), minlength=5)
    assert counts.min() > 1500 and counts.max() < 1700  # 8,000 draws into 5 bins: 1,600 ± 36


def test_key_rows_follow_the_ids_device_and_empty_draws_work():
    keys = keyed_random.key_rows(3, keyed_random.Purpose.SCORE, torch.arange(4, device="meta"), 1)
    assert keys.device.type == "meta" and keys.shape == (4, 4)  # scalars join the tensors' device (CUDA alike)
    assert keyed_random.keyed_normal(torch.zeros(0, 3, dtype=torch.long), (2, 3)).shape == (0, 2, 3)


def test_keyed_noise_refuses_negative_ids():
    with pytest.raises(ValueError, match="non-negative"):
        keyed_random.keyed_normal([(0, -1)], (2,))


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
    ref = dataset_losses(model, data, LossConfig(num_timesteps=4, batch_size=1000))
    got = dataset_losses(model, data, LossConfig(num_timesteps=4, batch_size=batch_size))
    assert ref.shape == (len(data), 2, 4)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


def test_shards_and_order_match_the_whole(model, data):
    cfg = LossConfig(num_timesteps=4, batch_size=16)
    whole = dataset_losses(model, data, cfg)
    order = [7, 2, 11, 0, 5]
    part = dataset_losses(model, data.subset(order), cfg, sample_ids=order)
    torch.testing.assert_close(part, whole[order], rtol=1e-10, atol=1e-12)


def test_captions_are_averaged_and_flips_differ(model, data):
    cfg = LossConfig(num_timesteps=2, batch_size=64)
    both = dataset_losses(model, data, cfg)
    assert not torch.allclose(both[:, 0], both[:, 1])  # the flipped image is a different sample
    no_flip = dataset_losses(model, data, LossConfig(num_timesteps=2, flips=False))
    torch.testing.assert_close(no_flip[:, 0], both[:, 0])


def test_other_seed_changes_losses(model, data):
    a = dataset_losses(model, data, LossConfig(num_timesteps=2))
    b = dataset_losses(model, data, LossConfig(num_timesteps=2, seed=1))
    assert not torch.allclose(a, b)


def test_nan_losses_are_refused(model, data):
    with torch.no_grad():
        next(model.unet.parameters()).fill_(float("nan"))
    with pytest.raises(AttributionError, match="NaN"):
        dataset_losses(model, data, LossConfig(num_timesteps=2))


def test_losses_by_hand_average_the_captions(model, data):
    """Each entry is the mean over captions of per_sample_loss with the keyed noise of (id, flip, caption, t)."""
    cfg = LossConfig(num_timesteps=2, seed=3)
    got = dataset_losses(model, data, cfg)
    denoise = unet_denoiser(model.unet)
    for i, flip in [(0, 0), (5, 1), (11, 1)]:
        for slot, t in enumerate(cfg.timesteps(model.num_train_timesteps)):
            per_caption = []
            for c in range(data.num_captions):
                noise = keyed_random.keyed_normal(
                    [(3, keyed_random.Purpose.SCORE, i, flip, c, t)], data.image_shape, torch.float64
                )
                x0 = data.images(torch.tensor([i]), bool(flip))
                text = data.text(torch.tensor([i]), c)
                loss = per_sample_loss(denoise, x0, text, torch.tensor([t]), noise, model.alphas_cumprod)
                per_caption.append(float(loss))
            assert data.num_captions == 2 and per_caption[0] != per_caption[1]
            assert float(got[i, flip, slot]) == pytest.approx(sum(per_caption) / 2, rel=1e-10)


def test_a_model_trained_without_flips_is_scored_without_them(model, data):
    model.flips = False
    assert dataset_losses(model, data, LossConfig(num_timesteps=2)).shape == (len(data), 1, 2)


def test_bad_loss_config_is_refused(model, data):
    with pytest.raises(AttributionError):
        LossConfig(num_timesteps=0)
    with pytest.raises(AttributionError, match="1000 diffusion steps"):
        dataset_losses(model, data, LossConfig(num_timesteps=7))


def test_sampling_keeps_no_graph_even_when_the_text_condition_requires_grad(model):
    from common.diffusion.sampling import sample

    text = model.encode_text(["a red square", "a blue circle"]).double().requires_grad_(True)
    noise = keyed_random.keyed_normal([[0, 5, 0], [0, 5, 1]], model.input_shape, dtype=torch.float64)
    out = sample(model, text, noise, [0, 1], num_steps=3, guidance_scale=2.0, progress=False)
    assert out.shape == (2, *model.input_shape) and out.grad_fn is None  # no graph held across the steps
