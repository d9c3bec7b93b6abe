"""The MSCOCO benchmark on data in the exact released layout (small N) and UNets of the real block types."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from common.diffusion.selection import select_parameters
from common.errors import AttributionError
from common.memmap import sampled_fingerprint
from mscoco import release
from mscoco.model import MscocoModel, build_unet, load_unet
from tests.conftest import ROOT, free_port

SMALL = {"block_out_channels": (16, 32, 32, 32), "norm_num_groups": 8}  # the real block types, small widths


def small_unet(seed: int = 0):
    torch.manual_seed(seed)
    unet = build_unet(**SMALL)
    with torch.no_grad():  # random-init UNets zero their output layer
        for p in unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return unet.eval()


def write_release(folder, n: int = 6, queries: int = 3, seed: int = 0, text_dtype=np.float16):
    """Arrays, captions and images in the released layout and file names (small N)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / release.TRAIN_LATENTS, rng.normal(size=(2 * n, 4, 16, 16)).astype(np.float32))
    np.save(folder / release.TRAIN_TEXT, rng.normal(size=(n, 5, 77, 1024)).astype(text_dtype))
    np.save(folder / release.SAMPLE_LATENTS, rng.normal(size=(queries, 4, 16, 16)).astype(np.float32))
    np.save(folder / release.SAMPLE_TEXT, rng.normal(size=(queries, 1, 77, 1024)).astype(np.float32))
    (folder / release.SAMPLE_CAPTIONS).write_text("".join(f"a photo of thing {i}\n" for i in range(queries)))
    (folder / "sample").mkdir(exist_ok=True)
    for i in range(queries):
        Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(folder / "sample" / f"{i}.png")
    ids = [int(v) for v in rng.permutation(1000)[:n]]  # the annotation file's order, not sorted by id
    annotations = [
        {"image_id": image_id, "id": 10 * k + j, "caption": f" caption {j} of image {image_id} "}
        for k, image_id in enumerate(ids)
        for j in range(5 + k % 3)  # some COCO images have 6 or 7 captions: the first 5 are kept
    ]
    (folder / "annotations").mkdir(exist_ok=True)
    (folder / release.ANNOTATIONS).write_text(
        json.dumps({"images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in ids], "annotations": annotations})
    )
    return ids


def test_the_real_unet_has_the_papers_size_and_selection():
    unet = build_unet()
    params = dict(unet.named_parameters())
    assert len(params) == 684 and sum(p.numel() for p in params.values()) == 57_373_316
    kv = select_parameters(unet, "cross-attn-kv")
    assert len(kv) == 32 and sum(params[n].numel() for n in kv) == 7_077_888
    assert all(params[n].shape[1] == 1024 for n in kv)


def test_release_loads_memory_mapped_in_the_authors_order(tmp_path):
    ids = write_release(tmp_path)
    data = release.load_training_set(tmp_path)
    latents = np.load(tmp_path / release.TRAIN_LATENTS)
    text = np.load(tmp_path / release.TRAIN_TEXT)
    assert len(data) == 6 and data.num_captions == 5 and data.image_shape == (4, 16, 16)
    idx = torch.tensor([4, 1])
    assert torch.equal(data.images(idx), torch.from_numpy(latents[[4, 1]]))
    assert torch.equal(data.images(idx, True), torch.from_numpy(latents[[10, 7]]))  # the flips follow the originals
    assert torch.equal(data.text(idx, torch.tensor([3, 0])).float(), torch.from_numpy(text[[4, 1], [3, 0]]).float())
    assert isinstance(data._arrays[1], np.memmap)  # nothing copied into memory
    assert data.captions[2] == [f"caption {j} of image {ids[2]}" for j in range(5)]  # first five, stripped
    assert data.image_paths[0].endswith(f"train2017/{ids[0]:012d}.jpg")
    assert data.fingerprint == release.load_training_set(tmp_path).fingerprint
    text[3, 2, 10, 5] += 1  # one value inside the (small, fully hashed) array changes the fingerprint
    np.save(tmp_path / release.TRAIN_TEXT, text)
    assert release.load_training_set(tmp_path).fingerprint != data.fingerprint


def test_memory_mapped_rows_read_are_let_go_after_a_chunk(tmp_path):
    def mapped_mib() -> float:  # file pages mapped into this process
        line = next(x for x in open("/proc/self/status") if x.startswith("RssFile:"))
        return int(line.split()[1]) / 1024

    write_release(tmp_path, n=120)  # 120 x 5 x 77 x 1024 float16: 90 MiB of text embeddings
    data = release.load_training_set(tmp_path)
    before = mapped_mib()
    first = data.text(torch.arange(120).repeat_interleave(5), torch.arange(5).repeat(120)).float().sum()
    assert mapped_mib() - before > 60  # every row read stays mapped
    data.release_pages()
    assert mapped_mib() - before < 20
    assert data.text(torch.arange(120).repeat_interleave(5), torch.arange(5).repeat(120)).float().sum() == first


def test_sampled_fingerprint_reads_blocks_of_large_arrays():
    a = np.zeros(1 << 16, dtype=np.float32)  # 256 KiB: 8 blocks of 4 KiB are hashed
    b = a.copy()
    b[-1] = 1  # inside the last block
    c = a.copy()
    c[100] = 1  # between the first and second block
    small = {"blocks": 8, "block_bytes": 4096}
    assert sampled_fingerprint(a, **small) != sampled_fingerprint(b, **small)
    assert sampled_fingerprint(a, **small) != sampled_fingerprint(a.reshape(2, -1), **small)
    assert sampled_fingerprint(a, **small) != sampled_fingerprint(c, **small)  # 400 B < 4 KiB in
    d = a.copy()
    d[(1 << 16) // 16] = 1  # byte 16 KiB: between blocks 0 (0-4 KiB) and 1 (~36 KiB): not sampled, as stated
    assert sampled_fingerprint(a, **small) == sampled_fingerprint(d, **small)


@pytest.mark.parametrize(
    "damage, message",
    [
        ("odd", "holds 11 latents, not 2 x 6"),
        ("truncated", "is damaged or incomplete"),
        ("missing", "missing training text embeddings"),
        ("shape", "expected text embeddings (N, captions, 77, 1024)"),
    ],
)
def test_release_refuses_inconsistent_or_partial_files(tmp_path, damage, message):
    write_release(tmp_path)
    latents_path, text_path = tmp_path / release.TRAIN_LATENTS, tmp_path / release.TRAIN_TEXT
    if damage == "odd":
        np.save(latents_path, np.zeros((11, 4, 16, 16), np.float32))
    elif damage == "truncated":
        text_path.write_bytes(text_path.read_bytes()[:50_000])
    elif damage == "missing":
        text_path.unlink()
    else:
        np.save(text_path, np.zeros((6, 5, 77, 768), np.float16))
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    with pytest.raises(AttributionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        release.load_training_set(tmp_path)
    assert before == {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}  # nothing written


def test_release_queries_and_file_report(tmp_path):
    write_release(tmp_path)
    queries = release.load_release_queries(tmp_path, [2, 0])
    assert [q.id for q in queries] == ["sample002", "sample000"]
    assert queries[0].image.shape == (4, 16, 16) and queries[0].text.shape == (1, 77, 1024)
    assert queries[0].prompt == "a photo of thing 2" and queries[0].image_path.endswith("sample/2.png")
    with pytest.raises(AttributionError, match="query 5 is not among the 3 released samples"):
        release.load_release_queries(tmp_path, [5])
    report = dict(release.file_report(tmp_path))
    assert report[release.TRAIN_TEXT] == "(6, 5, 77, 1024) float16"
    assert report[release.MODEL] == "missing" and report["sample/"] == "3 images"


def test_released_queries_regenerate_from_the_batch_stream_they_were_sampled_in(tmp_path):
    """A pipeline that samples a batch of 6 the authors' way (one CPU generator for all its noise) against
    the replay of rows 4 and 1 alone: same images; the released queries carry their stream."""
    from diffusers import DDPMScheduler
    from diffusers.utils.torch_utils import randn_tensor

    from common.diffusion.sampling import BatchStream, sample
    from common.evaluation.counterfactual import regenerate

    write_components(tmp_path / "sd2")
    model = MscocoModel(small_unet(), tmp_path / "sd2")
    text = torch.randn(6, 77, 1024, generator=torch.Generator().manual_seed(1))
    uncond = model.null_text().expand_as(text)
    g = torch.Generator().manual_seed(0)
    latents = randn_tensor((6, 4, 16, 16), generator=g, device=torch.device("cpu"), dtype=torch.float32)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(5)
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = model.unet(torch.cat([latents] * 2), t, encoder_hidden_states=torch.cat([uncond, text])).sample
            eps_uncond, eps_text = eps.chunk(2)
            latents = scheduler.step(eps_uncond + 7.5 * (eps_text - eps_uncond), t, latents, generator=g).prev_sample
    stream = BatchStream(0, 6, (4, 1))
    replayed = sample(model, text[[4, 1]], None, [0, 0], num_steps=5, guidance_scale=7.5, stream=stream)
    # same noise; a batch of 2 against 12 through the UNet rounds differently (~1e-5 per step, x7.5 guidance)
    assert torch.allclose(replayed, latents[[4, 1]], atol=1e-3)
    keyed = sample(model, text[[4, 1]], stream.initial_noise((4, 16, 16)), [0, 1], num_steps=5, guidance_scale=7.5)
    assert (keyed - replayed).abs().max() > 0.1  # the keyed step noise is another stream

    from common.data import NoiseStream

    write_release(tmp_path / "data", queries=3)
    (query,) = release.load_release_queries(tmp_path / "data", [2])
    assert query.stream == NoiseStream(0, 500, 2) and query.extra["guidance_scale"] == 7.5
    assert torch.equal(query.noise, BatchStream(0, 500, (2,)).initial_noise((4, 16, 16))[0])
    query.extra["num_steps"] = 5
    expected = sample(model, query.text, None, [0], num_steps=5, guidance_scale=7.5, stream=BatchStream(0, 500, (2,)))
    assert torch.equal(regenerate(model, query), expected[0])
    from common.driver import command
    from common.queries import load_queries

    generate = command("mscoco", "generate")

    generate(["--data", str(tmp_path / "data"), "--release", "1-2", "--out", str(tmp_path / "q")])
    exported = load_queries(tmp_path / "q")  # the released queries as folders, image included
    assert [q.id for q in exported] == ["sample001", "sample002"] and (
        tmp_path / "q" / "sample002" / "image.png"
    ).exists()
    assert torch.equal(exported[1].image, query.image) and exported[1].stream == query.stream
    exported[1].extra["num_steps"] = 5
    assert torch.equal(regenerate(model, exported[1]), expected[0])
    record = tmp_path / "q" / "sample002" / "query.json"
    info = json.loads(record.read_text())
    assert info["stream"] == {"seed": 0, "batch_size": 500, "row": 2} and "stream" not in exported[1].extra
    for stream, line in (({"seed": 0, "row": 2}, "must hold exactly seed, batch_size and row"),
                         ({"seed": 0, "batch_size": 500, "row": 500}, "row 500 lies outside a batch of 500"),
                         ({"seed": 0, "batch_size": 500, "row": "2"}, "non-negative integer row")):  # fmt: skip
        record.write_text(json.dumps(info | {"stream": stream}))
        with pytest.raises(AttributionError, match=line):
            load_queries(tmp_path / "q")
    with pytest.raises(AttributionError, match="rows must be distinct"):
        BatchStream(0, 6, (1, 1))


def test_journey_trak_follows_a_released_querys_own_trajectory(tmp_path):
    from common.diffusion.sampling import BatchStream
    from common.methods.base import query_fingerprint
    from common.methods.journey_trak import trajectory_states

    write_release(tmp_path, queries=3)
    (query,) = release.load_release_queries(tmp_path, [1])
    query.extra["num_steps"], query.extra["guidance_scale"] = 5, 1.0
    model = MscocoModel(small_unet(), None)
    states, stats = trajectory_states(model, query, [999, 0], seed=0)
    assert stats["trajectory"] == "regenerated" and [t for t, _ in states] == [800, 0]  # 5 DDPM steps: 800, ..., 0
    assert torch.equal(states[0][1], BatchStream(0, 500, (1,)).initial_noise((4, 16, 16))[0])  # the stream's start
    plain = type(query)(query.id, query.image, query.text)
    assert query_fingerprint(plain) != query_fingerprint(query)  # the stream is part of what a ranking was made of


def test_unet_weights_load_from_model_bin_with_weights_only(tmp_path):
    unet = small_unet()
    (tmp_path / "config.json").write_text(json.dumps(dict(unet.config)))
    torch.save(unet.state_dict(), tmp_path / "model.bin")
    loaded = load_unet(tmp_path / "model.bin")
    for (name, a), (_, b) in zip(unet.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    unet.save_pretrained(tmp_path / "folder")  # a diffusers folder loads too
    assert torch.equal(load_unet(tmp_path / "folder").conv_in.weight, unet.conv_in.weight)


def test_unet_loading_refuses_damaged_foreign_or_executable_files(tmp_path):
    unet = small_unet()
    (tmp_path / "config.json").write_text(json.dumps(dict(unet.config)))
    torch.save(unet.state_dict(), tmp_path / "model.bin")
    data = (tmp_path / "model.bin").read_bytes()
    (tmp_path / "model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(AttributionError, match="is damaged or incomplete"):
        load_unet(tmp_path / "model.bin")
    torch.save({"conv_in.weight": torch.zeros(3)}, tmp_path / "model.bin")
    with pytest.raises(AttributionError, match="does not fit this architecture") as err:
        load_unet(tmp_path / "model.bin")
    n = len(unet.state_dict())  # counts and one example each, not every key (a 30 KB line before)
    assert str(err.value).endswith(f"{n - 1} of the model's {n} weights missing (e.g. conv_in.bias); 1 of other "
                                   "shapes (e.g. conv_in.weight: (3,), the model's (16, 4, 3, 3))")  # fmt: skip
    assert len(str(err.value)) < 300
    torch.save({"weights": print}, tmp_path / "model.bin")  # a pickle that names a callable
    with pytest.raises(AttributionError, match="is not a plain tensor file"):
        load_unet(tmp_path / "model.bin")
    with pytest.raises(AttributionError, match="missing UNet weights"):
        load_unet(tmp_path / "absent.bin")
    with pytest.raises(AttributionError, match="missing UNet folder"):
        load_unet(tmp_path / "no" / "such" / "folder")


def write_components(folder, width: int = 1024):
    """A VAE, CLIP text encoder (``width`` wide; SD2's is 1,024) and tokenizer, tiny, saved as a pipeline's folders."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        scaling_factor=0.18215,
    ).save_pretrained(folder / "vae")
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {c: i for i, c in enumerate(letters)} | {c + "</w>": 26 + i for i, c in enumerate(letters)}
    vocab |= {"!": 52, "<|startoftext|>": 53, "<|endoftext|>": 54}  # SD2 pads with "!"
    (folder / "raw").mkdir(parents=True)
    (folder / "raw" / "vocab.json").write_text(json.dumps(vocab))
    (folder / "raw" / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "raw" / "vocab.json"), str(folder / "raw" / "merges.txt"), pad_token="!")
    tokenizer.save_pretrained(folder / "tokenizer")
    config = CLIPTextConfig(
        vocab_size=55,
        hidden_size=width,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="gelu",
        bos_token_id=53,
        eos_token_id=54,
        pad_token_id=52,
    )
    CLIPTextModel(config).save_pretrained(folder / "text_encoder")


def test_model_contract_encodes_and_decodes_through_local_components(tmp_path):
    write_components(tmp_path / "sd2")
    model = MscocoModel(small_unet(), tmp_path / "sd2")
    assert model.num_train_timesteps == 1000 and model.scheduler.config.clip_sample
    text = model.encode_text(["a cat", "", "a dog on a mat"])
    assert text.shape == (3, 77, 1024) and text.dtype == torch.float32 and torch.isfinite(text).all()
    assert torch.allclose(model.null_text(), text[1], atol=1e-5)  # alone or in a batch: rounding apart
    pixels = model.decode(torch.randn(2, 4, 16, 16))
    assert pixels.shape == (2, 3, 128, 128) and pixels.abs().max() <= 1
    missing = MscocoModel(small_unet(), tmp_path / "elsewhere")
    with pytest.raises(AttributionError, match="missing components folder"):
        missing.decode(torch.zeros(1, 4, 16, 16))


def test_unlearning_attributes_a_released_query_over_the_memory_mapped_set(tmp_path):
    from common.methods import get_method
    from common.methods.base import run_method

    write_release(tmp_path / "data", text_dtype=np.float32)
    write_components(tmp_path / "sd2")
    model = MscocoModel(small_unet(), tmp_path / "sd2").prepare_for_gradients()
    data = release.load_training_set(tmp_path / "data")
    query = release.load_release_queries(tmp_path / "data", [1])
    method_cls = get_method("unlearning")
    cfg = method_cls.Config(
        fisher={"num_samples": 8, "batch_size": 4},
        loss={"num_timesteps": 2},
        unlearn={"step_size": 1e-3, "batch_size": 4, "accumulations": 1},
    )
    method = method_cls(cfg, model, data, cache_dir=tmp_path / "cache")
    (folder,) = run_method(method, query, tmp_path / "out")
    scores = np.load(folder / "scores.npy")
    assert scores.shape == (6,) and np.isfinite(scores).all() and np.ptp(scores) > 0
    ranking = json.loads((folder / "ranking.json").read_text())
    assert ranking["top_k"][0]["caption"].startswith("caption 0 of image")
    assert (folder / "top10.png").exists()  # decoded through the VAE


def write_model_files(data_dir, components):
    """The release's model.bin (a small UNet; its diffusers config beside it) and fisher_info.pt over every weight."""
    unet = small_unet()
    (data_dir / "config.json").write_text(json.dumps(dict(unet.config)))
    torch.save(unet.state_dict(), data_dir / release.MODEL)
    g = torch.Generator().manual_seed(3)
    fisher = {n: torch.rand(p.shape, generator=g, dtype=torch.float64) + 0.1 for n, p in unet.named_parameters()}
    torch.save(fisher, data_dir / release.FISHER)  # like the authors': all 684 tensors of the real UNet, float64
    write_components(components)


def run_module(*args, check=True, launcher=(sys.executable, "-m")):
    # The same threads per process in every run (torchrun would set 1): float32 sums then add up in the same order.
    env = os.environ | {"OMP_NUM_THREADS": "2"}
    proc = subprocess.run([*launcher, *args], capture_output=True, text=True, cwd=ROOT, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args[0]} failed:\n{proc.stderr[-3000:]}")
    return proc


def attribute_flags(tmp_path):
    write_release(tmp_path / "data", text_dtype=np.float32)
    write_model_files(tmp_path / "data", tmp_path / "sd2")
    flags = ["--data", str(tmp_path / "data"), "--components", str(tmp_path / "sd2"), "--queries", "release:0-2"]
    flags += ["--config", "mscoco/configs/mscoco.yaml", "--preset", "micro", "--device", "cpu"]
    return flags + ["--fisher.file", str(tmp_path / "data" / release.FISHER)]


def test_trak_with_an_ensemble_loads_the_other_unet_through_the_attribute_script(tmp_path, capsys):
    """The paper's TRAK recipe (an ensemble of independently trained models) on the release: each member by path."""
    from common.driver import command

    main = command("mscoco", "attribute")

    flags = [*attribute_flags(tmp_path)[:-2], "--out", str(tmp_path / "out"), "--no-plot", "--method", "trak"]
    flags += ["--queries", "release:1", "--trak.selection", "cross-attn-kv", "--trak.num_timesteps", "1"]
    small_unet(seed=1).save_pretrained(tmp_path / "other")
    main([*flags, "--trak.ensemble", str(tmp_path / "other")])
    ranking = json.loads((tmp_path / "out" / "trak" / "sample001" / "ranking.json").read_text())
    assert ranking["stats"]["ensemble_size"] == 2
    both = np.load(tmp_path / "out" / "trak" / "sample001" / "scores.npy")
    main([*flags, "--out", str(tmp_path / "alone")])
    alone = np.load(tmp_path / "alone" / "trak" / "sample001" / "scores.npy")
    assert both.shape == alone.shape == (6,) and np.isfinite(both).all() and not np.allclose(both, alone)
    with pytest.raises(SystemExit) as exit_info:
        main([*flags, "--out", str(tmp_path / "bad"), "--trak.ensemble", str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2 and "nowhere" in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.slow  # 50 s: the library path it drives runs by default in the unlearning test above
def test_attribute_script_scores_the_release_resumes_and_refuses_a_partial_fisher(tmp_path):
    flags = attribute_flags(tmp_path)
    run_module("common.driver", "mscoco", "attribute", *flags, "--out", str(tmp_path / "one"))
    for q in ("sample000", "sample001", "sample002"):
        scores = np.load(tmp_path / "one" / "unlearning" / q / "scores.npy")
        assert scores.shape == (6,) and np.isfinite(scores).all() and np.ptp(scores) > 0, q
    assert (tmp_path / "one" / "unlearning" / "sample000" / "top10.png").exists()
    again = run_module("common.driver", "mscoco", "attribute", *flags, "--out", str(tmp_path / "one"))
    assert again.stdout.count("already attributed") == 3
    fisher = torch.load(tmp_path / "data" / release.FISHER)
    torch.save({n: v for n, v in fisher.items() if "attn2.to_v" not in n}, tmp_path / "partial.pt")
    partial = [*flags[:-1], str(tmp_path / "partial.pt"), "--out", str(tmp_path / "three")]
    proc = run_module("common.driver", "mscoco", "attribute", *partial, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "lacks" in proc.stderr.strip().splitlines()[-1] and "attn2.to_v" in proc.stderr


@pytest.mark.slow
def test_attribute_script_gives_the_same_scores_on_two_processes(tmp_path):
    """The whole script under torchrun (the pass-level test in test_passes.py runs by default)."""
    flags = attribute_flags(tmp_path)
    run_module("common.driver", "mscoco", "attribute", *flags, "--out", str(tmp_path / "one"), "--no-plot")
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port())
    run_module(
        "-m",
        "common.driver",
        "mscoco",
        "attribute",
        *flags,
        "--out",
        str(tmp_path / "two"),
        "--no-plot",
        launcher=torchrun,
    )
    for q in ("sample000", "sample001", "sample002"):
        one = np.load(tmp_path / "one" / "unlearning" / q / "scores.npy")
        two = np.load(tmp_path / "two" / "unlearning" / q / "scores.npy")
        assert np.isfinite(one).all() and np.array_equal(one, two), q


def make_archives(files_dir, archives_dir):
    """The release's three archives from a folder of extracted files; the large one split into .001, .002, ..."""
    from tests.conftest import pack_7z

    def pack(archive, names, volume=None):
        pack_7z(files_dir, archive, names, volume)

    root = archives_dir / "mscoco"
    pack(root / "model_fisher.7z", [release.MODEL, release.FISHER, "config.json"])
    pack(root / "sample.7z", [release.SAMPLE_LATENTS, release.SAMPLE_TEXT, release.SAMPLE_CAPTIONS, "sample"])
    big = root / "latents_text_embeddings" / "latents_text_embeddings.7z"
    pack(big, [release.TRAIN_LATENTS, release.TRAIN_TEXT], volume=200_000)
    return big


def test_download_extracts_split_archives_reports_and_skips_what_is_complete(tmp_path, capsys):
    from mscoco import download

    write_release(tmp_path / "files")
    torch.save(small_unet().state_dict(), tmp_path / "files" / release.MODEL)
    (tmp_path / "files" / "config.json").write_text("{}")
    torch.save({}, tmp_path / "files" / release.FISHER)
    big = make_archives(tmp_path / "files", tmp_path / "archives")
    parts = sorted(big.parent.iterdir())
    assert len(parts) > 3 and parts[0].name.endswith(".7z.001")
    out = tmp_path / "data"
    args = ["--out", str(out), "--parts", "release", "--archives", str(tmp_path / "archives")]
    download.main(args)
    for name in (release.TRAIN_LATENTS, release.TRAIN_TEXT, release.SAMPLE_TEXT):
        assert (out / name).read_bytes() == (tmp_path / "files" / name).read_bytes()
    assert len(list((out / "sample").glob("*.png"))) == 3 and not (out / ".partial").exists()
    stamp = (out / release.TRAIN_TEXT).stat().st_mtime_ns
    download.main(args)  # complete: nothing extracted again
    assert (out / release.TRAIN_TEXT).stat().st_mtime_ns == stamp
    (out / "sample" / "1.png").unlink()  # a released query image deleted: the report said "complete"
    with pytest.raises(SystemExit):
        download.main(args)
    assert "sample/: missing 1 of 3 images (first: sample/1.png)" in capsys.readouterr().err


def test_download_names_a_missing_or_damaged_volume_and_keeps_earlier_files(tmp_path):
    from mscoco import download

    write_release(tmp_path / "files")
    for name in (release.MODEL, release.FISHER, "config.json"):
        (tmp_path / "files" / name).write_bytes(b"x")
    big = make_archives(tmp_path / "files", tmp_path / "archives")
    parts = sorted(big.parent.iterdir())
    damaged = bytearray(parts[-1].read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF  # one flipped byte in the last volume
    parts[-1].write_bytes(bytes(damaged))
    with pytest.raises(AttributionError, match="latents_text_embeddings.7z is damaged or incomplete"):
        download.get_release(tmp_path / "data", tmp_path / "archives")
    parts[1].unlink()  # a volume lost in the download
    args = ["--out", str(tmp_path / "data"), "--parts", "release", "--archives", str(tmp_path / "archives")]
    with pytest.raises(SystemExit) as exit_:
        download.main(args)
    assert exit_.value.code == 2
    assert not (tmp_path / "data" / release.TRAIN_LATENTS).exists()  # nothing half-extracted in place
    assert (tmp_path / "data" / release.SAMPLE_CAPTIONS).exists()  # the complete archives before it stay


@pytest.mark.slow  # 25 s
def test_generate_script_writes_queries_that_attribute_reads(tmp_path):
    write_release(tmp_path / "data", text_dtype=np.float32)
    write_model_files(tmp_path / "data", tmp_path / "sd2")
    (tmp_path / "prompts.txt").write_text("a cat on a mat\n\na dog\n")
    flags = ["--data", str(tmp_path / "data"), "--components", str(tmp_path / "sd2"), "--device", "cpu"]
    generate = ("common.driver", "mscoco", "generate", *flags)
    run_module(*generate, "--prompts", str(tmp_path / "prompts.txt"), "--out", str(tmp_path / "q"), "--num-steps", "4")
    from common.queries import load_queries

    queries = load_queries(tmp_path / "q")
    assert [q.id for q in queries] == ["coco000", "coco001"] and queries[1].prompt == "a dog"
    assert queries[0].image.shape == (4, 16, 16) and queries[0].text.shape == (1, 77, 1024)
    assert queries[0].noise.shape == (4, 16, 16) and (tmp_path / "q" / "coco000" / "image.png").exists()
    assert json.loads((tmp_path / "q" / "coco000" / "query.json").read_text())["guidance_scale"] == 7.5
    proc = run_module(
        "common.driver",
        "mscoco",
        "generate",
        *flags,
        "--prompts",
        str(tmp_path / "none.txt"),
        "--out",
        "x",
        check=False,
    )
    assert proc.returncode == 2 and proc.stderr.strip().endswith("missing prompts file: " + str(tmp_path / "none.txt"))


@pytest.mark.slow  # 55 s
def test_bench_times_both_loops_and_compares_precisions(tmp_path):
    out = tmp_path / "bench.json"
    args = ["--device", "cpu", "--images", "2", "--images-per-batch", "2", "--fisher-samples", "4"]
    run_module("mscoco.bench", *args, "--widths", "16,32,32,32", "--out", str(out))
    result = json.loads(out.read_text())
    assert result["rows"] == 200 and result["device"] == "cpu"
    rates = [*result["scoring_forwards_per_s"].values(), *result["fisher_grads_per_s"].values()]
    assert len(rates) == 5 and all(r > 0 for r in rates)
    assert result["scoring_speedup"]["fp32"] > 0 and result["fisher_speedup"] > 0
    assert result["bf16_top_k_overlap"]["k"] == 1 and 0 <= result["bf16_top_k_overlap"]["overlap"] <= 1


def test_paper_table_puts_ours_beside_the_papers_numbers(tmp_path):
    from mscoco.paper import gather_tables

    values = {"random": (3.0, 4.0), "unlearning": (6.0, 5.0), "sgd-1": (2.0, 3.0)}
    for method, pair in values.items():
        for query, value in zip(("sample000", "sample001"), pair):
            folder = tmp_path / "metrics" / method / query
            folder.mkdir(parents=True)
            record = {"method": method, "query": query, "k": 500, "seed": None, "delta_loss": value * 1e-3}
            (folder / "k500.json").write_text(json.dumps(record | {"mse": 0.05, "clip": None}))
    text = gather_tables(tmp_path)
    paper = (tmp_path / "paper.md").read_text().splitlines()
    rows = [line for line in paper if line.startswith("| ")][1:]
    assert [r.split(" | ")[0] for r in rows] == ["| random", "| unlearning", "| sgd-1"]  # the paper's order first
    assert rows[0] == "| random | 2 | 3.50±0.50 (3.5) | 5.00±0.00 (4.1) |"
    assert rows[1].startswith("| unlearning | 2 | 5.50±0.50 (5.6; 5.57) |")  # the paper's, then its follow-up's
    assert rows[2].startswith("| sgd-1 | 2 | 2.50±0.50 (–) |")  # Table 2's values are not in our source
    assert "| unlearning | 5.50±0.50 |" in text and (tmp_path / "table.md").exists()
    with pytest.raises(AttributionError, match="holds no leave-K-out metrics"):
        gather_tables(tmp_path / "empty")


def test_train_script_writes_a_loadable_model_reuses_it_and_refuses_another_recipe(tmp_path, capsys):
    from mscoco import train

    write_release(tmp_path / "data", n=4)
    (tmp_path / "unet.json").write_text(json.dumps(SMALL))
    flags = [
        "--data",
        str(tmp_path / "data"),
        "--out",
        str(tmp_path / "m"),
        "--unet-config",
        str(tmp_path / "unet.json"),
    ]
    flags += ["--config", "mscoco/configs/mscoco.yaml", "--preset", "micro", "--device", "cpu", "--train.steps", "2"]
    (tmp_path / "exclude.txt").write_text("3\n1\n")
    train.main([*flags, "--exclude", str(tmp_path / "exclude.txt")])
    info = json.loads((tmp_path / "m" / "model.json").read_text())
    assert info["recipe"]["exclude"] == [1, 3] and info["recipe"]["train"]["lr"] == 1e-3
    assert info["model"]["block_out_channels"] == [16, 32, 32, 32] and info["summary"]["processes"] == 1
    assert not (tmp_path / "m" / "checkpoint.safetensors").exists()
    unet = load_unet(tmp_path / "m" / "model.safetensors")  # wherever a UNet is asked for
    torch.manual_seed(0)
    untrained = build_unet(**SMALL)
    assert any(not torch.equal(a, b) for a, b in zip(unet.state_dict().values(), untrained.state_dict().values()))
    train.main([*flags, "--exclude", str(tmp_path / "exclude.txt")])
    assert "reusing the trained model" in capsys.readouterr().out
    with pytest.raises(AttributionError, match="another recipe"):
        train.train_mscoco(tmp_path / "data", tmp_path / "m", train.TrainConfig(steps=2, batch_size=4), [1, 3],
                           train.architecture(str(tmp_path / "unet.json")), None)  # fmt: skip


def test_row_scripts_name_every_table_row():  # that they parse: tests/test_layout.py
    table1 = {p.stem.replace("_", "-") for p in (ROOT / "mscoco" / "scripts" / "table1").glob("*.sh")}
    from mscoco.paper import paper_results

    assert table1 == set(paper_results()["paper"]) | {"unlearning-ekfac"}  # the paper's rows and the follow-up's AbU+
    assert len(list((ROOT / "mscoco" / "scripts" / "table2").glob("*.sh"))) == 5  # + table1/unlearning.sh (K,V)


def write_generated_queries(root, components, n: int = 2):
    """Query folders as the mscoco generate stage writes them, sampled in 4 steps (regeneration replays those)."""
    from common.data import Query, query_key
    from common.diffusion.sampling import sample
    from common.queries import save_query

    model = MscocoModel(small_unet(), components)
    for i in range(n):
        qid = f"coco{i:03d}"
        noise = torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(i))
        text = model.encode_text([f"a cat {i}"])
        x = sample(model, text, noise[None], [query_key(qid)], 0, "ddpm", 4, 3.0, progress=False)[0]
        info = {"seed": 0, "sampler": "ddpm", "num_steps": 4, "guidance_scale": 3.0}
        save_query(root, Query(qid, x, text, f"a cat {i}"), noise, None, info)


def script_env(tmp_path: Path, **extra: str) -> dict:
    """A release-shaped set of 6 images, SD2-shaped model files and 2 generated queries under ``tmp_path``, and the
    environment that points the MSCOCO scripts at them (micro preset, one process, outputs in tmp_path/out)."""
    write_release(tmp_path / "data", n=6, text_dtype=np.float32)
    write_model_files(tmp_path / "data", tmp_path / "sd2")
    write_generated_queries(tmp_path / "q", tmp_path / "sd2")
    env = os.environ | {"OMP_NUM_THREADS": "2", "DATA": str(tmp_path / "data"), "OUT": str(tmp_path / "out")}
    env |= {"QUERIES": str(tmp_path / "q"), "PRESET": "micro", "COMPONENTS": str(tmp_path / "sd2")}
    return env | {"LAUNCH": sys.executable} | extra


@pytest.mark.slow  # 3 min
def test_row_scripts_measure_leave_k_out_and_gather_every_row(tmp_path):
    env = script_env(tmp_path, KS="2")

    def row(script):
        proc = subprocess.run(["bash", f"mscoco/scripts/{script}"], capture_output=True, text=True, cwd=ROOT, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    row("table1/random.sh")
    row("table1/pixel.sh")
    row("table2/sgd_1.sh")
    out = tmp_path / "out" / "leave_k_out"
    assert sorted(p.name for p in (out / "metrics").iterdir()) == ["pixel", "random", "sgd-1"]
    for method in ("pixel", "sgd-1"):
        for q in ("coco000", "coco001"):
            record = json.loads((out / "metrics" / method / q / "k2.json").read_text())
            assert np.isfinite(record["delta_loss"]) and record["mse"] > 0 and record["clip"] is None
    rows = [line.split(" | ")[0] for line in (out / "paper.md").read_text().splitlines() if line.startswith("| ")]
    assert rows[1:] == ["| random", "| pixel", "| sgd-1"]
    models = list((out / "models").glob("*/*/model.json"))
    assert 3 <= len(models) <= 7  # the full reference, 2 random sets, pixel's and sgd-1's sets (some shared)
    again = row("table1/pixel.sh")
    assert "trained in" not in again and "already attributed" in again
    full = next((out / "models").glob("*/full"))
    assert sorted(p.name for p in (full / "regenerated").iterdir()) == ["coco000.npy", "coco001.npy"]
    env["EVAL_FLAGS"] = "--overwrite"  # the same settings: nothing is wiped or measured again
    again = row("table1/random.sh")
    assert "trained in" not in again and (full / "model.json").exists() and (out / "metrics" / "pixel").exists()
    env["EVAL_FLAGS"] = "--reference released"
    proc = subprocess.run(
        ["bash", "mscoco/scripts/table1/random.sh"], capture_output=True, text=True, cwd=ROOT, env=env
    )
    assert proc.returncode == 2 and "made under a different config (reference differ)" in proc.stderr.splitlines()[-1]


@pytest.mark.slow  # 1 min
def test_lds_script_retrains_on_subsets_and_correlates_a_ranking(tmp_path):
    env = script_env(tmp_path, COUNT="3")
    cmd = ["bash", "mscoco/scripts/lds.sh", "pixel"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = json.loads((tmp_path / "out" / "lds" / "lds.json").read_text())
    assert list(table["rows"]) == ["pixel"] and table["subsets"] == 3
    assert set(table["rows"]["pixel"]["queries"]) == {"coco000", "coco001"}
    assert len(list((tmp_path / "out" / "lds" / "models").glob("*/*/model.json"))) == 3
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    assert again.returncode == 0 and "trained in" not in again.stdout and "[1/" not in again.stdout


@pytest.mark.slow  # 3 min
def test_counterfactual_on_two_processes_measures_what_one_does(tmp_path):
    write_release(tmp_path / "data", n=6, text_dtype=np.float32)
    write_model_files(tmp_path / "data", tmp_path / "sd2")
    write_generated_queries(tmp_path / "q", tmp_path / "sd2", n=3)
    flags = ["--data", str(tmp_path / "data"), "--components", str(tmp_path / "sd2"), "--queries", str(tmp_path / "q")]
    flags += ["--config", "mscoco/configs/mscoco.yaml", "--preset", "micro", "--device", "cpu", "--methods", "random"]
    flags += ["--eval.random_seeds", "1"]
    run_module("common.driver", "mscoco", "leave-k-out", *flags, "--out", str(tmp_path / "one"))
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port())
    two = ["-m", "common.driver", "mscoco", "leave-k-out", *flags, "--out", str(tmp_path / "two")]
    run_module(*two, launcher=torchrun)
    for q in ("coco000", "coco001", "coco002"):  # jobs 0 and 2 measured by process 0, job 1 by process 1
        one = json.loads((tmp_path / "one" / "metrics" / "random" / q / "k2_s0.json").read_text())
        two = json.loads((tmp_path / "two" / "metrics" / "random" / q / "k2_s0.json").read_text())
        assert one["excluded"] == two["excluded"]
        assert two["delta_loss"] == pytest.approx(one["delta_loss"], rel=1e-3, abs=1e-7)
        assert two["mse"] == pytest.approx(one["mse"], rel=1e-3)
    assert (tmp_path / "two" / "table.md").read_text().count("| random |") == 1


@pytest.mark.slow  # 3 min: two scoring runs in child processes
def test_memory_script_reports_peaks_at_each_size(tmp_path):
    out = tmp_path / "memory.json"
    run_module(
        "mscoco.memory", "--sizes", "4", "8", "--chunk-images", "4", "--scratch", str(tmp_path), "--out", str(out)
    )
    result = json.loads(out.read_text())
    assert [r["n"] for r in result["rows"]] == [4, 8]
    for row in result["rows"]:
        assert 0 < row["peak_RssAnon_mib"] <= row["peak_VmRSS_mib"] and row["peak_RssFile_mib"] > 0
    assert not list(tmp_path.glob("n*"))  # the scratch arrays are removed after each size


def test_a_download_cut_anywhere_is_refused_then_completes_on_the_rerun(tmp_path, monkeypatch):
    import io
    import urllib.error
    import urllib.request

    from common.download import download

    body = b"0123456789"

    def serve(request, timeout):
        start = int(request.headers.get("Range", "bytes=0-")[6:-1])
        if start >= len(body):  # what a server answers a range past the end
            raise urllib.error.HTTPError(request.full_url, 416, "Range Not Satisfiable", {}, None)
        response = io.BytesIO(body[start : start + sent.pop(0) if sent else None])  # a connection closed early
        response.status = 206 if start else 200
        response.headers = {"Content-Range": f"bytes {start}-9/10"} if start else {"Content-Length": "10"}
        return response

    sent: list[int] = []
    monkeypatch.setattr(urllib.request, "urlopen", serve)
    (tmp_path / "f.bin.part").write_bytes(body[:4])  # cut mid-way: resumed
    download("http://x/f.bin", tmp_path / "f.bin")
    assert (tmp_path / "f.bin").read_bytes() == body
    (tmp_path / "g.bin.part").write_bytes(body)  # cut after the last byte, before the rename
    download("http://x/g.bin", tmp_path / "g.bin")
    assert (tmp_path / "g.bin").read_bytes() == body and not (tmp_path / "g.bin.part").exists()
    sent[:] = [6, 2]  # the server closes after 6 bytes, then after 2 more: each run keeps what came, the third ends
    for have in (6, 8):
        with pytest.raises(AttributionError, match=f"stopped at {have} of 10 bytes; rerun to resume"):
            download("http://x/h.bin", tmp_path / "h.bin")
        assert (tmp_path / "h.bin.part").stat().st_size == have and not (tmp_path / "h.bin").exists()
    download("http://x/h.bin", tmp_path / "h.bin")
    assert (tmp_path / "h.bin").read_bytes() == body


def test_prepare_only_fits_ekfac_factors_that_a_later_run_imports(tmp_path, capsys):
    """AbU+ on the release layout: factors fitted by --prepare-only (no query scored), then imported by path."""
    from common.driver import command
    from common.unlearning.ekfac import REQUIRED

    main = command("mscoco", "attribute")

    flags = attribute_flags(tmp_path)[:-2]  # without the released diagonal Fisher
    ekfac = ["--method", "unlearning", "--unlearn.preconditioner", "ekfac", "--fisher.num_samples", "16", "--no-plot"]
    main([*flags, *ekfac, "--out", str(tmp_path / "fit"), "--prepare-only"])
    folder = tmp_path / "fit" / "cache" / "unlearning" / "ekfac"
    assert all((folder / f"{name}.safetensors").is_file() for name in REQUIRED)
    assert not (tmp_path / "fit" / "unlearning").exists()  # prepared only
    main([*flags, *ekfac, "--out", str(tmp_path / "run"), "--fisher.file", str(folder), "--unlearn.damping", "0.1"])
    scores = np.load(tmp_path / "run" / "unlearning" / "sample000" / "scores.npy")
    assert scores.shape == (6,) and np.isfinite(scores).all() and np.ptp(scores) > 0
    assert not (tmp_path / "run" / "cache" / "unlearning" / "ekfac").exists()  # imported, not fitted again
