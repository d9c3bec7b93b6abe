"""The customized-model (AbC) benchmark: metrics, task lists, Custom Diffusion files, data, attribution script."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from common.errors import AttributionError
from common.evaluation.retrieval import average_precision, recall_at_k, relevant_ranks
from tests.conftest import ROOT

CONFIG = ROOT / "custom_diffusion" / "configs" / "abc.yaml"


def test_recall_and_average_precision_by_hand():
    # ranking by score: 4 (0.9), 1 (0.8), 3 (0.7), 0 (0.5), 2 (0.1); relevant 1 and 0 at ranks 2 and 4
    scores = np.array([0.5, 0.8, 0.1, 0.7, 0.9])
    assert relevant_ranks(scores, [0, 1]).tolist() == [2, 4]
    assert recall_at_k(scores, [0, 1], 1) == 0.0  # no relevant item in the top 1
    assert recall_at_k(scores, [0, 1], 2) == 0.5
    assert recall_at_k(scores, [0, 1], 4) == 1.0
    assert average_precision(scores, [0, 1]) == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert average_precision(scores, [4]) == 1.0 and average_precision(scores, [2]) == pytest.approx(1 / 5)


def test_ties_are_ranked_against_the_relevant_items():
    flat = np.zeros(6)  # a method that cannot tell anything apart is credited nothing
    assert relevant_ranks(flat, [0, 3]).tolist() == [5, 6]
    assert recall_at_k(flat, [0, 3], 4) == 0.0
    assert average_precision(flat, [0, 3]) == pytest.approx((1 / 5 + 2 / 6) / 2)
    # a tie between two relevant items and one irrelevant: the irrelevant one goes first
    scores = np.array([1.0, 2.0, 2.0, 2.0, 0.0])
    assert relevant_ranks(scores, [1, 3]).tolist() == [2, 3]
    assert average_precision(scores, [1, 3]) == pytest.approx((1 / 2 + 2 / 3) / 2)


@pytest.mark.parametrize(
    "scores, relevant, message",
    [
        (np.array([0.1, np.nan]), [0], "finite"),
        (np.array([0.1, 0.2]), [], "no relevant"),
        (np.array([0.1, 0.2]), [1, 1], "repeat"),
        (np.array([0.1, 0.2]), [2], "outside"),
    ],
)
def test_metrics_refuse_bad_input(scores, relevant, message):
    with pytest.raises(AttributionError, match=message):
        average_precision(scores, relevant)


def write_benchmark(root, n_exemplars=(2, 3)):
    """Two models in the released layout: json/test_bamfg.json, exemplars, synthesized images, model files."""
    import json

    from custom_diffusion.model import CUSTOM_WEIGHTS, TOKEN_FILE

    entries, tasks = [], []
    for m, n in enumerate(n_exemplars):
        class_id = f"10{m}_0"
        exemplars = [f"dataset/exemplar/bamfg/images/{class_id}/{j}.jpg" for j in range(n)]
        synth = [f"dataset/synth/bamfg/gpt/{class_id}/samples/{s:05d}.png" for s in range(2)]
        entries.append({"exemplar": exemplars, "synth": {"gpt": synth}, "class_id": class_id, "category": None})
        model = root / "models" / "bamfg" / class_id
        model.mkdir(parents=True)
        (model / CUSTOM_WEIGHTS).write_bytes(b"")
        (model / TOKEN_FILE).write_bytes(b"")
        for path in exemplars + synth:
            (root / path[len("dataset/") :]).parent.mkdir(parents=True, exist_ok=True)
            (root / path[len("dataset/") :]).write_bytes(b"")
        tasks += [
            {
                "synth_image_path": s[len("dataset/") :],
                "prompt": "A picture of sun in the style of <new1> art",
                "test_case": "test_bamfg",
                "test_case_ind": m,
                "model_path": f"models/bamfg/{class_id}",
                "train_prompt": "A picture in the style of <new1> art",
                "category": "art",
            }
            for s in synth
        ]
    (root / "json").mkdir()
    (root / "json" / "test_bamfg.json").write_text(json.dumps(entries))
    (root / "tasks.json").write_text(json.dumps(tasks))
    return tasks


def test_tasks_resolve_their_exemplars_from_the_benchmark_json(tmp_path):
    from custom_diffusion.tasks import load_tasks

    write_benchmark(tmp_path)
    tasks = load_tasks(tmp_path / "tasks.json", tmp_path)
    assert [t.id for t in tasks] == [f"synth_bamfg_gpt_10{m}_0_samples_0000{s}" for m in (0, 1) for s in (0, 1)]
    assert [len(t.exemplars) for t in tasks] == [2, 2, 3, 3]
    assert tasks[2].exemplars[0] == tmp_path / "exemplar/bamfg/images/101_0/0.jpg"
    assert tasks[0].kind == "style" and tasks[0].model_dir == tmp_path / "models/bamfg/100_0"


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda t, root: t[1].pop("train_prompt"), "task 1 lacks train_prompt"),
        (lambda t, root: t[0].update(test_case="test_mystery"), "unknown test case 'test_mystery'"),
        (lambda t, root: t[0].update(test_case_ind=5), "has 2 models; no entry 5"),
        (lambda t, root: t[0].update(model_path="models/bamfg/101_0"), "is not entry 0 of test_bamfg"),
        (lambda t, root: (root / "models/bamfg/101_0/<new1>.bin").unlink(), "task 2: model folder .* lacks <new1>.bin"),
        (lambda t, root: (root / "exemplar/bamfg/images/100_0/1.jpg").unlink(), "1 exemplar\\(s\\) missing"),
        (lambda t, root: t.append(dict(t[0])), "task 4 repeats"),
    ],
)
def test_task_list_problems_are_one_line_each(tmp_path, damage, message):
    import json

    from custom_diffusion.tasks import load_tasks

    tasks = write_benchmark(tmp_path)
    damage(tasks, tmp_path)
    (tmp_path / "tasks.json").write_text(json.dumps(tasks))
    with pytest.raises(AttributionError, match=message):
        load_tasks(tmp_path / "tasks.json", tmp_path)


def write_stable_diffusion(folder):
    """A pipeline folder of Stable Diffusion's layout and block types at tiny widths (text width 32)."""
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from tests.test_mscoco import write_components

    torch.manual_seed(0)
    UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        layers_per_block=1,
        norm_num_groups=4,
        attention_head_dim=2,
    ).save_pretrained(folder / "unet")
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(
        folder / "scheduler"
    )
    write_components(folder, width=32)


def test_custom_diffusion_files_round_trip_through_the_base_models_code_path(tmp_path):
    import torch

    from common.diffusion.selection import select_parameters
    from custom_diffusion.model import StableDiffusionModel, read_token, save_custom

    write_stable_diffusion(tmp_path / "sd")
    base = StableDiffusionModel.load(tmp_path / "sd")
    assert base.num_train_timesteps == 1000 and base.input_shape == (4, 8, 8)
    before = base.encode_text(["a fish"])
    # a "fine-tuned" model: K/V moved, a new token with its own embedding
    tuned = StableDiffusionModel.load(tmp_path / "sd")
    names = select_parameters(tuned.unet, "cross-attn-kv")
    params = dict(tuned.unet.named_parameters())
    with torch.no_grad():
        for n in names:
            params[n].add_(0.1 * torch.randn_like(params[n]))
    torch.save({"<new1>": torch.randn(32)}, tmp_path / "token.bin")
    token, embedding = read_token(tmp_path / "token.bin", tuned)
    tuned.add_token(token, embedding)
    tuned.token = token
    save_custom(tuned, tmp_path / "custom")
    saved = torch.load(tmp_path / "custom" / "pytorch_custom_diffusion_weights.pt", weights_only=True)
    assert sorted(saved) == sorted(names) and all("attn2" in n for n in names)
    # loaded back into a fresh base model: the same weights, the same text conditions
    custom = StableDiffusionModel.load(tmp_path / "sd").with_custom(tmp_path / "custom")
    loaded = dict(custom.unet.named_parameters())
    assert all(torch.equal(loaded[n], params[n]) for n in names)
    assert all(torch.equal(loaded[n], p) for n, p in dict(base.unet.named_parameters()).items() if n not in names)
    prompts = ["<new1> fish", "a fish"]
    assert torch.equal(custom.encode_text(prompts), tuned.encode_text(prompts))
    assert torch.equal(custom.encode_text(["a fish"]), before)  # the other tokens are untouched
    assert not torch.equal(custom.encode_text(["<new1> fish"])[0], before[0])


def test_custom_diffusion_problems_are_one_line_each(tmp_path):
    import torch

    from common.diffusion.selection import select_parameters
    from custom_diffusion.model import CUSTOM_WEIGHTS, TOKEN_FILE, StableDiffusionModel

    write_stable_diffusion(tmp_path / "sd")
    folder = tmp_path / "custom"
    folder.mkdir()
    with pytest.raises(AttributionError, match="lacks pytorch_custom_diffusion_weights.pt"):
        StableDiffusionModel.load(tmp_path / "sd").with_custom(folder)
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    torch.save({key + "_typo": torch.zeros(8, 32)}, folder / CUSTOM_WEIGHTS)
    torch.save({"a": torch.zeros(32)}, folder / TOKEN_FILE)
    with pytest.raises(AttributionError, match="1 key\\(s\\) the UNet does not have"):
        StableDiffusionModel.load(tmp_path / "sd").with_custom(folder)
    # diffusers' processor names are understood; a token the tokenizer has is refused, before any weight changes
    base = StableDiffusionModel.load(tmp_path / "sd")
    kv = {
        n: p.detach() + 1 for n, p in base.unet.named_parameters() if n in select_parameters(base.unet, "cross-attn-kv")
    }
    processor = {n.replace(".attn2.to_", ".attn2.processor.to_").replace(".weight", "_custom_diffusion.weight"): v
                 for n, v in kv.items()}  # fmt: skip
    torch.save(processor, folder / CUSTOM_WEIGHTS)
    model = StableDiffusionModel.load(tmp_path / "sd")
    with pytest.raises(AttributionError, match="token 'a' already exists in the tokenizer"):
        model.with_custom(folder)
    assert torch.equal(model.unet.state_dict()[key], base.unet.state_dict()[key])
    torch.save({"<new1>": torch.zeros(32)}, folder / TOKEN_FILE)
    assert torch.equal(StableDiffusionModel.load(tmp_path / "sd").with_custom(folder).unet.state_dict()[key], kv[key])
    torch.save({key: torch.zeros(8, 32)}, folder / CUSTOM_WEIGHTS)
    with pytest.raises(AttributionError, match=f"lacks {len(kv) - 1} of the cross-attention K/V weights"):
        StableDiffusionModel.load(tmp_path / "sd").with_custom(folder)
    with pytest.raises(AttributionError, match="missing Stable Diffusion folder"):
        StableDiffusionModel.load(tmp_path / "no" / "such" / "sd")


def test_images_encode_to_scaled_latents_the_mean_or_a_seeded_posterior_sample(tmp_path):
    import torch

    from custom_diffusion.model import StableDiffusionModel

    write_stable_diffusion(tmp_path / "sd")
    model = StableDiffusionModel.load(tmp_path / "sd")
    pixels = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean = model.encode_images(pixels, batch_size=2)
    assert mean.shape == (3, 4, 8, 8) and torch.allclose(mean, model.encode_images(pixels), atol=1e-6)
    dist = model.vae.encode(pixels).latent_dist
    assert torch.allclose(mean, dist.mean * 0.18215, atol=1e-6)  # scaled by the VAE's factor
    one = model.encode_images(pixels, torch.Generator().manual_seed(1))
    assert torch.allclose(one, model.encode_images(pixels, torch.Generator().manual_seed(1), batch_size=2), atol=1e-6)
    assert not torch.equal(one, model.encode_images(pixels, torch.Generator().manual_seed(2)))
    assert torch.allclose(
        (one - mean) / 0.18215,
        dist.std * torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1)),
        atol=1e-5,
    )
    assert model.decode(mean).shape == (3, 3, 64, 64)


def test_memory_mapped_set_keeps_the_first_images_and_their_flips(tmp_path):
    import torch

    from common.memmap import MemmapTrainingSet, open_array, sampled_fingerprint

    rng = np.random.default_rng(0)
    np.save(tmp_path / "latents.npy", rng.normal(size=(10, 4, 8, 8)).astype(np.float16))  # 5 images, then 5 flips
    np.save(tmp_path / "text.npy", rng.normal(size=(5, 77, 32)).astype(np.float16))
    latents, text = open_array(tmp_path / "latents.npy", "latents"), open_array(tmp_path / "text.npy", "text")
    subset = MemmapTrainingSet(latents, text, count=3)
    assert len(subset) == 3 and subset.num_captions == 1
    idx = torch.tensor([2, 0])
    assert torch.equal(subset.images(idx), torch.from_numpy(latents[[2, 0]]))
    assert torch.equal(subset.images(idx, True), torch.from_numpy(latents[[7, 5]]))  # flips start at M = 5
    assert torch.equal(subset.text(idx), torch.from_numpy(text[[2, 0]]))
    assert isinstance(subset._arrays[0], np.memmap)  # still on disk
    full = MemmapTrainingSet(latents, text)
    assert len(full) == 5 and full.fingerprint != subset.fingerprint
    assert full.fingerprint == sampled_fingerprint(latents, text)  # as before subsets existed: caches stay valid
    with pytest.raises(AttributionError, match="cannot keep 6 of 5 images"):
        MemmapTrainingSet(latents, text, count=6)


def test_joined_training_sets_index_as_one(tmp_path):
    import torch

    from common.data import ArrayTrainingSet, ConcatTrainingSet

    g = torch.Generator().manual_seed(0)
    ex = ArrayTrainingSet(torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g), [["a"], ["b"]])
    laion = ArrayTrainingSet(  # stored in float16, as the released arrays
        torch.randn(3, 4, 8, 8, generator=g).half(),
        torch.randn(3, 77, 32, generator=g).half(),
        flipped=torch.randn(3, 4, 8, 8).half(),
    )
    both = ConcatTrainingSet([ex, laion])
    assert len(both) == 5 and both.captions[:2] == [["a"], ["b"]] and both.num_captions == 1
    idx, flips = torch.tensor([4, 0, 2, 1]), torch.tensor([True, True, False, False])
    expected = torch.stack(
        [laion.images([2], True)[0], ex.images([0], True)[0], laion.images([0])[0], ex.images([1])[0]]
    )
    assert both.images(idx, flips).dtype == torch.float32 and torch.equal(both.images(idx, flips), expected.float())
    text = [laion.text([2]), ex.text([0]), laion.text([0]), ex.text([1])]
    assert torch.equal(both.text(idx), torch.cat([t.float() for t in text]))
    part = both.subset([3, 1])
    assert torch.equal(part.images([0, 1], True), both.images(torch.tensor([3, 1]), True))
    assert both.images(torch.tensor([3, 4])).dtype == torch.float32  # one dtype whichever parts a batch reads
    assert both.images(torch.tensor([], dtype=torch.long)).shape == (0, 4, 8, 8)
    assert ConcatTrainingSet([laion, ex]).fingerprint != both.fingerprint
    with pytest.raises(AttributionError, match="outside 0..4"):
        both.images(torch.tensor([5]))
    with pytest.raises(AttributionError, match="inputs"):
        ConcatTrainingSet([ex, ArrayTrainingSet(torch.randn(1, 4, 4, 4), torch.randn(1, 77, 32))])


def write_laion(root, m=6, count_text=None, latents_rows=None, width=32):
    """LAION arrays in the released layout at tiny sizes: (2M, 4, 8, 8) latents, (M, 77, width) conditions."""
    rng = np.random.default_rng(0)
    np.save(root / "laion_latents.npy", rng.normal(size=(latents_rows or 2 * m, 4, 8, 8)).astype(np.float16))
    np.save(root / "laion_text_embeddings.npy", rng.normal(size=(count_text or m, 77, width)).astype(np.float16))


@pytest.mark.parametrize(
    "kwargs, count, message",
    [
        ({"latents_rows": 11}, 4, "holds 11 latents, not 2 x 6"),
        ({"width": 16}, 4, "expected \\(M, 77, 32\\)"),
        ({}, 7, "asked for 7 LAION images"),
    ],
)
def test_laion_arrays_of_the_wrong_layout_are_one_line(tmp_path, kwargs, count, message):
    from custom_diffusion.release import load_laion

    write_laion(tmp_path, **kwargs)
    with pytest.raises(AttributionError, match=message):
        load_laion(tmp_path, count=count, text_width=32)


def write_laion_subset(root, m=6):
    """The LAION images folder and captions file in the release's layout (one caption per sorted image)."""
    (root / "laion_subset" / "images").mkdir(parents=True)
    for i in range(m):
        (root / "laion_subset" / "images" / f"{i:09d}.jpg").write_bytes(b"jpeg")
    (root / "laion_subset" / "captions.txt").write_text("".join(f"caption {i}\n" for i in range(m)))


def test_laion_captions_and_image_paths_are_read_in_the_arrays_order(tmp_path):
    from custom_diffusion.release import load_laion

    write_laion(tmp_path)
    with pytest.raises(AttributionError, match="missing LAION captions"):
        load_laion(tmp_path, count=4, captions=True)
    write_laion_subset(tmp_path)
    assert load_laion(tmp_path, count=4).captions == [[""]] * 4  # read only when asked for
    laion = load_laion(tmp_path, count=4, captions=True)
    assert laion.captions == [["caption 0"], ["caption 1"], ["caption 2"], ["caption 3"]]
    assert [Path(p).name for p in laion.image_paths] == [f"{i:09d}.jpg" for i in range(4)]
    captions = tmp_path / "laion_subset" / "captions.txt"
    captions.write_bytes(b" one \r\ntwo\r\nthree\nfour\n\n")  # stripped as the authors' reader; CRLF too
    assert load_laion(tmp_path, count=4, captions=True).captions == [["one"], ["two"], ["three"], ["four"]]
    with pytest.raises(AttributionError, match="has 5 captions, fewer than the 6 LAION images ranked"):
        load_laion(tmp_path, count=6, captions=True)
    captions.write_text("one\n \nthree\nfour\n")
    with pytest.raises(AttributionError, match="caption 1 \\(line 2\\) is blank"):
        load_laion(tmp_path, count=4, captions=True)


def test_images_are_resized_by_the_shorter_side_and_centre_cropped(tmp_path):
    import torch
    from PIL import Image

    from custom_diffusion.release import read_image

    columns = np.repeat(np.arange(20, dtype=np.uint8)[None, :, None] * 10, 10, 0).repeat(3, 2)  # 10 x 20, x * 10
    Image.fromarray(columns).save(tmp_path / "wide.png")
    pixels = read_image(tmp_path / "wide.png", 10)
    assert pixels.shape == (3, 10, 10)
    assert np.allclose((pixels[0, 0].numpy() + 1) * 127.5, np.arange(5, 15) * 10, atol=1e-4)  # columns 5..14
    # the authors' transforms (torchvision Resize, CenterCrop) on sizes whose rounding differs
    from torchvision import transforms

    reference = transforms.Compose(
        [transforms.Resize(64, interpolation=transforms.InterpolationMode.BILINEAR), transforms.CenterCrop(64),
         transforms.ToTensor(), transforms.Normalize([0.5], [0.5])]
    )  # fmt: skip
    rng = np.random.default_rng(0)
    for h, w in ((375, 500), (500, 375), (64, 97), (64, 64), (81, 64)):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / "odd.png")
        expected = reference(Image.open(tmp_path / "odd.png").convert("RGB"))
        assert torch.allclose(read_image(tmp_path / "odd.png", 64), expected, atol=1e-5), (h, w)


def write_abc(root):
    """A tiny AbC data folder: two customized models (files from the fine-tuning code), images, LAION arrays."""
    import torch
    from PIL import Image

    from custom_diffusion.model import StableDiffusionModel, save_custom

    write_stable_diffusion(root / "sd")
    tasks = write_benchmark(root / "abc")
    rng = np.random.default_rng(1)
    for path in (root / "abc").rglob("*.jpg"):
        Image.fromarray(rng.integers(0, 255, (80, 64, 3), dtype=np.uint8)).save(path, format="PNG")
    for path in (root / "abc" / "synth").rglob("*.png"):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    for model_path in sorted({t["model_path"] for t in tasks}):
        tuned = StableDiffusionModel.load(root / "sd")
        tuned.add_token("<new1>", torch.randn(32))
        tuned.token = "<new1>"
        save_custom(tuned, root / "abc" / model_path)
    write_laion(root / "abc")
    return tasks


def test_a_task_ranks_its_exemplars_first_then_laion_with_the_new_token(tmp_path):
    import json

    import torch

    from custom_diffusion.model import StableDiffusionModel
    from custom_diffusion.release import exemplar_set, load_laion, task_query, training_set
    from custom_diffusion.tasks import load_tasks

    tasks = write_abc(tmp_path)
    (tmp_path / "abc" / "tasks.json").write_text(json.dumps(tasks[2:3]))
    (task,) = load_tasks(tmp_path / "abc" / "tasks.json", tmp_path / "abc")
    model = StableDiffusionModel.load(tmp_path / "sd").with_custom(task.model_dir)
    laion = load_laion(tmp_path / "abc", count=4, text_width=32)
    data = training_set(model, task, laion)
    assert len(data) == 3 + 4 and data.image_paths[0].endswith("101_0/0.jpg")
    assert torch.equal(data.images(torch.tensor([3])), laion.images(torch.tensor([0])))
    assert torch.equal(data.text(torch.arange(3)), model.encode_text([task.train_prompt]).expand(3, -1, -1))
    again = exemplar_set(model, task)
    assert torch.equal(again.images(torch.arange(3), True), data.images(torch.arange(3), True))  # seeded by image
    query = task_query(model, task)
    assert query.image.shape == (4, 8, 8) and query.text.shape == (1, 77, 32) and query.extra["kind"] == "style"
    assert torch.equal(query.text[0], model.encode_text([task.prompt])[0])
    assert model.tokenizer.tokenize("<new1> art") == ["<new1>", "a", "r", "t</w>"]  # the token is one piece


def abc_runner(tmp_path):
    """The abc benchmark's attribute stage on the tiny AbC folder with the micro preset (extra flags appended)."""
    import subprocess
    import sys

    write_abc(tmp_path)
    data = tmp_path / "abc"
    flags = ["--data", str(data), "--tasks", str(data / "tasks.json"), "--sd", str(tmp_path / "sd")]
    flags += ["--out", str(tmp_path / "out"), "--config", str(CONFIG), "--preset", "micro"]
    flags += ["--device", "cpu", "--laion-count", "4", "--no-plot"]

    def run(*extra, check=True):
        command = [sys.executable, "-m", "common.driver", "abc", "attribute", *flags, *extra]
        proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        assert not check or proc.returncode == 0, proc.stderr[-3000:]
        return proc

    return run


def check_retrieval(out, method):
    import json

    rows = json.loads((out / method / "retrieval.json").read_text())
    assert len(rows) == 4 and {r["kind"] for r in rows.values()} == {"style"}
    for query_id, row in rows.items():
        scores = np.load(out / method / query_id / "scores.npy")
        n_ex = 2 if "100_0" in query_id else 3
        assert scores.shape == (n_ex + 4,) and np.isfinite(scores).all()
        assert row["ap"] == pytest.approx(average_precision(scores, list(range(n_ex))))
        assert row["recall@5"] == pytest.approx(recall_at_k(scores, list(range(n_ex)), 5))
    table = (out / method / "retrieval.md").read_text()
    assert "| test_bamfg | 4 |" in table and "| style | 4 |" in table and "| all | 4 |" in table


def test_attribute_script_scores_retrieval_per_query_resumes_and_refuses_a_bad_task(tmp_path, capsys):
    """In process (the subprocess form runs in the slow test below)."""
    import json

    from common.driver import command

    main = command("abc", "attribute")

    write_abc(tmp_path)
    data = tmp_path / "abc"
    flags = ["--data", str(data), "--tasks", str(data / "tasks.json"), "--sd", str(tmp_path / "sd")]
    flags += ["--out", str(tmp_path / "out"), "--config", str(CONFIG), "--preset", "micro"]
    flags += ["--device", "cpu", "--laion-count", "4", "--no-plot"]
    main([*flags, "--method", "random"])
    check_retrieval(tmp_path / "out", "random")
    first, second = sorted((tmp_path / "out" / "random").glob("*100_0*/scores.npy"))[:2]
    assert not np.array_equal(np.load(first), np.load(second))  # the preset draws a ranking per query
    capsys.readouterr()
    main([*flags, "--method", "random"])
    assert capsys.readouterr().out.count("already attributed") == 4
    tasks = json.loads((data / "tasks.json").read_text())
    del tasks[3]["prompt"]
    (data / "tasks.json").write_text(json.dumps(tasks))
    with pytest.raises(SystemExit) as exit_info:
        main([*flags, "--method", "pixel"])
    assert exit_info.value.code == 2 and "task 3 lacks prompt" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "out" / "pixel").exists()
    with pytest.raises(SystemExit):  # the Fisher is the base model's: it must be given
        main([*flags, "--method", "unlearning"])
    assert "pass --fisher.file" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # caption similarity without the LAION captions: refused before any model loads
        main([*flags, "--method", "clip-text", "--clip_text.weights", str(tmp_path / "clip.safetensors")])
    assert "missing LAION captions" in capsys.readouterr().err


def test_trak_ensembles_another_stable_diffusion_or_another_fine_tuning_of_one_concept(tmp_path, capsys):
    """``--trak.ensemble``: a base model folder (customized by each task's model) or a Custom Diffusion folder."""
    import shutil

    import torch
    from diffusers import UNet2DConditionModel

    from common.driver import command

    main = command("abc", "attribute")

    write_abc(tmp_path)
    data = tmp_path / "abc"
    shutil.copytree(tmp_path / "sd", tmp_path / "sd_other")
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "sd" / "unet")
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    unet.save_pretrained(tmp_path / "sd_other" / "unet")  # another model of the same architecture
    flags = ["--data", str(data), "--tasks", str(data / "tasks.json"), "--sd", str(tmp_path / "sd")]
    flags += ["--config", str(CONFIG), "--preset", "micro", "--device", "cpu", "--laion-count", "4", "--no-plot"]
    flags += ["--method", "trak", "--trak.selection", "cross-attn-kv"]
    main([*flags, "--out", str(tmp_path / "alone")])
    main([*flags, "--out", str(tmp_path / "out"), "--trak.ensemble", str(tmp_path / "sd_other")])
    check_retrieval(tmp_path / "out", "trak")
    for folder in sorted((tmp_path / "out" / "trak").glob("*/ranking.json")):
        assert json.loads(folder.read_text())["stats"]["ensemble_size"] == 2
        alone = np.load(tmp_path / "alone" / "trak" / folder.parent.name / "scores.npy")
        assert not np.allclose(np.load(folder.parent / "scores.npy"), alone)
    other_tuning = data / "models" / "bamfg" / "101_0"  # stands in for a second fine-tuning of 100_0's concept
    with pytest.raises(SystemExit) as exit_info:
        main([*flags, "--out", str(tmp_path / "bad"), "--trak.ensemble", str(other_tuning)])
    assert exit_info.value.code == 2 and "2 customized models" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "bad").exists()
    tasks = json.loads((data / "tasks.json").read_text())
    (data / "one.json").write_text(json.dumps([t for t in tasks if t["model_path"].endswith("100_0")]))
    one = [*flags, "--tasks", str(data / "one.json"), "--out", str(tmp_path / "one")]
    main([*one, "--trak.ensemble", str(other_tuning)])
    rankings = [json.loads(f.read_text()) for f in (tmp_path / "one" / "trak").glob("*/ranking.json")]
    assert len(rankings) == 2 and {r["stats"]["ensemble_size"] for r in rankings} == {2}


@pytest.mark.slow  # about a minute: multi-step unlearning on two customized models
def test_attribute_script_unlearns_each_customized_model(tmp_path):
    import torch

    from common.diffusion.selection import select_parameters
    from custom_diffusion.model import StableDiffusionModel

    run = abc_runner(tmp_path)
    unet = StableDiffusionModel.load(tmp_path / "sd").unet
    params = dict(unet.named_parameters())
    fisher = {
        n: torch.rand(params[n].shape, dtype=torch.float64) + 0.1 for n in select_parameters(unet, "cross-attn-kv")
    }
    torch.save(fisher, tmp_path / "sd_fisher.pt")  # as the release's: the base model's, by parameter name
    run("--method", "unlearning", "--fisher.file", str(tmp_path / "sd_fisher.pt"))
    check_retrieval(tmp_path / "out", "unlearning")


@pytest.mark.slow  # about half a minute: a CLIP ViT-B/32 of random weights, saved and loaded by path
def test_attribute_script_ranks_laion_by_its_captions_with_clip_text(tmp_path):
    import json

    import open_clip
    from safetensors.torch import save_file

    from tests.test_methods_features import no_init, random_fill

    run = abc_runner(tmp_path)
    data = tmp_path / "abc"
    tasks = json.loads((data / "tasks.json").read_text())
    write_laion_subset(data)
    captions = (data / "laion_subset" / "captions.txt").read_text().splitlines()
    captions[2] = tasks[0]["prompt"]  # LAION image 2 is captioned with the first query's own prompt
    (data / "laion_subset" / "captions.txt").write_text("\n".join(captions) + "\n")
    with no_init():
        net = random_fill(open_clip.create_model("ViT-B-32"), 0)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "clip.safetensors"))
    run("--method", "clip-text", "--clip_text.weights", str(tmp_path / "clip.safetensors"))
    check_retrieval(tmp_path / "out", "clip-text")
    first = sorted((tmp_path / "out" / "clip-text").glob("*/scores.npy"))
    scores = {path.parent.name: np.load(path) for path in first}
    query_id = next(q for q in scores if json.loads((tmp_path / "out" / "clip-text" / q / "ranking.json").read_text())
                    ["query"]["prompt"] == tasks[0]["prompt"])  # fmt: skip
    n_ex = 2 if "100_0" in query_id else 3
    assert int(np.argmax(scores[query_id])) == n_ex + 2 and scores[query_id][n_ex + 2] == pytest.approx(1, abs=1e-5)


def test_compare_puts_methods_side_by_side_and_plots_object_against_style(tmp_path, capsys):
    import json

    from common.driver import command

    main = command("abc", "compare")

    def row(kind, recall, ap):
        return {"recall@10": recall, "ap": ap, "kind": kind, "test_case": "x"}

    (tmp_path / "unlearning").mkdir()
    (tmp_path / "unlearning" / "retrieval.json").write_text(
        json.dumps({"a": row("object", 1.0, 0.5), "b": row("object", 0.5, 0.3), "c": row("style", 0.0, 0.1)})
    )
    (tmp_path / "random").mkdir()
    (tmp_path / "random" / "retrieval.json").write_text(
        json.dumps({"a": row("style", 0.0, 0.02), "b": row("style", 0.0, 0.4)})
    )
    main(["--out", str(tmp_path)])
    table = (tmp_path / "retrieval.md").read_text().splitlines()
    assert table[2] == (
        "| random | – | – | 0.000 ± 0.000 | 0.210 ± 0.190 | 0.000 ± 0.000 | 0.210 ± 0.190 | 2 (2 clusters) |"
    )  # rows without a concept: independent queries
    # paired on the queries both ranked (a, b): 0.5 - 0.02 = 0.48 and 0.3 - 0.4 = -0.1, mean 0.19 ± 0.29
    assert table[8] == "| unlearning | +0.190 ± 0.290 (1/2) | – |"
    assert table[7] == "| random | – | -0.190 ± 0.290 (1/2) |"
    # objects: recall (1 + 0.5) / 2 = 0.75 ± 0.25, AP 0.4 ± 0.1; all three: AP 0.3 ± 0.115
    assert table[3].startswith(
        "| unlearning | 0.750 ± 0.250 | 0.400 ± 0.100 | 0.000 ± 0.000 | 0.100 ± 0.000 | 0.500 ± 0.289 |"
    )
    assert (tmp_path / "object_vs_style.png").stat().st_size > 0  # unlearning has both kinds
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "empty")])
    assert "no <method>/retrieval.json" in capsys.readouterr().err


def test_compare_clusters_by_concept_then_seed_and_reports_the_queries_that_show_their_concept(tmp_path):
    import json

    from common.driver import command
    from custom_diffusion.compare import retrieval_table

    main = command("abc", "compare")

    def rows(aps):
        where = [("c1", 0), ("c1", 1), ("c2", 0), ("c2", 1)]
        return {f"q{i}": {"recall@10": ap, "ap": ap, "kind": "object", "concept": c, "seed": s}
                for i, (ap, (c, s)) in enumerate(zip(aps, where, strict=True))}  # fmt: skip

    for method, aps in (("unlearning", [0.9, 0.7, 0.1, 0.3]), ("pixel", [0.5, 0.5, 0.2, 0.2])):
        (tmp_path / method).mkdir()
        (tmp_path / method / "retrieval.json").write_text(json.dumps(rows(aps)))
    shows = {"_rule": {"text": "a rule"}} | {f"q{i}": {"shows": i % 2 == 0} for i in range(4)}
    (tmp_path / "shows.json").write_text(json.dumps(shows))
    main(["--out", str(tmp_path)])
    table = (tmp_path / "retrieval.md").read_text().splitlines()
    # concept means 0.8 and 0.2: 0.5 ± 0.3 over 2 concepts (over the 4 queries it would be 0.5 ± 0.183)
    assert table[3].startswith("| unlearning | 0.500 ± 0.300 | 0.500 ± 0.300 |") and "4 (2 concepts)" in table[3]
    # paired per concept: c1 (0.4 + 0.2) / 2 = 0.3, c2 (-0.1 + 0.1) / 2 = 0: 0.15 ± 0.15, higher on 1 of 2 concepts
    assert "| unlearning | +0.150 ± 0.150 (1/2) | – |" in table
    shown = table[table.index("### The queries that show their concept (2 of 4; a rule)") :]
    assert any(line.startswith("| unlearning | 0.500 ± 0.400 |") for line in shown)  # q0 0.9, q2 0.1
    # one concept's line: its seeds are the clusters, (0.9, 0.7): 0.8 ± 0.1
    per_concept = retrieval_table(rows([0.9, 0.7, 0.1, 0.3]), "t", [("concept", ["c1", "c2"])])
    assert "| c1 | 2 | 2 | 0.800 ± 0.100 | 0.800 ± 0.100 |" in per_concept


def test_step_sizes_reports_each_cells_medians_and_its_agreement_with_the_next_step_size(tmp_path):
    from custom_diffusion.step_sizes import table

    def cell(name, aps, query_rises, train_rises, updates, scores):
        folder = tmp_path / name
        rows = {}
        for i, (ap, q, t, u, s) in enumerate(zip(aps, query_rises, train_rises, updates, scores, strict=True)):
            query = folder / "c-s0" / f"c-s0-q{i:03d}"
            query.mkdir(parents=True)
            stats = {"relative_update": u, "query_loss_rise": q, "median_train_loss_rise": t}
            (query / "ranking.json").write_text(json.dumps({"stats": stats}))
            np.save(query / "scores.npy", np.array(s, dtype=np.float64))
            rows[f"c-s0-q{i:03d}"] = {"ap": ap}
        (folder / "retrieval.json").write_text(json.dumps(rows))

    cell("a0.01-s1", [0.2, 0.4], [0.1, 0.3], [0.01, 0.1], [1.0, 3.0], [[1, -2, 3, -4], [-1, -2, -3, 4]])
    cell("a0.03-s1", [0.6, 0.6], [0.5, 0.7], [0.1, 0.35], [3.0, 9.0], [[3, 1, 2, 4], [4, 3, 2, 1]])
    cell("a0.003-s10", [1.0, 0.0], [0.2, 0.2], [0.1, 0.1], [2.0, 2.0], [[1, 2, 3, 4], [1, 2, 3, 4]])
    (tmp_path / "a0.1-s1").mkdir()  # a cell still running: no retrieval.json, left out
    lines = table(tmp_path).splitlines()
    assert len(lines) == 5
    # by step size: 0.003 (10 steps) first; 10 steps have no larger step size
    assert lines[2] == "| 0.003 | 10 | 0.500 | 200% | 0.2 | 0.1 | 2.0 | 100% | – |"
    # 0.01: medians of (0.1, 0.3), (0.01, 0.1), ratios (10, 3) -> 6.5, shares rose (0.5, 0.25) -> 0.375;
    # against 0.03: top-10 of 4 items overlap fully; Spearman -0.4 for the first query, -0.2 for the second
    assert lines[3] == "| 0.01 | 1 | 0.300 | 200% | 0.2 | 0.055 | 6.5 | 38% | 100%, -0.30 |"
    assert lines[4] == "| 0.03 | 1 | 0.600 | 600% | 0.6 | 0.225 | 3.5 | 100% | – |"
    with pytest.raises(AttributionError, match="has no finished tuning cell"):
        table(tmp_path / "a0.1-s1")


def test_finetuning_script_trains_kv_and_the_token_only_and_its_files_load_back(tmp_path, capsys):
    import json

    import torch
    from PIL import Image

    from common.diffusion.selection import select_parameters
    from custom_diffusion.finetune import main
    from custom_diffusion.model import StableDiffusionModel

    write_stable_diffusion(tmp_path / "sd")
    write_laion(tmp_path)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"dog{i}.png")
        Image.fromarray(rng.integers(0, 255, (70, 64, 3), dtype=np.uint8)).save(paths[-1])
    out = tmp_path / "my_dog"
    argv = ["--exemplars", *map(str, paths), "--prompt", "a <new1> dog", "--out", str(out), "--base",
            str(tmp_path / "sd"), "--laion", str(tmp_path), "--laion-count", "4", "--device", "cpu",
            "--finetune.steps", "3", "--finetune.lr", "1e-2", "--finetune.init_word", "g"]  # fmt: skip
    main(argv)
    assert "Custom Diffusion model in" in capsys.readouterr().out
    summary = json.loads((out / "finetune.json").read_text())
    assert summary["regularisation"] == 4 and summary["finetune"]["steps"] == 3
    base = StableDiffusionModel.load(tmp_path / "sd")
    tuned = StableDiffusionModel.load(tmp_path / "sd").with_custom(out)
    kv = set(select_parameters(base.unet, "cross-attn-kv"))
    before, after = base.unet.state_dict(), tuned.unet.state_dict()
    assert all(not torch.equal(before[n], after[n]) for n in kv)  # every K/V weight moved
    assert all(torch.equal(before[n], after[n]) for n in before if n not in kv)  # nothing else did
    row = tuned.token_row("<new1>")
    table = tuned.text_encoder.get_input_embeddings().weight
    g = base.token_ids(["g"])[0, 1]  # the test vocabulary is letters: "g</w>" is one token
    assert row == len(table) - 1 and not torch.equal(table[row], table[g])  # started from "g", then learned
    assert torch.equal(table[:row], base.text_encoder.get_input_embeddings().weight)  # the vocabulary is untouched
    # the same command again: the same model (every draw keyed); refused without --overwrite
    with pytest.raises(SystemExit):
        main(argv)
    assert "pass --overwrite" in capsys.readouterr().err
    main([*argv[:6], str(tmp_path / "again"), *argv[7:]])
    again = StableDiffusionModel.load(tmp_path / "sd").with_custom(tmp_path / "again")
    assert all(torch.equal(after[n], again.unet.state_dict()[n]) for n in kv)
    assert torch.equal(again.text_encoder.get_input_embeddings().weight[row], table[row])
    with pytest.raises(SystemExit):
        main([*argv[:4], "a dog", *argv[5:], "--overwrite"])
    assert "does not contain the new token '<new1>'" in capsys.readouterr().err


def write_hub(files, hub):
    """The two hub datasets' files and the task lists, from an extracted AbC folder, in the release's layout."""
    import json
    import shutil

    from tests.conftest import pack_7z

    tasks = json.loads((files / "tasks.json").read_text())
    (hub / "tasks").mkdir(parents=True)
    (hub / "tasks" / "all_tasks.json").write_text(json.dumps(tasks))
    (hub / "tasks" / "demo_task.json").write_text(json.dumps(tasks[:1]))
    shutil.copytree(files / "json", hub / "json")
    for name in ("imagenet_class_to_categories.json", "path_to_prompts.json"):
        (hub / name).write_text("{}")
    (hub / "abc").mkdir()
    (hub / "abc" / "sd_fisher.pt").write_bytes(b"fisher")
    pack_7z(files, hub / "exemplar" / "exemplar.7z", ["exemplar"], volume=100)
    pack_7z(files, hub / "synth_test" / "synth_test.7z", ["synth"])
    pack_7z(files, hub / "models_test" / "models_test.7z", ["models"], volume=100)
    big = hub / "abc" / "laion_latents_text_embeddings" / "laion_latents_text_embeddings.7z"
    pack_7z(files, big, ["laion_latents.npy", "laion_text_embeddings.npy"], volume=2_000)
    if (files / "laion_subset").is_dir():
        pack_7z(files, hub / "laion_subset" / "laion_subset.7z", ["laion_subset"], volume=100)
    return tasks


def test_download_extracts_the_selected_tasks_files_then_all_and_skips_what_is_complete(tmp_path, capsys):
    from custom_diffusion.download import main

    write_benchmark(tmp_path / "files")
    write_laion(tmp_path / "files")
    write_laion_subset(tmp_path / "files")
    write_hub(tmp_path / "files", tmp_path / "hub")
    assert len(list((tmp_path / "hub" / "models_test").iterdir())) > 1  # split volumes
    listing = sorted((tmp_path / "hub").rglob("*"))
    out = tmp_path / "data"
    args = ["--out", str(out), "--archives", str(tmp_path / "hub"), "--laion-count", "6"]
    main([*args, "--select", "demo"])  # the demo task: one model, its exemplars, one synthesized image
    assert "demo_task.json: 1 tasks of 1 models" in capsys.readouterr().out
    assert (out / "models/bamfg/100_0/<new1>.bin").is_file() and not (out / "models/bamfg/101_0").exists()
    assert sorted(p.name for p in (out / "synth/bamfg/gpt/100_0/samples").iterdir()) == ["00000.png"]
    assert len(list((out / "exemplar/bamfg/images/100_0").iterdir())) == 2 and (out / "sd_fisher.pt").is_file()
    main(args)  # then everything
    printed = capsys.readouterr().out
    assert "all_tasks.json: 4 tasks of 2 models" in printed and "LAION arrays: 6 images" in printed
    assert (out / "models/bamfg/101_0/pytorch_custom_diffusion_weights.pt").is_file()
    assert (out / "laion_latents.npy").read_bytes() == (tmp_path / "files" / "laion_latents.npy").read_bytes()
    assert sorted((tmp_path / "hub").rglob("*")) == listing  # the user's folder is left alone
    stamp = (out / "laion_latents.npy").stat().st_mtime_ns
    main(args)
    printed = capsys.readouterr().out
    assert "already extracted" in printed and (out / "laion_latents.npy").stat().st_mtime_ns == stamp
    assert "LAION captions: absent" in printed and not (out / "laion_subset").exists()  # not asked for
    main([*args, "--laion-captions"])  # the captions only, out of the archive of the images
    assert "LAION captions: read" in capsys.readouterr().out
    assert (out / "laion_subset/captions.txt").read_text().startswith("caption 0\n")
    assert not (out / "laion_subset/images").exists()
    main([*args, "--laion-images"])
    assert len(list((out / "laion_subset/images").iterdir())) == 6
    with pytest.raises(SystemExit):
        main([*args, "--select", "test_artchive"])
    assert "tasks/all_tasks.json has no task of test_artchive" in capsys.readouterr().err


def test_downloaded_volumes_are_deleted_after_a_whole_or_captions_only_extraction_and_kept_after_a_selection(
    tmp_path, monkeypatch, capsys
):
    import fnmatch
    import shutil

    import custom_diffusion.download as download

    write_benchmark(tmp_path / "files")
    write_laion(tmp_path / "files")
    write_laion_subset(tmp_path / "files")
    hub = tmp_path / "hub"
    write_hub(tmp_path / "files", hub)
    out = tmp_path / "data"

    def snapshot(source, into, repo, patterns):  # the Hub's snapshot_download into DATA/hub, from the local copy
        for f in hub.rglob("*"):
            rel = f.relative_to(hub).as_posix()
            if f.is_file() and any(fnmatch.fnmatch(rel, p) for p in patterns):
                (into / "hub" / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, into / "hub" / rel)
        return into / "hub"

    monkeypatch.setattr(download, "release_files", snapshot)
    shutil.copytree(hub / "tasks", out / "tasks")  # not from GitHub
    args = ["--out", str(out), "--select", "demo", "--laion-count", "6"]
    download.main(args)
    assert list((out / "hub" / "models_test").iterdir())  # a selection keeps them for the next selection
    assert not list((out / "hub" / "abc" / "laion_latents_text_embeddings").iterdir())  # extracted whole: deleted
    download.main([*args, "--laion-captions"])
    assert (out / "laion_subset" / "captions.txt").is_file() and not (out / "laion_subset" / "images").exists()
    assert not list((out / "hub" / "laion_subset").iterdir())
    (out / "laion_subset" / "captions.txt").unlink()  # a selected path gone: extracted again, not "already extracted"
    download.main([*args, "--laion-captions"])
    assert (out / "laion_subset" / "captions.txt").is_file()


def test_download_names_a_missing_volume_and_extracts_nothing_of_that_archive(tmp_path, capsys):
    from custom_diffusion.download import main

    write_benchmark(tmp_path / "files")
    write_laion(tmp_path / "files")
    write_hub(tmp_path / "files", tmp_path / "hub")
    sorted((tmp_path / "hub" / "models_test").iterdir())[1].unlink()
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "data"), "--archives", str(tmp_path / "hub")])
    assert "split volumes [1, 3" in capsys.readouterr().err
    assert (tmp_path / "data" / "synth").is_dir() and not (tmp_path / "data" / "models").exists()


def write_twin(root, concepts_extra=""):
    """A micro tiny base model (random weights), its 24-image pretraining set and a two-concept file."""
    import torch

    from tests.conftest import micro_config
    from tiny import shapes
    from tiny.model import TinyTextToImage

    shapes.generate(root / "data", 24, resolution=8)
    torch.manual_seed(0)
    TinyTextToImage(micro_config()).save(root / "base")
    (root / "concepts.yaml").write_text(
        "finetune: {steps: 2, batch_size: 2, lr: 0.01, num_regularisation: 8, init_word: thing}\n"
        "pool: 16\n"
        "queries: {per_concept: 2, num_steps: 4, guidance_scale: 1.0}\n"
        "prompts:\n"
        "  object: {train: 'a <new1> shape', query: 'a {colour} <new1> shape'}\n"
        "  style: {train: 'a shape in <new1> style', query: 'a {colour} {shape} in <new1> style',\n"
        "          neutral: 'a {colour} {shape}'}\n"
        "concepts:\n"
        "  - {name: ring, kind: object, shape: ring, exemplars: 2, split: tune}\n"
        "  - {name: stripes, kind: style, style: stripes, exemplars: 3, split: report}\n" + concepts_extra
    )


def test_tiny_twin_teaches_concepts_and_scores_exemplar_retrieval_per_kind(tmp_path, capsys):
    import json

    from common.driver import command
    from custom_diffusion.model import apply_custom
    from custom_diffusion.tiny_abc import main
    from tiny.model import TinyTextToImage

    attribute = command("tiny_abc", "attribute")

    write_twin(tmp_path)
    common = ["--base", str(tmp_path / "base"), "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"),
              "--concepts", str(tmp_path / "concepts.yaml"), "--device", "cpu"]  # fmt: skip
    main(["prepare", *common])
    assert len(list((tmp_path / "out/concepts/stripes/images").iterdir())) == 3
    assert (tmp_path / "out/concepts.png").stat().st_size > 0  # exemplars and queries, a row per concept
    from custom_diffusion.tiny_abc import concept_images, load_concepts

    stripes = load_concepts(tmp_path / "concepts.yaml")[0][1]
    assert [len(files) for files in concept_images(tmp_path / "out", stripes)] == [3, 2]  # what concepts.png shows
    model = apply_custom(TinyTextToImage.load(tmp_path / "base"), tmp_path / "out/models/ring-s0")
    assert model.token == "<new1>" and model.token_ids(["a <new1> shape"])[0, 2] == model.token_row("<new1>")
    query = json.loads((tmp_path / "out/queries/stripes-s0/stripes-s0-q001/query.json").read_text())
    assert "in <new1> style" in query["prompt"]
    main(["prepare", *common])
    assert capsys.readouterr().out.count(": ready") == 2  # resumed: nothing redone
    with pytest.raises(SystemExit):  # the regularisation images (16 on) are not ranked
        attribute([*common, "--method", "pixel", "--no-plot", "--pool", "20"])
    assert "regularisation images start at image 16" in capsys.readouterr().err
    for concept in ("ring", "stripes"):
        regular = json.loads((tmp_path / f"out/models/{concept}-s0/finetune.json").read_text())["regularisation_images"]
        assert len(regular) == 8 and min(regular) >= 16  # all from outside the ranked pool
        moved = json.loads((tmp_path / f"out/models/{concept}-s0/finetune.json").read_text())["relative_change"]
        assert 0 < moved["cross-attn-kv"] and 0 < moved["all"]  # every weight is fine-tuned (the file's selection)
    assert "| ring-s0 | object | 2 |" in (tmp_path / "out/models.md").read_text()
    attribute([*common, "--method", "pixel", "--no-plot", "--pool", "16"])
    rows = json.loads((tmp_path / "out/pixel/retrieval.json").read_text())
    assert sorted(rows) == ["ring-s0-q000", "ring-s0-q001", "stripes-s0-q000", "stripes-s0-q001"]
    assert all(
        0 <= r["ap"] <= 1 and r["kind"] == ("object" if k.startswith("ring") else "style") for k, r in rows.items()
    )
    scores = np.load(tmp_path / "out/pixel/stripes-s0/stripes-s0-q000/scores.npy")
    assert scores.shape == (3 + 16,)  # the exemplars, then the first 16 pretraining images
    table = (tmp_path / "out/pixel/retrieval.md").read_text()
    assert "| stripes | 2 |" in table and "| object | 2 |" in table
    # the prompt-only control: stripes' queries take ring's images (the next concept, wrapping), keep their prompts
    with pytest.raises(SystemExit):
        attribute([*common, "--method", "pixel", "--no-plot", "--pool", "16", "--swap-images"])
    assert "--swap-images needs --tag" in capsys.readouterr().err
    attribute([*common, "--method", "pixel", "--no-plot", "--pool", "16", "--swap-images", "--tag", "swapped"])
    for unit, donor in (("stripes-s0", "ring-s0"), ("ring-s0", "stripes-s0")):
        swapped = np.load(tmp_path / f"out/swapped/{unit}/{unit}-q001/scores.npy")
        own = np.load(tmp_path / f"out/pixel/{donor}/{donor}-q001/scores.npy")
        np.testing.assert_array_equal(swapped[-16:], own[-16:])  # the donor's image against the same pool
        assert not np.array_equal(swapped[-16:], np.load(tmp_path / f"out/pixel/{unit}/{unit}-q001/scores.npy")[-16:])
    assert sorted(json.loads((tmp_path / "out/swapped/retrieval.json").read_text())) == sorted(rows)
    # the image-only control: own images, neutral prompts (the kind's template, or "thing" in the token's place)
    with pytest.raises(SystemExit):
        attribute([*common, "--method", "pixel", "--no-plot", "--pool", "16", "--without-token"])
    assert "--without-token needs --tag" in capsys.readouterr().err
    attribute([*common, "--method", "text-condition", "--no-plot", "--pool", "16"])
    for method in ("pixel", "text-condition"):
        attribute([*common, "--method", method, "--no-plot", "--pool", "16", "--without-token",
              "--tag", f"no-token-{method}"])  # fmt: skip

    def q001(tag, unit):
        return np.load(tmp_path / f"out/{tag}/{unit}/{unit}-q001/scores.npy")

    for unit in ("stripes-s0", "ring-s0"):
        np.testing.assert_array_equal(q001("no-token-pixel", unit), q001("pixel", unit))  # the query's own image
        assert not np.allclose(q001("no-token-text-condition", unit), q001("text-condition", unit))
    import torch

    from common.queries import load_queries
    from custom_diffusion.tiny_abc import load_concepts, without_token

    spec = load_concepts(tmp_path / "concepts.yaml")[1]
    model = apply_custom(TinyTextToImage.load(tmp_path / "base"), tmp_path / "out/models/stripes-s0")
    queries = load_queries(tmp_path / "out/queries/stripes-s0")
    (changed, *_) = without_token(queries, model, spec)  # a style: its kind's neutral prompt, no "in <new1> style"
    assert changed.prompt == "a {colour} {shape}".format(**queries[0].extra["attributes"])
    assert changed.text.shape == queries[0].text.shape
    torch.testing.assert_close(changed.text, model.encode_text([changed.prompt]))
    with pytest.raises(AttributionError, match="stripes-s0-q000 has no <new1>"):
        without_token([changed], model, spec)
    ring = load_queries(tmp_path / "out/queries/ring-s0")[0]  # an object: no neutral prompt, the token's first word
    assert without_token([ring], model, spec)[0].prompt == ring.prompt.replace("<new1>", "thing")
    text = (tmp_path / "concepts.yaml").read_text()
    (tmp_path / "bad.yaml").write_text(text.replace("neutral: 'a {colour} {shape}'", "neutral: 'a <new1> {shape}'"))
    with pytest.raises(AttributionError, match=r"prompts.style.neutral \(the image-only control's prompt\) must not"):
        load_concepts(tmp_path / "bad.yaml")
    from tests.conftest import ROOT

    config = str(ROOT / "tiny" / "configs" / "tiny.yaml")
    argv = [*common, "--method", "unlearning", "--config", config, "--preset", "micro"]
    attribute([*argv, "--split", "report", "--tag", "unlearning-report", "--no-plot"])
    rows = json.loads((tmp_path / "out/unlearning-report/retrieval.json").read_text())
    assert sorted(rows) == ["stripes-s0-q000", "stripes-s0-q001"]
    assert (tmp_path / "out/cache/base-pool16-cross-attn-kv/fisher.safetensors").is_file()  # the base model's
    attribute([*argv, "--split", "report", "--tag", "ekfac-own", "--no-plot", "--unlearn.preconditioner", "ekfac",
          "--curvature", "custom"])  # fmt: skip
    (own,) = (tmp_path / "out/cache").glob("unlearning/custom-*/stripes-s0/ekfac/lambda_matrix.safetensors")
    fitted = own.stat().st_mtime_ns
    attribute([*argv, "--split", "report", "--tag", "ekfac-own-a1e-3", "--no-plot", "--unlearn.preconditioner", "ekfac",
          "--curvature", "custom", "--unlearn.step_size", "1e-3"])  # fmt: skip
    assert list((tmp_path / "out/cache").glob("unlearning/custom-*/stripes-s0/ekfac/lambda_matrix.*")) == [own]
    assert own.stat().st_mtime_ns == fitted  # another step size: the factors are not fitted again
    attribute([*common, "--method", "trak", "--config", config, "--preset", "micro", "--split", "report",
               "--no-plot", "--trak.ensemble", str(tmp_path / "base"), "--trak.projection_dim", "64"])  # fmt: skip
    trak = json.loads((tmp_path / "out/trak/stripes-s0/stripes-s0-q000/config.json").read_text())["settings"]
    assert len(trak["ensemble"]) == 1  # a second member: the base folder customized by the concept's files
    assert sorted(json.loads((tmp_path / "out/trak/retrieval.json").read_text())) == [
        "stripes-s0-q000",
        "stripes-s0-q001",
    ]
    assert sorted(json.loads((tmp_path / "out/ekfac-own/retrieval.json").read_text())) == [
        "stripes-s0-q000",
        "stripes-s0-q001",
    ]
    # which queries show their concept: one made a mirrored exemplar (it does), one a ranked pool image (it does not)
    from tiny.data import load_image_folder

    exemplar = load_image_folder(tmp_path / "out/concepts/ring", 8).pixels[0].flip(-1)
    np.save(tmp_path / "out/queries/ring-s0/ring-s0-q000/input.npy", exemplar.numpy())
    np.save(
        tmp_path / "out/queries/stripes-s0/stripes-s0-q000/input.npy",
        load_image_folder(tmp_path / "data", 8).pixels[3].numpy(),
    )
    main(["shows", *common])
    shows = json.loads((tmp_path / "out/shows.json").read_text())
    assert sorted(shows) == ["_rule", "ring-s0-q000", "ring-s0-q001", "stripes-s0-q000", "stripes-s0-q001"]
    assert shows["ring-s0-q000"]["shows"] and shows["ring-s0-q000"]["exemplar"] == pytest.approx(1.0)
    assert not shows["stripes-s0-q000"]["shows"] and shows["stripes-s0-q000"]["pool"] == pytest.approx(1.0)
    assert "of 4 queries show their concept" in capsys.readouterr().out


@pytest.mark.slow  # about two minutes: the whole twin script at micro scale
def test_tiny_twin_script_tunes_on_one_split_and_reports_the_other(tmp_path):
    import json
    import os
    import subprocess

    write_twin(tmp_path)
    env = os.environ | {
        "BASE": str(tmp_path / "base"), "BASE_DATA": str(tmp_path / "data"),
        "CONCEPTS": str(tmp_path / "concepts.yaml"), "POOL": "16", "GRID_STEP_SIZES": "0.0001 0.001",
        "GRID_STEPS": "1 2", "DRAWS": "16", "METHODS": "pixel random text-condition", "PRESET": "micro",
        "SHARDS": "2", "SEEDS": "0",  # ring and stripes side by side; on one split shard 1 has nothing to do
        "CONTROL": "1 no-token", "VARIANTS": "diagonal:cross-attn-kv:base:0.01", "TUNE_CONTROL": "no-token",
    }  # fmt: skip
    out = tmp_path / "out"
    proc = subprocess.run(["bash", "custom_diffusion/scripts/tiny_abc.sh", str(out)], env=env, cwd=ROOT,
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no concept left" in (out / "shard1.log").read_text()  # the last step's: text-condition on stripes only
    tune = (out / "tune" / "tune.md").read_text()
    assert tune.count("| 0.0001 |") == 2 and tune.count("| 0.001 |") == 2 and "chosen on the tune concepts" in tune
    assert tune.count("| diagonal | cross-attn-kv | base | 0.01 |") == 4  # every cell with its relative update
    assert tune.startswith("Tuned under the control no-token.")
    name = "unlearning-diagonal-cross-attn-kv-base-d0.01"
    tuned = json.loads((out / "tune" / name / "a0.001-s2" / "retrieval.json").read_text())
    assert sorted(tuned) == ["ring-s0-q000", "ring-s0-q001"]  # tuned on the tune split only
    cell = out / "tune" / name / "a0.001-s2" / "ring-s0" / "ring-s0-q000"
    assert json.loads((cell / "config.json").read_text())["settings"]["unlearn"]["damping"] == 0.01
    assert "<new1>" not in json.loads((cell / "ranking.json").read_text())["query"]["prompt"]  # the image only
    reported = out / name / "stripes-s0" / "stripes-s0-q000"
    assert "<new1>" in json.loads((reported / "ranking.json").read_text())["query"]["prompt"]  # reported as asked
    (fisher,) = (out / "cache").glob("unlearning/base-*/ring-s0/base_losses*")  # the grid shares one cache
    for method in (name, "pixel", "random", "text-condition"):
        ids = sorted(json.loads((out / method / "retrieval.json").read_text()))
        assert ids == ["stripes-s0-q000", "stripes-s0-q001"]
    first, second = (np.load(out / "random" / "stripes-s0" / f"stripes-s0-q00{i}" / "scores.npy") for i in (0, 1))
    assert not np.array_equal(first, second)  # drawn per query
    # and per concept: the first query of each concept is sampled from other noise
    noise = [np.load(out / "queries" / c / f"{c}-q000" / "noise.npy") for c in ("ring-s0", "stripes-s0")]
    assert not np.array_equal(*noise)
    assert f"| {name} |" in (out / "retrieval.md").read_text()
    times = (out / "times.md").read_text()
    assert "| report: random |" in times and "failed" not in times
    for method in (name, "pixel", "random", "text-condition"):  # the prompt-only control: ring's images
        assert sorted(json.loads((out / "controls" / method / "retrieval.json").read_text())) == ids
    swapped = np.load(out / "controls" / "pixel" / "stripes-s0" / "stripes-s0-q000" / "scores.npy")
    assert not np.array_equal(swapped, np.load(out / "pixel" / "stripes-s0" / "stripes-s0-q000" / "scores.npy"))
    assert "| pixel |" in (out / "controls" / "retrieval.md").read_text() and "| control 1: pixel |" in times
    for method in (name, "pixel", "random", "text-condition"):  # the image-only control: own images, no token
        assert sorted(json.loads((out / "no_token" / method / "retrieval.json").read_text())) == ids
    own_image = np.load(out / "no_token" / "pixel" / "stripes-s0" / "stripes-s0-q000" / "scores.npy")
    np.testing.assert_array_equal(own_image, np.load(out / "pixel" / "stripes-s0" / "stripes-s0-q000" / "scores.npy"))
    assert "queries that show their concept" in (out / "no_token" / "retrieval.md").read_text()
    bad = subprocess.run(["bash", "custom_diffusion/scripts/tiny_abc.sh", str(out)], env=env | {"CONTROL": "prompt"},
                         cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2 and "CONTROL takes swap and no-token, not prompt" in bad.stderr
    assert (out / "times.md").read_text() == times  # refused before anything was written
    for bad_env, line in (
        (env | {"TUNE_CONTROL": "prompt"}, "CONTROL takes swap and no-token, not prompt"),
        (env | {"VARIANTS": "ekfac:cross-attn-kv:base:high"}, "damping is a number, not high"),
    ):
        bad = subprocess.run(["bash", "custom_diffusion/scripts/tiny_abc.sh", str(out)], env=bad_env, cwd=ROOT,
                             capture_output=True, text=True)  # fmt: skip
        assert bad.returncode == 2 and line in bad.stderr
    assert (out / "times.md").read_text() == times


def test_tiny_twin_replicates_share_exemplars_and_differ_in_fine_tuning_and_query_seeds(tmp_path):
    from custom_diffusion.tiny_abc import concept_seed, load_concepts, query_prefix

    write_twin(tmp_path, "seeds: [0, 2]\n")
    concepts, _ = load_concepts(tmp_path / "concepts.yaml")
    assert [c.unit for c in concepts] == ["ring-s0", "ring-s2", "stripes-s0", "stripes-s2"]
    first, second = concepts[:2]
    assert concept_seed(first, 0, 0) == concept_seed(second, 0, 0)  # the exemplars: the concept's
    assert all(concept_seed(first, 0, p) != concept_seed(second, 0, p) for p in (1, 2))  # queries, fine-tuning
    assert concept_seed(first, 0, 2) != concept_seed(concepts[2], 0, 2)  # and other concepts of the same seed
    assert query_prefix(second) == "ring-s2-q"


def test_tiny_twin_shards_keep_every_seed_of_a_concept_together_and_cover_each_concept_once(tmp_path):
    from custom_diffusion.tiny_abc import load_concepts, replicates, shard

    write_twin(tmp_path, "  - {name: tee, kind: object, shape: tee, exemplars: 1, split: report}\nseeds: [0, 2]\n")
    concepts, _ = load_concepts(tmp_path / "concepts.yaml")
    parts = [[c.unit for c in shard(f"{i}/2", concepts)] for i in range(2)]
    assert parts == [["ring-s0", "ring-s2", "tee-s0", "tee-s2"], ["stripes-s0", "stripes-s2"]]
    assert shard(None, concepts) == concepts
    assert shard("3/4", concepts) == []  # fewer concepts than shards: nothing to do
    assert [c.unit for c in replicates("2", concepts)] == ["ring-s2", "stripes-s2", "tee-s2"]
    with pytest.raises(AttributionError, match=r"has seeds \[0, 2\]"):
        replicates("0,1", concepts)
    for bad, message in [("2/2", "expected I/N"), ("1", "expected I/N"), ("-1/2", "expected I/N")]:
        with pytest.raises(AttributionError, match=message):
            shard(bad, concepts)


@pytest.mark.parametrize(
    "extra, message",
    [
        ("  - {name: ring, kind: object, shape: ring, exemplars: 1, split: report}\n", "repeated or bad name 'ring'"),
        ("  - {name: blob, kind: object, exemplars: 1, split: report}\n", "an object concept needs a shape"),
        ("  - {name: x, kind: texture, shape: ring, exemplars: 1, split: report}\n", "kind must be one of object"),
        ("  - {name: x, kind: style, style: spots, exemplars: 1, split: report}\n", "unknown style 'spots'"),
        ("seeds: [0, 0]\n", "seeds must be a list of distinct"),
        ("  - {name: x, kind: style, style: outline, exemplars: 0, split: report}\n", "exemplars must be a positive"),
    ],
)
def test_tiny_twin_concept_problems_are_one_line(tmp_path, capsys, extra, message):
    from custom_diffusion.tiny_abc import main

    write_twin(tmp_path, extra)
    with pytest.raises(SystemExit):
        main(["prepare", "--base", str(tmp_path / "base"), "--data", str(tmp_path / "data"),
              "--out", str(tmp_path / "out"), "--concepts", str(tmp_path / "concepts.yaml")])  # fmt: skip
    assert message in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_finetuning_trains_only_the_selected_weights_and_the_token_row_of_the_tiny_model(model, data):
    import torch

    from common.diffusion.selection import select_parameters
    from custom_diffusion.finetune import FinetuneConfig, finetune

    base = {k: v.clone() for k, v in model.unet.state_dict().items()}
    table = model.text_encoder.get_input_embeddings().weight.detach().clone()
    cfg = FinetuneConfig(steps=3, batch_size=2, lr=1e-2, init_word="shape", num_regularisation=4)
    summary = finetune(model, data.subset([0, 1]), "a <new1> shape", data, cfg, progress=False)
    assert summary["regularisation"] == 4 and model.token == "<new1>"
    kv = set(select_parameters(model.unet, "cross-attn-kv"))
    after = model.unet.state_dict()
    assert all(not torch.equal(base[n], after[n]) for n in kv) and all(
        torch.equal(base[n], after[n]) for n in base if n not in kv
    )
    assert all(p.grad is None for p in model.text_encoder.parameters()) and not model.unet.training
    new = model.text_encoder.get_input_embeddings().weight
    assert torch.equal(new[: len(table)], table) and not torch.equal(new[-1], table[model.token_ids(["shape"])[0, 1]])


def test_tiny_tokenizer_matches_open_clip_and_keeps_added_tokens_whole_through_save_and_load(tmp_path):
    import torch
    from open_clip.tokenizer import tokenize as clip_tokenize

    from tests.conftest import micro_config
    from tiny.model import TinyTextToImage, tokenize

    captions = ["a red circle at the top", "", "word " * 30, "A Big  SQUARE, 'quoted'!"]
    for length in (8, 20, 77):
        assert torch.equal(tokenize(captions, length), clip_tokenize(captions, context_length=length))
    model = TinyTextToImage(micro_config())
    model.add_token("<new1>", torch.ones(8))
    model.add_token("<new10>", torch.full((8,), 2.0))
    ids = model.token_ids(["a <new10> and a <new1> shape"])[0]
    assert ids[2] == model.token_row("<new10>") and ids[5] == model.token_row("<new1>")  # the longer one is whole
    with pytest.raises(AttributionError, match="token 'circle' already exists"):
        model.add_token("circle", torch.zeros(8))
    model.save(tmp_path / "m")
    again = TinyTextToImage.load(tmp_path / "m")
    assert again.added_tokens == model.added_tokens
    assert torch.equal(again.encode_text(["a <new10> shape"]), model.encode_text(["a <new10> shape"]))


def test_the_stable_tiny_preset_is_the_default_at_50_scoring_timesteps():
    from common.config import read_presets
    from tests.conftest import ROOT

    presets = read_presets(ROOT / "tiny" / "configs" / "tiny.yaml")
    stable, default = presets["stable"], presets["default"]
    assert stable["loss"] == default["loss"] | {"num_timesteps": 50}
    assert {k: v for k, v in stable.items() if k != "loss"} == {k: v for k, v in default.items() if k != "loss"}


def test_fit_curvature_fits_the_base_models_factors_once_for_every_customized_model(tmp_path, capsys):
    """EK-FAC of SD's K/V on the LAION subset, then attribution with them (in process)."""
    from common.driver import command
    from common.unlearning.ekfac import read_factor_folder

    attribute = command("abc", "attribute")
    from custom_diffusion.fit_curvature import main
    from custom_diffusion.model import StableDiffusionModel

    write_abc(tmp_path)
    data = tmp_path / "abc"
    common = ["--data", str(data), "--sd", str(tmp_path / "sd"), "--config", str(CONFIG), "--preset", "micro"]
    common += ["--device", "cpu", "--laion-count", "4"]
    fit = [*common, "--out", str(tmp_path / "curvature"), "--unlearn.preconditioner", "ekfac"]
    with pytest.raises(SystemExit):  # one line, nothing written
        main([*fit, "--unlearn.preconditioner", "kfac"])
    assert "unknown preconditioner 'kfac'" in capsys.readouterr().err
    assert not (tmp_path / "curvature").exists()
    main(fit)
    folder = tmp_path / "curvature" / "ekfac"
    assert f"--fisher.file {folder}" in capsys.readouterr().out
    factors = read_factor_folder(folder, StableDiffusionModel.load(tmp_path / "sd"), "cross-attn-kv")
    assert factors.modules and all(m.name.endswith(("attn2.to_k", "attn2.to_v")) for m in factors.modules)
    run = [*common, "--tasks", str(data / "tasks.json"), "--out", str(tmp_path / "out"), "--no-plot"]
    attribute([*run, "--method", "unlearning", "--unlearn.preconditioner", "ekfac", "--fisher.file", str(folder),
               "--unlearn.steps", "1"])  # fmt: skip
    check_retrieval(tmp_path / "out", "unlearning")
    config = json.loads(next((tmp_path / "out" / "unlearning").glob("*/config.json")).read_text())
    assert config["settings"]["unlearn"]["preconditioner"] == "ekfac"
