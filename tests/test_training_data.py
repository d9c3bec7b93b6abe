"""Training with exclusions, resumable checkpoints, image folders and bad input."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from common.data import ArrayTrainingSet
from common.errors import AttributionError
from common.training.train import BatchSchedule, TrainConfig, learning_rate, loss_scale, train
from tiny.data import count_duplicates, load_image_folder
from tiny.shapes import generate


@pytest.mark.parametrize("mode", ["remove", "mask", "zero"])
def test_excluded_images_are_never_visited(mode):
    """remove drops them from the order; mask and zero keep them in the batches but never keep them."""
    cfg = TrainConfig(steps=40, batch_size=7, exclusion_mode=mode)
    sched = BatchSchedule(20, cfg, exclude=[3, 11])
    batches = [sched.batch(step) for step in range(cfg.steps)]
    kept = [i for b in batches for (_, i), k in zip(b, sched.keep(b).tolist()) if k]
    assert set(kept) == set(range(20)) - {3, 11}
    listed = {i for b in batches for _, i in b}
    assert (3 in listed) == (mode != "remove")


def test_the_schedule_is_transformers_cosine_with_a_floor_but_warms_up_from_the_first_step():
    """Why the schedule is our own: transformers' cosine-with-minimum schedule is the same curve after warm-up, but
    its first step has learning rate 0 (warm-up one step behind); taking it would change every trained model."""
    from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

    cfg = TrainConfig(steps=200, warmup_steps=20, lr=1e-3, min_lr_ratio=0.1)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    schedule = get_cosine_with_min_lr_schedule_with_warmup(optimizer, 20, 200, min_lr_rate=0.1)
    theirs = []
    for _ in range(cfg.steps):
        theirs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    ours = [learning_rate(cfg, step) for step in range(cfg.steps)]
    assert ours[20:] == pytest.approx(theirs[20:], rel=1e-12) and ours[-1] == pytest.approx(1e-4, rel=1e-3)
    assert theirs[0] == 0 and ours[:19] == pytest.approx(theirs[1:20]) and ours[0] == pytest.approx(cfg.lr / 20)


def test_empty_exclusion_keeps_the_original_order():
    cfg = TrainConfig(steps=10, batch_size=5)
    a, b = BatchSchedule(20, cfg), BatchSchedule(20, cfg, exclude=[])
    assert [a.batch(s) for s in range(10)] == [b.batch(s) for s in range(10)]


def _fresh(model_cls, cfg):
    torch.manual_seed(0)
    model = model_cls(cfg)
    model.unet.double()
    return model


def test_retraining_with_empty_exclusion_reproduces_weights(data):
    """Every exclusion mode with nothing excluded is the original run, bit for bit; excluding changes it."""
    from tests.conftest import micro_config
    from tiny.model import TinyTextToImage

    runs = {}
    for mode, exclude in [
        ("remove", []),
        ("remove", []),
        ("mask", []),
        ("zero", []),
        ("mask", [0, 1]),
        ("zero", [0, 1]),
    ]:
        model = _fresh(TinyTextToImage, micro_config())
        cfg = TrainConfig(steps=6, batch_size=4, warmup_steps=1, exclusion_mode=mode)
        train(model, data, cfg, exclude, progress=False)
        runs.setdefault((mode, len(exclude)), []).append(model.unet.state_dict())
    original = runs[("remove", 0)][0]
    for other in [runs[("remove", 0)][1], runs[("mask", 0)][0], runs[("zero", 0)][0]]:
        assert all(torch.equal(original[k], other[k]) for k in original)
    masked, zeroed = runs[("mask", 2)][0], runs[("zero", 2)][0]
    assert any(not torch.equal(masked[k], original[k]) for k in original)
    assert any(not torch.equal(masked[k], zeroed[k]) for k in original)


def test_resume_equals_uninterrupted(data, tmp_path):
    from tests.conftest import micro_config
    from tiny.model import TinyTextToImage

    full = _fresh(TinyTextToImage, micro_config())
    whole = train(full, data, TrainConfig(steps=6, batch_size=4, warmup_steps=1), progress=False)

    class Stop(Exception):
        pass

    ckpt = tmp_path / "ckpt.safetensors"
    cfg = TrainConfig(steps=6, batch_size=4, warmup_steps=1, checkpoint_every=3)
    interrupted = _fresh(TinyTextToImage, micro_config())
    calls = {"n": 0}
    original_step = torch.optim.AdamW.step

    def step_then_stop(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise Stop
        return original_step(self, *a, **k)

    torch.optim.AdamW.step = step_then_stop
    try:
        with pytest.raises(Stop):
            train(interrupted, data, cfg, checkpoint=ckpt, progress=False)
    finally:
        torch.optim.AdamW.step = original_step
    resumed = _fresh(TinyTextToImage, micro_config())
    summary = train(resumed, data, cfg, checkpoint=ckpt, progress=False)
    for k, v in full.unet.state_dict().items():
        torch.testing.assert_close(resumed.unet.state_dict()[k], v, rtol=0, atol=0)
    assert summary["final_loss"] == whole["final_loss"]  # the losses before the kill count too (they did not)
    with pytest.raises(AttributionError, match="another training run"):
        train(
            resumed,
            data,
            TrainConfig(steps=6, batch_size=4, lr=0.1, checkpoint_every=3),
            checkpoint=ckpt,
            progress=False,
        )


def test_shapes_folder_loads_with_attributes_and_no_duplicates(tmp_path):
    generate(tmp_path / "shapes", 40, resolution=8, seed=3)
    folder = load_image_folder(tmp_path / "shapes", 8)
    assert folder.pixels.shape == (40, 3, 8, 8) and folder.pixels.min() >= -1 and folder.pixels.max() <= 1
    assert folder.attributes[0]["colour"] in folder.captions[0][0]
    assert count_duplicates(folder.pixels) == 0
    for caps in folder.captions:  # captions never mention left or right: flips keep them true
        assert "left" not in caps[0] and "right" not in caps[0]


def test_class_captions_keep_the_images_and_name_only_colour_and_shape(tmp_path):
    generate(tmp_path / "full", 40, resolution=8, seed=3)
    generate(tmp_path / "class", 40, resolution=8, seed=3, captions="class")
    full, few = load_image_folder(tmp_path / "full", 8), load_image_folder(tmp_path / "class", 8)
    assert np.array_equal(full.pixels, few.pixels)
    for attrs, caps in zip(few.attributes, few.captions):
        assert caps == [f"a {attrs['colour']} {attrs['shape']}"]
    assert len({c[0] for c in few.captions}) < len({c[0] for c in full.captions})
    assert json.loads((tmp_path / "class" / "dataset.json").read_text())["captions"] == "class"
    with pytest.raises(ValueError, match="choose from full, class"):
        generate(tmp_path / "bad", 4, resolution=8, captions="short")


def _write_folder(root, rows, images=("a.png",)):
    root.mkdir()
    for name in images:
        Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(root / name)
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_own_folder_is_resized(tmp_path):
    _write_folder(tmp_path / "ok", [{"file_name": "a.png", "text": "a black image"}])
    folder = load_image_folder(tmp_path / "ok", 16)
    assert folder.pixels.shape == (1, 3, 16, 16) and folder.captions == [["a black image"]]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"file_name": "missing.png", "text": "x"}], "missing image: .*missing.png"),
        ([{"file_name": "a.png"}], "no text for a.png"),
        ([{"file_name": "bad.png", "text": "x"}], "unreadable image .*bad.png"),
    ],
)
def test_bad_folders_are_reported_by_name(tmp_path, rows, message):
    _write_folder(tmp_path / "f", rows)
    (tmp_path / "f" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(AttributionError, match=message):
        load_image_folder(tmp_path / "f", 8)


def test_count_mismatch_is_refused():
    with pytest.raises(AttributionError, match="differ in count: 3 images vs 2"):
        ArrayTrainingSet(torch.zeros(3, 3, 4, 4), torch.zeros(2, 1, 5, 6))
    with pytest.raises(AttributionError, match="differ in count"):
        ArrayTrainingSet.from_stacked(torch.zeros(6, 4, 2, 2), torch.zeros(2, 5, 7, 8))
    stacked = ArrayTrainingSet.from_stacked(torch.arange(4.0).view(4, 1, 1, 1), torch.zeros(2, 5, 7, 8))
    assert stacked.images(torch.tensor([0, 1]), torch.tensor([True, False])).flatten().tolist() == [2.0, 1.0]


@pytest.mark.parametrize("mode", ["remove", "mask", "zero"])
def test_excluded_images_never_touch_a_gradient(data, mode):
    """Excluded images (and so their flips) are set to NaN: any contribution would poison the weights."""
    from tests.conftest import micro_config
    from tiny.model import TinyTextToImage

    poisoned_images = data.images(torch.arange(len(data))).clone()
    poisoned_images[[2, 5]] = float("nan")
    poisoned = ArrayTrainingSet(poisoned_images, data.text(torch.arange(len(data)))[:, None])
    model = _fresh(TinyTextToImage, micro_config())
    cfg = TrainConfig(steps=8, batch_size=6, warmup_steps=1, exclusion_mode=mode)
    train(model, poisoned, cfg, exclude=[2, 5], progress=False)
    assert all(torch.isfinite(p).all() for p in model.unet.parameters())


def test_mask_mode_keeps_the_full_runs_batches():
    cfg = TrainConfig(steps=10, batch_size=5, exclusion_mode="mask")
    full, masked = BatchSchedule(20, cfg), BatchSchedule(20, cfg, exclude=[4, 9])
    for step in range(10):
        assert full.batch(step) == masked.batch(step)
        keep = masked.keep(masked.batch(step)).tolist()
        assert keep == [i not in (4, 9) for _, i in masked.batch(step)]


def test_loss_scale_by_hand():
    assert loss_scale("mask", 32, 32, 32, 1) == 1.0 and loss_scale("zero", 32, 32, 32, 1) == 1.0
    assert loss_scale("mask", 32, 30, 30, 1) == 1.0  # mean over the 30 retained visits
    assert loss_scale("zero", 32, 30, 30, 1) == 30 / 32  # sum over the retained / 32, as in the full run
    # Two processes with 15 visits each: the average of the two scaled means is the batch's mean.
    assert loss_scale("mask", 32, 30, 15, 2) == 1.0 and loss_scale("zero", 32, 30, 15, 2) == 30 / 32
    assert loss_scale("remove", 32, 32, 11, 3) == 33 / 32


def test_exclusion_mode_matters_only_with_exclusions_and_checkpointing_never():
    from common.training.runs import same_recipe

    base = {"train": {"steps": 5, "exclusion_mode": "mask"}, "exclude": [], "data": "abc"}
    assert same_recipe(base, base | {"train": {"steps": 5, "exclusion_mode": "zero"}})
    assert not same_recipe(base, base | {"train": {"steps": 6, "exclusion_mode": "mask"}})
    excluded = base | {"exclude": [3]}
    assert not same_recipe(excluded, excluded | {"train": {"steps": 5, "exclusion_mode": "zero"}})
    assert not same_recipe(None, base)
    assert same_recipe(base, base | {"train": {"steps": 5, "exclusion_mode": "mask", "checkpoint_every": 7}})


def test_training_without_flips_never_flips_and_is_recorded(tmp_path):
    """Data that is not mirror-symmetric: with flips off no visit sees a flipped image, and the model says so."""
    from tests.conftest import micro_config
    from tiny.model import TinyTextToImage
    from tiny.train import train_tiny

    generate(tmp_path / "d", 6, resolution=8, seed=1)
    cfg = TrainConfig(steps=2, batch_size=4, warmup_steps=1, flips=False, checkpoint_every=0)
    model = train_tiny(str(tmp_path / "d"), str(tmp_path / "m"), micro_config(), cfg, [], progress=False)
    assert model.flips is False and TinyTextToImage.load(tmp_path / "m").flips is False
    from common.training import train as training

    seen = []
    original = training.ArrayTrainingSet.images
    training.ArrayTrainingSet.images = lambda self, idx, flips=False: (
        seen.append(torch.as_tensor(flips)) or original(self, idx, flips)
    )
    try:
        train(_fresh(TinyTextToImage, micro_config()), _data_of(tmp_path / "d", model), cfg, progress=False)
        flipped = TrainConfig(steps=2, batch_size=4, warmup_steps=1, checkpoint_every=0)
        train(_fresh(TinyTextToImage, micro_config()), _data_of(tmp_path / "d", model), flipped, progress=False)
    finally:
        training.ArrayTrainingSet.images = original
    assert not any(f.any() for f in seen[:2]) and any(f.any() for f in seen[2:])


def _data_of(folder, model):
    from tiny.pipeline import training_set

    data = training_set(model, load_image_folder(folder, 8))
    return ArrayTrainingSet(data.images(torch.arange(len(data))).double(), data.text(torch.arange(len(data))).double())
