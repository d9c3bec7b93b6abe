"""Distilled attribution: the model's own features, seeded training, the index step, and what the folder refuses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from common.data import Query
from common.distillation.features import FeatureConfig, ModelFeatures
from common.distillation.net import DistilledNet, NetConfig, load_net, save_net
from common.distillation.stage import distill
from common.distillation.train import DistillConfig, TrainingConfig, pair_batches, read_teacher, train_net
from common.errors import AttributionError
from common.methods.base import run_method
from common.methods.distilled import Distilled, DistilledConfig, index_scores
from common.methods.pixel import Pixel, PixelConfig


def _queries(data, n: int = 6) -> list[Query]:
    """Training images as queries with a little noise, each with its own caption."""
    g = torch.Generator().manual_seed(5)
    out = []
    for i in range(n):
        image = data.images(torch.tensor([i]))[0] + 0.05 * torch.randn(3, 8, 8, generator=g, dtype=torch.float64)
        out.append(Query(f"t{i:02d}", image, data.text(torch.tensor([i]), 0).clone(), f"query {i}"))
    return out


def _config(seed: int = 0, **train) -> DistillConfig:
    return DistillConfig(
        FeatureConfig(timesteps=(10, 400), pool=1),
        NetConfig(hidden=(16,), out_dim=8),
        TrainingConfig(epochs=5, batch_size=8, cutoff=4, val_fraction=0.34, ks=(2, 4), seed=seed, **train),
    )


@pytest.fixture
def teacher(model, data, tmp_path) -> tuple[list[Query], Path]:
    """Pixel similarity as a fast stand-in teacher: real method output folders of six training queries."""
    queries = _queries(data)
    run_method(Pixel(PixelConfig(), model, data), queries, tmp_path / "teacher", plot=False)
    return queries, tmp_path / "teacher"


def test_features_have_the_stated_size_and_do_not_depend_on_the_batch(model, data):
    features = ModelFeatures(model, FeatureConfig(timesteps=(10, 400), pool=2))
    rows = features.training_rows(data, 0, 5, (False, True))
    assert rows.shape == (5, 2, features.dim)
    assert features.dim == 16 * 4 * 2 + 8  # middle width x pool² x timesteps + text width
    alone = features.training_rows(data, 3, 4, (False, True))
    np.testing.assert_allclose(alone[0], rows[3], rtol=1e-6, atol=1e-6)
    assert not np.allclose(rows[:, 0], rows[:, 1])  # the flip is another image
    with pytest.raises(AttributionError, match="beyond the model's 1000 diffusion steps"):
        ModelFeatures(model, FeatureConfig(timesteps=(1000,)))


def test_each_listed_pair_appears_once_per_epoch_and_outliers_are_unlisted_with_target_zero():
    lists = [np.array([4, 1, 7]), np.array([0, 2])]
    cfg = TrainingConfig(batch_size=2, outliers=0.0)
    pairs = sorted((int(q), int(i), float(t)) for b in pair_batches(lists, 10, cfg, 0) for q, i, t in zip(*b))
    assert pairs == [(0, 1, pytest.approx(2 / 3)), (0, 4, 1.0), (0, 7, pytest.approx(1 / 3)), (1, 0, 1.0), (1, 2, 0.5)]
    cfg = TrainingConfig(batch_size=1000, outliers=0.5, seed=3)
    q, idx, target = next(pair_batches([np.arange(0, 50)] * 40, 100, cfg, 0))
    swapped = target == 0
    assert 0.35 < float(swapped.float().mean()) < 0.65
    assert bool((idx[swapped] >= 50).all()) and bool((idx[~swapped] < 50).all())
    again = next(pair_batches([np.arange(0, 50)] * 40, 100, cfg, 0))
    assert torch.equal(again[1], idx)  # seeded
    assert not torch.equal(next(pair_batches([np.arange(0, 50)] * 40, 100, cfg, 1))[1], idx)  # another epoch


def test_training_is_seeded_and_reproducible():
    g = torch.Generator().manual_seed(0)
    queries, train = torch.randn(4, 6, generator=g), torch.randn(20, 6, generator=g)
    lists = [np.array([3, 1, 5]), np.array([0, 9]), np.array([19, 2, 4, 8]), np.array([7])]
    net_a, losses_a = train_net(queries, train, lists, _config(seed=1))
    net_b, losses_b = train_net(queries, train, lists, _config(seed=1))
    net_c, _ = train_net(queries, train, lists, _config(seed=2))
    assert losses_a == losses_b and len(losses_a) == 5
    for (name, a), b in zip(net_a.state_dict().items(), net_b.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(net_a.mlp[0].weight, net_c.mlp[0].weight)


def test_the_index_step_returns_the_brute_force_scores_and_top_k():
    torch.manual_seed(0)
    net = DistilledNet(6, NetConfig(hidden=(5,), out_dim=4), torch.zeros(6), torch.ones(6)).eval()
    with torch.no_grad():
        net.scale.fill_(3.0), net.bias.fill_(-0.5)
    train, query = torch.randn(300, 6), torch.randn(1, 6)
    with torch.no_grad():
        brute = net(query.expand(300, -1), train).numpy()  # the pairwise definition, float32
        index = net.embed(train).numpy()[:, None].astype(np.float16)
        scores = index_scores(index, net.embed(query)[0].numpy(), 3.0, -0.5)[:, 0]
    np.testing.assert_allclose(scores, brute, atol=3e-3)  # float16 storage and products
    stored = 3.0 * (index[:, 0].astype(np.float64) @ net.embed(query)[0].detach().double().numpy()) - 0.5
    assert set(np.argsort(-scores)[:10].tolist()) == set(np.argsort(-stored)[:10].tolist())  # the brute-force top-10
    assert scores.dtype == np.float32


def test_teacher_lists_are_its_candidates_or_its_top_cutoff(teacher, data):
    queries, folder = teacher
    t = read_teacher(folder, [q.id for q in queries], len(data), 4)
    assert t.identity["method"] == "pixel" and len(t.lists) == 6
    np.testing.assert_array_equal(t.lists["t00"], np.argsort(-t.scores["t00"], kind="stable")[:4])
    ranking = json.loads((folder / "t01" / "ranking.json").read_text())
    ranking["stats"] = {"candidates": {"method": "random", "count": 3, "indices": [2, 5, 9]}}
    (folder / "t01" / "ranking.json").write_text(json.dumps(ranking))
    t = read_teacher(folder, ["t01"], len(data), 4)
    assert len(t.lists["t01"]) == 3  # the candidates' count, first by the teacher's scores
    with pytest.raises(AttributionError, match="no ranking of 1 queries"):
        read_teacher(folder, ["t01", "nope"], len(data), 4)
    with pytest.raises(AttributionError, match="scored 12 training images"):
        read_teacher(folder, ["t01"], 13, 4)


def test_distill_writes_a_model_that_attributes_and_refuses_other_inputs(model, data, teacher, tmp_path):
    queries, folder = teacher
    out = tmp_path / "distilled"
    info = distill(model, data, queries, folder, out, _config())
    assert info["queries"] == {"train": ["t00", "t01", "t02", "t03"], "validation": ["t04", "t05"]}
    assert set(info["validation"]) == {"2", "4"} and all(0 <= v["mean"] <= 1 for v in info["validation"].values())
    assert distill(model, data, queries, folder, out, _config()) == info  # the same inputs: reused
    with pytest.raises(AttributionError, match="another teacher, feature set or settings"):
        distill(model, data, queries, folder, out, _config(seed=1))
    method = Distilled(DistilledConfig(file=str(out)), model, data, tmp_path / "cache")
    (run,) = run_method(method, queries[4:5], tmp_path / "attr", plot=False)
    scores = np.load(run / "scores.npy")
    net, _ = load_net(out)
    features = ModelFeatures(model, FeatureConfig(timesteps=(10, 400), pool=1))
    with torch.no_grad():
        train = torch.from_numpy(features.training_rows(data, 0, len(data), (False, True)))
        q = features.query(queries[4]).expand(len(data), -1)
        direct = torch.stack([net(q, train[:, f]) for f in range(2)], 1).max(1).values.numpy()
    np.testing.assert_allclose(scores, direct, atol=3e-3)
    with pytest.raises(AttributionError, match="distilled from pixel, not unlearning"):
        Distilled(DistilledConfig(file=str(out), teacher="unlearning"), model, data)
    with pytest.raises(AttributionError, match="distilled on another training set"):
        Distilled(DistilledConfig(file=str(out)), model, data.subset(torch.arange(10)))
    with pytest.raises(AttributionError, match="needs --distilled.file"):
        Distilled(DistilledConfig(), model, data)
    with pytest.raises(AttributionError, match="not a distilled model folder"):
        Distilled(DistilledConfig(file=str(tmp_path)), model, data)


def test_features_of_the_wrong_dimension_are_refused(model, data, teacher, tmp_path):
    queries, folder = teacher
    out = tmp_path / "distilled"
    info = distill(model, data, queries, folder, out, _config())
    wrong = DistilledNet(info["in_dim"] + 3, NetConfig(hidden=(16,), out_dim=8), torch.zeros(info["in_dim"] + 3),
                         torch.ones(info["in_dim"] + 3))  # fmt: skip
    save_net(out, wrong, {k: v for k, v in info.items() if k != "fingerprint"} | {"in_dim": info["in_dim"] + 3})
    dim = info["in_dim"]
    with pytest.raises(AttributionError, match=f"features of dimension {dim}, .* reads {dim + 3}"):
        Distilled(DistilledConfig(file=str(out)), model, data)
    with pytest.raises(AttributionError, match="features of dimension 5 given to a distilled model"):
        wrong.embed(torch.zeros(2, 5))
