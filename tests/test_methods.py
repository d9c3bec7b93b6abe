"""The method registry and the contract every method keeps: one score per image and orientation, flip-max."""

import numpy as np
import pytest
import torch

from common.cache import cached_array, cached_tensors
from common.errors import AttributionError
from common.methods import get_method, methods
from common.methods.base import Method
from common.methods.pixel import Pixel, PixelConfig
from common.methods.random_scores import Random, RandomConfig


def test_unknown_method_lists_the_choices():
    with pytest.raises(AttributionError, match="unknown method 'trak2'; choose from .*pixel.*random.*unlearning"):
        get_method("trak2")
    assert {"unlearning", "pixel", "random"} <= set(methods())
    for name, cls in methods().items():
        assert issubclass(cls, Method) and cls.name == name


def test_driver_takes_the_max_over_orientations(model, data, query):
    class Fixed(Method):
        name, Config = "fixed", RandomConfig

        def score_flips(self, q):
            return np.stack([np.arange(len(self.data)), np.arange(len(self.data))[::-1]], 1).astype(float), {}

    scores, _ = Fixed(RandomConfig(), model, data).score(query)
    n = len(data)
    assert scores.tolist() == [max(i, n - 1 - i) for i in range(n)]
    model.flips = False
    with pytest.raises(AttributionError, match=r"expected \(12, 1\)"):
        Fixed(RandomConfig(), model, data).score(query)


def test_pixel_finds_the_query_and_its_flip(model, data, query, tmp_path):
    method = Pixel(PixelConfig(batch_size=5), model, data, tmp_path)
    per_flip, _ = method.score_flips(query)
    assert per_flip.shape == (len(data), 2) and per_flip[3, 0] == pytest.approx(1.0)
    flipped = type(query)("f", query.image.flip(-1), query.text, "")
    per_flip, _ = method.score_flips(flipped)
    assert per_flip[3, 1] == pytest.approx(1.0) and method.score(flipped)[0].argmax() == 3
    x = data.images(torch.arange(len(data))).flatten(1)
    q = query.image.flatten()
    cosine = (x @ q / x.norm(dim=1) / q.norm()).numpy()
    np.testing.assert_allclose(Pixel(PixelConfig(), model, data).score_flips(query)[0][:, 0], cosine, rtol=1e-6)
    assert (tmp_path / "pixels.npy").exists()


def test_model_trained_without_flips_is_scored_without_them(model, data, query):
    model.flips = False
    for cls, cfg in [(Pixel, PixelConfig()), (Random, RandomConfig())]:
        per_flip, _ = cls(cfg, model, data).score_flips(query)
        assert per_flip.shape == (len(data), 1)


def test_random_is_seeded_and_shared_by_queries_unless_asked(model, data, query):
    other = type(query)("other", query.image, query.text, "")
    a = Random(RandomConfig(seed=0), model, data).score(query)[0]
    assert np.array_equal(a, Random(RandomConfig(seed=0), model, data).score(other)[0])
    assert not np.array_equal(a, Random(RandomConfig(seed=1), model, data).score(query)[0])
    per = Random(RandomConfig(per_query=True), model, data)
    assert not np.array_equal(per.score(query)[0], per.score(other)[0])


def test_cached_tensors_refuse_another_identity_and_damage(tmp_path):
    path = tmp_path / "a.safetensors"
    calls = []

    def compute():
        calls.append(1)
        return {"x": torch.arange(3.0)}

    identity = {"model": "m", "data": "d", "settings": {"a": 1}}
    cached_tensors(path, identity, compute, "thing")
    assert cached_tensors(path, identity, compute, "thing")["x"].tolist() == [0.0, 1.0, 2.0] and len(calls) == 1
    with pytest.raises(AttributionError, match="thing .* was made with another training set"):
        cached_tensors(path, identity | {"data": "e"}, compute, "thing")
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(AttributionError, match="is damaged"):
        cached_tensors(path, identity, compute, "thing")


def test_cached_array_resumes_after_an_interruption(tmp_path):
    path = tmp_path / "feats.npy"
    full = np.arange(50.0).reshape(10, 5)
    seen = []

    def rows(start, stop):
        seen.append(start)
        if start == 6 and len(seen) < 5:
            raise KeyboardInterrupt  # killed in the middle of the fourth chunk
        return full[start:stop]

    with pytest.raises(KeyboardInterrupt):
        cached_array(path, {"model": "m"}, (10, 5), np.float32, rows, 2, "features", progress=False)
    assert not path.exists()
    out = cached_array(path, {"model": "m"}, (10, 5), np.float32, rows, 2, "features", progress=False)
    assert seen == [0, 2, 4, 6, 6, 8]  # the finished chunks were not recomputed
    np.testing.assert_array_equal(out, full.astype(np.float32))
    assert isinstance(out, np.memmap) and not out.flags.writeable
    with pytest.raises(AttributionError, match="another model"):
        cached_array(path, {"model": "n"}, (10, 5), np.float32, rows, 2, "features", progress=False)


def _offline_methods():
    """Every registered method that needs no downloaded weights, with settings small enough for the test model."""
    from common.diffusion.keyed_losses import LossConfig
    from common.methods.d_trak import DTrakConfig
    from common.methods.journey_trak import JourneyTrakConfig
    from common.methods.text_condition import TextConditionConfig
    from common.methods.trak import TrakConfig
    from common.methods.unlearning import UnlearningConfig
    from common.unlearning.fisher import FisherConfig
    from common.unlearning.unlearn import UnlearnConfig

    small = dict(selection="cross-attn-kv", projection_dim=16, num_timesteps=2, projection_rng="cpu")
    return {
        "unlearning": UnlearningConfig(
            FisherConfig(num_samples=12), LossConfig(num_timesteps=2), UnlearnConfig(batch_size=4, accumulations=1)
        ),
        "random": RandomConfig(),
        "pixel": PixelConfig(),
        "trak": TrakConfig(**small),
        "d-trak": DTrakConfig(**small),
        "journey-trak": JourneyTrakConfig(**small, query_steps=2, query_draws=2),
        "text-condition": TextConditionConfig(),
    }


# Methods whose features come from downloaded networks (tested in test_methods_features.py on random-init ones).
NEEDS_WEIGHTS = {"abc", "clip", "clip-text", "dino", "dinov2"}
NEEDS_A_DISTILLED_MODEL = {"distilled"}  # made by the distill stage from a teacher's runs: tests/test_distilled.py
SAME_FOR_BOTH_ORIENTATIONS = {"random", "text-condition"}  # they do not look at the image's pixels


def test_every_registered_method_is_in_the_offline_test_or_needs_downloaded_weights():
    from common.methods import methods

    # a new method: add it to _offline_methods
    assert set(_offline_methods()) == set(methods()) - NEEDS_WEIGHTS - NEEDS_A_DISTILLED_MODEL


@pytest.mark.parametrize("name", ["unlearning", "random", "pixel", "trak", "d-trak", "journey-trak", "text-condition"])
def test_every_offline_method_scores_both_orientations_and_keeps_the_max(model, data, query, name):
    cfg = _offline_methods()[name]
    method = get_method(name)(cfg, model, data)
    per_flip, stats = method.score_flips(query)
    assert per_flip.shape == (len(data), 2) and np.isfinite(per_flip).all()
    assert not np.array_equal(per_flip[:, 0], per_flip[:, 1]) or name in SAME_FOR_BOTH_ORIENTATIONS
    scores, _ = method.score(query)
    np.testing.assert_array_equal(scores, per_flip.max(1))
