"""Feature baselines (CLIP, CLIP text, DINO, DINOv2, AbC) on random networks of their real architectures.

No hub is reachable here, so each encoder is a randomly initialised network of the released size,
saved the way a user provides real weights (an open_clip checkpoint file, a ``save_pretrained``
folder, an AbC mapper file in the released layout) and loaded back by path. The DINOv2 ViT-L
(300M parameters, 1.2 GB saved; its library init alone takes 15 s, so weights are filled directly)
runs once, on two images cropped to one 14-pixel patch: the real architecture, a small input.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np
import pytest
import torch

from common.data import ArrayTrainingSet, Query
from common.errors import AttributionError
from common.methods import get_method
from common.methods.abc_features import AbcConfig
from common.methods.clip_image import ClipConfig
from common.methods.clip_text import ClipTextConfig
from common.methods.dino import DinoConfig
from common.methods.dinov2 import Dinov2Config
from common.methods.features import Preprocess


def random_fill(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Layer norms at identity, every other parameter from N(0, 0.02^2) draws of ``seed`` (one block of
    draws reused at random offsets: library init and fresh draws of 300M parameters take seconds)."""
    g = torch.Generator().manual_seed(seed)
    block = torch.randn(2**20 + 7, generator=g) * 0.02
    norms = [m for m in net.modules() if isinstance(m, torch.nn.LayerNorm)]
    skip = {id(p) for m in norms for p in m.parameters()}
    with torch.no_grad():
        for m in norms:
            m.weight.fill_(1.0)
            m.bias.zero_()
        for p in net.parameters():
            if id(p) in skip:
                continue
            flat, start = p.view(-1), int(torch.randint(len(block), (1,), generator=g))
            for pos in range(0, flat.numel(), len(block) - start):
                chunk = flat[pos : pos + len(block) - start]
                chunk.copy_(block[start : start + chunk.numel()])
    return net


def no_init():
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def save_vit(folder, seed: int, width: int = 768, layers: int = 12):
    """DINO ViT-B/16's configuration (facebook/dino-vitb16), random weights, saved with save_pretrained."""
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(hidden_size=width, num_hidden_layers=layers, num_attention_heads=12, intermediate_size=4 * width)
    cfg.patch_size, cfg.image_size, cfg.layer_norm_eps, cfg.qkv_bias = 16, 224, 1e-6, True
    with no_init():
        net = ViTModel(cfg, add_pooling_layer=False)
    random_fill(net, seed).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    import open_clip
    from safetensors.torch import save_file

    with no_init():  # open_clip's own init of 151M parameters takes seconds
        net = random_fill(open_clip.create_model("ViT-B-32"), 0)
    path = tmp_path_factory.mktemp("clip") / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return str(path)


@pytest.fixture(scope="module")
def clip_loaded(clip_file):
    from common.methods.clip_image import load_open_clip

    return load_open_clip("ViT-B-32", clip_file, True, "CLIP", "--clip.weights")


@pytest.fixture
def shared_clip(clip_file, clip_loaded, monkeypatch):
    """CLIP text and AbC get the model loaded once by path (a load costs seconds), after checking their request."""
    import common.methods.abc_features
    import common.methods.clip_text

    def load(arch, weights, quick_gelu, what, flag):
        assert (arch, weights, quick_gelu, what) == ("ViT-B-32", clip_file, True, "CLIP")
        return clip_loaded

    monkeypatch.setattr(common.methods.clip_text, "load_open_clip", load)
    monkeypatch.setattr(common.methods.abc_features, "load_open_clip", load)


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory):
    return save_vit(tmp_path_factory.mktemp("dino"), 0)


@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory):
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    # facebook/dinov2-with-registers-large
    cfg = Dinov2WithRegistersConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4)
    cfg.patch_size, cfg.image_size, cfg.num_register_tokens, cfg.layerscale_value = 14, 518, 4, 1.0
    with no_init():
        net = Dinov2WithRegistersModel(cfg)
    folder = tmp_path_factory.mktemp("dinov2")
    random_fill(net, 0).save_pretrained(folder)
    return str(folder)


def mapper_file(path, dim: int, seed: int = 0):
    """An AbC mapper in the released layout: two nn.Linear(dim, dim) state dicts near the identity."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key in ("real_mapper", "synth_mapper"):
        lin = torch.nn.Linear(dim, dim)
        with torch.no_grad():
            lin.weight.copy_(torch.eye(dim) + 0.1 * torch.randn(dim, dim, generator=g))
            lin.bias.copy_(0.1 * torch.randn(dim, generator=g))
        state[key] = lin.state_dict()
    torch.save(state, path)
    return str(path)


@pytest.fixture
def flip_data(data: ArrayTrainingSet, query: Query) -> ArrayTrainingSet:
    """The training set with image 5 replaced by the query's mirror image (the query is image 3)."""
    idx = torch.arange(len(data))
    images = data.images(idx).clone()
    images[5] = query.image.flip(-1)
    text = torch.stack([data.text(idx, c) for c in range(data.num_captions)], 1)
    return ArrayTrainingSet(images, text, data.captions, [f"img{i}.png" for i in idx.tolist()])


def make(name, cfg, model, data, cache_dir=None):
    return get_method(name)(cfg, model, data, cache_dir)


def check_scores(method, query, n):
    scores, stats = method.score_flips(query)
    assert scores.shape == (n, 2) and np.isfinite(scores).all() and isinstance(stats, dict)
    return scores


def check_flip_copy(scores, itself=3, mirror=5):
    assert scores[itself, 0] == pytest.approx(1.0, abs=1e-5)  # the query itself
    assert scores[mirror, 1] == pytest.approx(1.0, abs=1e-5)  # the flip of this image is the query
    assert scores[mirror, 0] < 1 - 1e-4 and scores.max() <= 1 + 1e-5  # unflipped, it is another image


# ---------------------------------------------------------------------------------------------


def test_clip_image_scores_and_a_flipped_copy(clip_file, model, flip_data, query):
    small = flip_data.subset([3, 5, 6])  # ViT-B/32 at its fixed 224 pixels is the slow part on a CPU
    method = make("clip", ClipConfig(weights=clip_file, batch_size=2), model, small)
    check_flip_copy(check_scores(method, query, len(small)), itself=0, mirror=1)
    assert method.encoder.dim == 512 and method.encoder.preprocess.crop == 224


def test_dino_scores_and_a_flipped_copy(dino_dir, model, flip_data, query):
    method = make("dino", DinoConfig(weights=dino_dir, resize=40, crop=32), model, flip_data)
    check_flip_copy(check_scores(method, query, len(flip_data)))
    assert method.encoder.dim == 768


def test_dinov2_large_with_registers_scores_and_a_flipped_copy(dinov2_dir, model, flip_data, query):
    small = flip_data.subset([3, 5])  # 300M parameters: two images, one 14-pixel patch each
    method = make("dinov2", Dinov2Config(weights=dinov2_dir, resize=16, crop=14), model, small)
    check_flip_copy(check_scores(method, query, len(small)), itself=0, mirror=1)
    assert method.encoder.dim == 1024


def test_clip_text_reduces_captions(clip_file, shared_clip, model, data, query):
    small = data.subset(range(4))  # the text tower is the slow part on a CPU
    prompt_query = replace(query, prompt=data.captions[2][0])
    method = make("clip-text", ClipTextConfig(weights=clip_file, batch_size=3), model, small)
    mean = check_scores(method, prompt_query, len(small))
    assert (mean[:, 0] == mean[:, 1]).all()  # text is the same in both orientations
    method.cfg = replace(method.cfg, captions="max")
    best = check_scores(method, prompt_query, len(small))
    method.cfg = replace(method.cfg, captions="first")
    first = check_scores(method, prompt_query, len(small))
    assert best[2, 0] == pytest.approx(1.0, abs=1e-5) and first[2, 0] == pytest.approx(1.0, abs=1e-5)
    assert (mean <= best + 1e-12).all() and mean[2, 0] < 1 - 1e-4
    # the mean is over each image's captions: image 2's are the prompt itself and one other
    prompt, other = torch.nn.functional.normalize(torch.from_numpy(method.features[2]).double(), dim=-1)
    assert mean[2, 0] == pytest.approx((1 + float(prompt @ other)) / 2, abs=1e-6)


def test_text_condition_is_the_cosine_of_flattened_conditions_reduced_over_captions(model):
    from common.methods.text_condition import TextConditionConfig

    g = torch.Generator().manual_seed(0)
    text = torch.randn(5, 2, 3, 4, generator=g)  # 5 images, 2 captions each, conditions of 3 tokens x 4
    data = ArrayTrainingSet(torch.zeros(5, 3, 8, 8), text)
    query = Query("q", torch.zeros(3, 8, 8), text[2, 0].clone())  # image 2's first caption is the prompt
    flat = torch.nn.functional.normalize(text.double().flatten(-2), dim=-1)
    cosine = (flat @ flat[2, 0]).numpy()  # (5, 2) by hand
    expected = {"mean": cosine.mean(1), "max": cosine.max(1), "first": cosine[:, 0]}
    for how, want in expected.items():
        method = make("text-condition", TextConditionConfig(captions=how, batch_size=2), model, data)
        scores = check_scores(method, query, 5)
        np.testing.assert_allclose(scores[:, 0], want, atol=1e-12)
        assert (scores[:, 0] == scores[:, 1]).all()  # text is the same in both orientations
    assert expected["max"][2] == pytest.approx(1.0) and expected["mean"][2] < 1 - 1e-3
    with pytest.raises(AttributionError, match="captions must be one of"):
        TextConditionConfig(captions="median")


def test_clip_text_needs_captions_and_a_prompt(clip_file, model, data, query):
    bare = ArrayTrainingSet(data.images(torch.arange(2)), torch.zeros(2, 1, 8, 8))
    with pytest.raises(AttributionError, match="needs caption strings"):
        make("clip-text", ClipTextConfig(weights=clip_file), model, bare)
    with pytest.raises(AttributionError, match="needs the query's prompt"):
        make("clip-text", ClipTextConfig(weights=clip_file), model, data).score_flips(replace(query, prompt=""))


def test_abc_applies_real_and_synth_mappers(clip_file, shared_clip, model, data, query, tmp_path):
    mapper = mapper_file(tmp_path / "clip_tuned.pth", 512)
    small = data.subset([3, 4])
    abc = make("abc", AbcConfig(mapper=mapper, backbone="clip", weights=clip_file), model, small)
    scores = check_scores(abc, query, len(small))
    # by hand from the raw features: cos(real(train), synth(query)), as the AbC release's eval.py
    state = torch.load(mapper, weights_only=True)
    raw = torch.from_numpy(np.asarray(abc.features, dtype=np.float64))
    train = raw @ state["real_mapper"]["weight"].double().T + state["real_mapper"]["bias"].double()
    q = state["synth_mapper"]["weight"].double() @ abc.embed_query(query).double() + state["synth_mapper"]["bias"]
    want = torch.nn.functional.normalize(train, dim=-1) @ torch.nn.functional.normalize(q, dim=0)
    np.testing.assert_allclose(scores, want.numpy(), atol=1e-6)
    assert abs(scores[0, 0]) < 1 - 1e-3  # the two mappers differ: the query (image 3) is not its own match


def test_abc_refuses_files_of_another_layout(model, data, tmp_path):
    with pytest.raises(AttributionError, match="--abc.mapper"):
        make("abc", AbcConfig(), model, data)
    wrong = mapper_file(tmp_path / "clip_tuned.pth", 512)  # a CLIP mapper given for DINO features (768-d)
    with pytest.raises(AttributionError, match=r"not a linear mapper of 768-d features") as err:
        make("abc", AbcConfig(mapper=wrong, backbone="dino"), model, data).prepare()
    assert "\n" not in str(err.value)
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"real_mapper": argparse.Namespace(weight=1)}, unsafe)  # needs pickled code to load
    with pytest.raises(AttributionError, match="cannot be read as tensors"):
        make("abc", AbcConfig(mapper=str(unsafe), backbone="dino"), model, data).prepare()


def test_cached_features_are_reused_and_other_weights_refused(dino_dir, model, data, query, tmp_path):
    cfg = DinoConfig(weights=dino_dir, resize=32, crop=32, batch_size=5)
    first = make("dino", cfg, model, data, tmp_path)
    scores = first.score_flips(query)[0]
    cache = tmp_path / "dino_features.npy"
    stamp = cache.stat().st_mtime_ns

    again = make("dino", replace(cfg, batch_size=7), model, data, tmp_path)
    again.embed_training = lambda *a: pytest.fail("features recomputed although cached")
    np.testing.assert_array_equal(again.score_flips(query)[0], scores)
    assert cache.stat().st_mtime_ns == stamp

    other_weights = save_vit(tmp_path / "other", seed=1, width=48, layers=1)  # any other file will do
    other = make("dino", replace(cfg, weights=other_weights), model, data, tmp_path)
    with pytest.raises(AttributionError, match=r"another settings \(weights\)"):
        other.prepare()
    changed = make("dino", replace(cfg, crop=16), model, data, tmp_path)
    with pytest.raises(AttributionError, match=r"another settings \(encoder\)"):
        changed.prepare()


@pytest.mark.parametrize(
    "name, cfg, message",
    [
        (
            "dino",
            DinoConfig(weights="/nonexistent/dino"),
            "DINO weights '/nonexistent/dino' not found: pass --dino",
        ),
        ("dino", DinoConfig(weights="no-such-org/no-dino"), "unavailable (offline?): pass --dino.weights PATH"),
        ("dinov2", Dinov2Config(weights="no-such-org/no-dinov2"), "'no-such-org/no-dinov2' unavailable (offline?)"),
        ("clip", ClipConfig(weights="/nonexistent/clip.bin"), "not found: neither a file nor an open_clip tag"),
        ("clip", ClipConfig(), "CLIP weights ViT-B-32/openai unavailable (offline?): pass --clip.weights PATH"),
        ("clip-text", ClipTextConfig(), "unavailable (offline?): pass --clip_text.weights PATH"),
        ("clip", ClipConfig(quick_gelu=False), "trained with QuickGELU"),
    ],
)
def test_missing_weights_are_one_line(name, cfg, message, model, data, query, monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache, wherever this runs
    with pytest.raises(AttributionError) as err:
        make(name, cfg, model, data).score_flips(query)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_folder_of_another_architecture_is_refused(dinov2_dir, dino_dir, model, data, query):
    with pytest.raises(AttributionError, match="ViTModel") as err:
        make("dino", DinoConfig(weights=dinov2_dir), model, data).prepare()
    assert "\n" not in str(err.value)


def test_preprocess_resizes_the_shorter_side_and_crops_the_centre():
    prep = Preprocess(resize=8, crop=6, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    out = prep(torch.zeros(2, 3, 16, 32))  # grey in [-1, 1] stays 0 after (x - 0.5) / 0.5
    assert out.shape == (2, 3, 6, 6) and out.abs().max() < 1e-6
    ramp = torch.linspace(-1, 1, 10).expand(1, 3, 10, 10)
    np.testing.assert_allclose(prep(ramp).flip(-1), prep(ramp.flip(-1)), atol=1e-6)  # flips commute with it
