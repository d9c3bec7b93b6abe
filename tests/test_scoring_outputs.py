"""Scores, the pretrained-loss cache, run folders and ranking files."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from common.diffusion.keyed_losses import LossConfig
from common.errors import AttributionError
from common.methods.base import run_method
from common.methods.unlearning import Unlearning, UnlearningConfig, base_losses, loss_deviation
from common.outputs import build_ranking, prepare_run_dir, read_ranking, write_ranking
from common.unlearning.fisher import FisherConfig
from common.unlearning.unlearn import UnlearnConfig


def test_score_is_timestep_mean_rise_per_orientation():
    base = torch.zeros(2, 2, 2, dtype=torch.float64)
    after = torch.tensor([[[1.0, 3.0], [5.0, 5.0]], [[-1.0, -1.0], [-4.0, 0.0]]], dtype=torch.float64)
    assert loss_deviation(base, after).tolist() == [[2.0, 5.0], [-1.0, -2.0]]


def test_base_loss_cache_is_reused_per_setting_and_another_training_set_refused(model, data, tmp_path):
    def base(loss: LossConfig, training=data):
        cfg = UnlearningConfig(loss=loss)
        return base_losses(Unlearning(cfg, model, training, cache_dir=tmp_path))

    cfg = LossConfig(num_timesteps=2)
    first = base(cfg)
    again = base(LossConfig(num_timesteps=2, batch_size=3))
    torch.testing.assert_close(first, again)
    assert len(list((tmp_path / "base_losses").glob("*/pass.json"))) == 1  # batch_size does not change losses
    base(LossConfig(num_timesteps=4))  # other settings: a pass of their own beside the first
    assert len(list((tmp_path / "base_losses").glob("*/pass.json"))) == 2
    with pytest.raises(AttributionError, match="another training set"):
        base(cfg, data.subset(range(5)))
    with torch.no_grad():
        next(model.unet.parameters()).add_(1.0)
    with pytest.raises(AttributionError, match="another model"):
        base(cfg)


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


def _unlearning(model, data, cache, step_size=1e-3):
    cfg = UnlearningConfig(
        FisherConfig(num_samples=24),
        LossConfig(num_timesteps=20),  # enough timesteps for the query's loss rise to show through the noise
        UnlearnConfig(step_size=step_size, batch_size=8, accumulations=2),
    )
    return Unlearning(cfg, model, data, cache)


def test_run_method_writes_outputs_and_resumes(model, data, query, tmp_path, capsys):
    method = _unlearning(model, data, tmp_path / "cache")
    (folder,) = run_method(method, [query], tmp_path / "out", top_k=4)
    ranking = read_ranking(folder / "ranking.json")
    assert len(ranking["top_k"]) == 4 and (folder / "top10.png").stat().st_size > 0
    assert ranking["stats"]["query_loss_rise"] > 0 and ranking["model_fingerprint"] == model.fingerprint()
    config = json.loads((folder / "config.json").read_text())
    assert config["settings"]["unlearn"]["step_size"] == 1e-3 and "batch_size" not in config["settings"]["loss"]
    assert config["settings"]["unlearn"]["batch_size"] == method.cfg.unlearn.batch_size  # it picks the query draws
    cache = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert cache == ["base_losses", "fisher.safetensors", "scoring", "unlearned"]
    assert not [*(tmp_path / "cache" / "unlearned").iterdir(), *(tmp_path / "cache" / "scoring").iterdir()]
    run_method(method, [query], tmp_path / "out")
    assert "already attributed" in capsys.readouterr().out
    with pytest.raises(AttributionError, match="different config"):
        run_method(_unlearning(model, data, tmp_path / "cache", 2e-3), [query], tmp_path / "out")
    other_draws = _unlearning(model, data, tmp_path / "cache")
    other_draws.cfg = replace(other_draws.cfg, unlearn=replace(other_draws.cfg.unlearn, batch_size=2))
    with pytest.raises(AttributionError, match="unlearn.batch_size"):  # other draws: not skipped as attributed
        run_method(other_draws, [query], tmp_path / "out")
    changed = type(query)(query.id, query.image.flip(-1), query.text, query.prompt)
    with pytest.raises(AttributionError, match="query.fingerprint"):  # same id, other content: not skipped
        run_method(method, [changed], tmp_path / "out")


def test_overwrite_keeps_every_result_until_the_new_ones_are_complete(model, data, query, tmp_path, capsys):
    """--overwrite used to delete a query's results before the run could stop on a refused cache, leaving a
    config.json of settings that never ran."""
    method = _unlearning(model, data, tmp_path / "cache")
    (folder,) = run_method(method, [query], tmp_path / "out", top_k=4)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    refused = _unlearning(model, data, tmp_path / "cache")  # another Fisher: its cached file is refused
    refused.cfg = replace(refused.cfg, fisher=replace(refused.cfg.fisher, num_samples=16))
    with pytest.raises(AttributionError, match="fisher.safetensors was made with another"):
        run_method(refused, [query], tmp_path / "out", top_k=4, overwrite=True)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # scores, ranking, plot and config kept
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [query.id]
    fewer = _unlearning(model, data, tmp_path / "cache")  # other loss settings: their own pretrained-loss pass
    fewer.cfg = replace(fewer.cfg, loss=replace(fewer.cfg.loss, num_timesteps=8))
    run_method(fewer, [query], tmp_path / "out", top_k=4, overwrite=True)
    assert json.loads((folder / "config.json").read_text())["settings"]["loss"]["num_timesteps"] == 8
    assert (folder / "scores.npy").read_bytes() != before["scores.npy"] and (folder / "top10.png").is_file()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [query.id]  # no staging folder left
    capsys.readouterr()
    run_method(fewer, [query], tmp_path / "out", top_k=4)
    assert "already attributed" in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["empty", "truncated", "ranking"])
def test_a_finished_query_with_unreadable_outputs_is_attributed_again(model, data, query, tmp_path, capsys, damage):
    """A zero-byte or truncated scores.npy (or a broken ranking.json) used to be skipped as already attributed."""
    method = _unlearning(model, data, tmp_path / "cache")
    (folder,) = run_method(method, [query], tmp_path / "out", top_k=4)
    scores = (folder / "scores.npy").read_bytes()
    if damage == "ranking":
        (folder / "ranking.json").write_text("{")
    else:
        (folder / "scores.npy").write_bytes(b"" if damage == "empty" else scores[:-8])
    capsys.readouterr()
    run_method(method, [query], tmp_path / "out", top_k=4)
    assert "already attributed" not in capsys.readouterr().out
    assert (folder / "scores.npy").read_bytes() == scores and read_ranking(folder / "ranking.json")
