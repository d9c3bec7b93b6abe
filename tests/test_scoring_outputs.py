"""Scores, the pretrained-loss cache, run folders and ranking files."""

import json

import numpy as np
import pytest
import torch

from common.attribute import cached_base_losses, loss_deviation_scores, run_attribution
from common.errors import AttributionError
from common.fisher import FisherConfig, estimate_fisher
from common.losses import LossConfig
from common.outputs import build_ranking, prepare_run_dir, read_ranking, write_ranking
from common.unlearn import UnlearnConfig


def test_score_is_timestep_mean_rise_max_over_flips():
    base = torch.zeros(2, 2, 2, dtype=torch.float64)
    after = torch.tensor([[[1.0, 3.0], [5.0, 5.0]], [[-1.0, -1.0], [-4.0, 0.0]]], dtype=torch.float64)
    assert loss_deviation_scores(base, after).tolist() == [5.0, -1.0]


def test_base_loss_cache_is_reused_and_mismatches_refused(model, data, tmp_path):
    path = tmp_path / "base.safetensors"
    cfg = LossConfig(num_timesteps=2)
    first = cached_base_losses(model.unet, data, cfg, model.alphas_cumprod, path, "model-a")
    again = cached_base_losses(
        model.unet, data, LossConfig(num_timesteps=2, batch_size=3), model.alphas_cumprod, path, "model-a"
    )
    torch.testing.assert_close(first, again)
    with pytest.raises(AttributionError, match="different loss settings"):
        cached_base_losses(model.unet, data, LossConfig(num_timesteps=4), model.alphas_cumprod, path, "model-a")
    with pytest.raises(AttributionError, match="different model"):
        cached_base_losses(model.unet, data, cfg, model.alphas_cumprod, path, "model-b")
    with pytest.raises(AttributionError, match="different training set"):
        cached_base_losses(model.unet, data.subset(range(5)), cfg, model.alphas_cumprod, path, "model-a")


def test_ranking_round_trip_and_schema(data, tmp_path):
    scores = np.linspace(-1, 1, len(data))[::-1].copy()
    scores[4] = scores[5]  # a tie: the lower index ranks first
    ranking = build_ranking({"id": "q", "prompt": "p", "image": None}, "unlearning", scores, data, top_k=5)
    write_ranking(tmp_path, ranking, scores)
    loaded = read_ranking(tmp_path / "ranking.json")
    assert loaded == ranking
    assert [r["index"] for r in loaded["top_k"]] == [0, 1, 2, 3, 4]
    assert [r["rank"] for r in loaded["top_k"]] == [1, 2, 3, 4, 5]
    assert loaded["top_k"][2]["caption"] == data.captions[2][0] and loaded["num_train"] == len(data)
    saved = np.load(tmp_path / "scores.npy")
    assert saved.dtype == np.float32 and saved.shape == (len(data),)
    broken = dict(ranking, top_k=list(reversed(ranking["top_k"])))
    (tmp_path / "bad.json").write_text(json.dumps(broken))
    with pytest.raises(AttributionError, match="not sorted"):
        read_ranking(tmp_path / "bad.json")


def test_run_dir_refuses_other_configs_and_foreign_folders(tmp_path):
    run = prepare_run_dir(tmp_path / "run", {"a": 1, "b": [1, 2]})
    (run / "result.txt").write_text("keep me")
    assert prepare_run_dir(tmp_path / "run", {"a": 1, "b": (1, 2)}) == run
    with pytest.raises(AttributionError, match="different config"):
        prepare_run_dir(tmp_path / "run", {"a": 2, "b": [1, 2]})
    assert (run / "result.txt").read_text() == "keep me"
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x").write_text("")
    with pytest.raises(AttributionError, match="no config.json"):
        prepare_run_dir(tmp_path / "foreign", {"a": 1})
    prepare_run_dir(tmp_path / "run", {"a": 2}, overwrite=True)
    assert not (run / "result.txt").exists()


def test_run_attribution_writes_outputs_and_resumes(model, data, query, tmp_path, capsys):
    loss_cfg = LossConfig(num_timesteps=2)
    fisher = estimate_fisher(model.unet, data, model.alphas_cumprod, FisherConfig(num_samples=24), False)
    base = cached_base_losses(model.unet, data, loss_cfg, model.alphas_cumprod, tmp_path / "b.safetensors", "m")
    args = dict(
        alphas_cumprod=model.alphas_cumprod,
        loss_cfg=loss_cfg,
        fisher=fisher,
        base=base,
        run_config={"model": "m"},
        top_k=4,
        image_of=lambda i: np.zeros((8, 8, 3), np.uint8),
    )
    cfg = UnlearnConfig(step_size=1e-3, batch_size=8, accumulations=2)
    (folder,) = run_attribution(model.unet, data, [query], tmp_path / "out", unlearn_cfg=cfg, **args)
    ranking = read_ranking(folder / "ranking.json")
    assert len(ranking["top_k"]) == 4 and (folder / "top10.png").stat().st_size > 0
    assert ranking["stats"]["query_loss_rise"] > 0
    assert json.loads((folder / "config.json").read_text())["unlearn"]["step_size"] == 1e-3
    run_attribution(model.unet, data, [query], tmp_path / "out", unlearn_cfg=cfg, **args)
    assert "already attributed" in capsys.readouterr().out
    with pytest.raises(AttributionError, match="different config"):
        run_attribution(
            model.unet,
            data,
            [query],
            tmp_path / "out",
            unlearn_cfg=UnlearnConfig(step_size=2e-3, batch_size=8, accumulations=2),
            **args,
        )
