"""Resumable, sharded loss passes: equal to the in-memory pass, across kills, processes and weight sets."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from common.diffusion.keyed_losses import LossConfig, dataset_losses
from common.diffusion.loss_passes import PassConfig, loss_pass
from common.errors import AttributionError
from tests.conftest import ROOT
from tests.workers import SUBSET, passes

CFG = LossConfig(num_timesteps=4, batch_size=24)


def test_pass_equals_the_in_memory_losses_for_any_chunking(model, data, tmp_path):
    ref = dataset_losses(model, data, CFG)
    for chunk in (1, 5, 12):
        got = loss_pass(model, data, CFG, tmp_path / f"c{chunk}", pass_cfg=PassConfig(chunk_images=chunk))[""]
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    assert len(list((tmp_path / "c5" / "chunks").glob("*.safetensors"))) == 3
    (tmp_path / "c5" / "chunks" / "000001.safetensors").write_bytes(b"")  # a zero-byte chunk: computed again
    got = loss_pass(model, data, CFG, tmp_path / "c5", pass_cfg=PassConfig(chunk_images=5))[""]
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.slow  # torch.compile builds its kernels on the first call
def test_compiled_unet_scores_as_the_plain_one_under_swapped_weights(model, data, tmp_path):
    names = [n for n, _ in model.unet.named_parameters() if "attn2.to_v" in n]
    weights = {n: p.detach() * 1.5 for n, p in model.unet.named_parameters() if n in names}
    sets = {"base": None, "q": weights}
    plain = loss_pass(model, data, CFG, tmp_path / "plain", weight_sets=sets)
    fast = loss_pass(model, data, CFG, tmp_path / "fast", weight_sets=sets, pass_cfg=PassConfig(compile=True))
    for name in sets:  # the weights swapped in place reach the compiled graph
        torch.testing.assert_close(fast[name], plain[name], rtol=1e-5, atol=1e-7)
    assert not torch.allclose(fast["q"], fast["base"])


def test_weight_sets_score_like_separate_models(model, data, tmp_path):
    import copy

    names = [n for n, _ in model.unet.named_parameters() if "attn2.to_k" in n]
    other = copy.deepcopy(model.unet)
    with torch.no_grad():
        for n, p in other.named_parameters():
            if n in names:
                p.mul_(1.5)
    weights = {n: p.detach() for n, p in other.named_parameters() if n in names}
    before = model.fingerprint()
    got = loss_pass(model, data, CFG, tmp_path / "pass", weight_sets={"base": None, "q": weights})
    assert model.fingerprint() == before  # the swapped weights are restored
    torch.testing.assert_close(got["base"], dataset_losses(model, data, CFG), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got["q"], dataset_losses(model.with_unet(other), data, CFG), rtol=1e-10, atol=1e-12)
    assert not torch.allclose(got["q"], got["base"])


def test_pass_refuses_a_folder_made_otherwise_and_keeps_it(model, data, tmp_path):
    loss_pass(model, data, CFG, tmp_path / "pass", pass_cfg=PassConfig(chunk_images=4))
    before = sorted(p.name for p in (tmp_path / "pass" / "chunks").iterdir())
    with pytest.raises(AttributionError, match=r"made with another settings \(loss\)"):
        loss_pass(model, data, LossConfig(num_timesteps=2), tmp_path / "pass", pass_cfg=PassConfig(chunk_images=4))
    with pytest.raises(AttributionError, match="chunk_images"):
        loss_pass(model, data, CFG, tmp_path / "pass", pass_cfg=PassConfig(chunk_images=3))
    with pytest.raises(AttributionError, match="training set"):
        loss_pass(model, data.subset(range(6)), CFG, tmp_path / "pass", pass_cfg=PassConfig(chunk_images=4))
    assert sorted(p.name for p in (tmp_path / "pass" / "chunks").iterdir()) == before


def test_a_killed_pass_resumes_and_two_processes_agree_with_one(tmp_path, two_processes):
    py = [sys.executable, "-m", "tests.workers", "passes"]
    passes(str(tmp_path / "whole"), "one")  # in this process: the kill and the two processes need their own
    killed = subprocess.run([*py, str(tmp_path / "resumed"), "kill"], cwd=ROOT)
    assert killed.returncode == -9
    assert len(list((tmp_path / "resumed" / "chunks").glob("*.safetensors"))) == 3  # chunks 0-2 of 5, nothing partial
    assert not list((tmp_path / "resumed" / "chunks").glob("*.tmp*"))
    passes(str(tmp_path / "resumed"), "one")
    whole = torch.load(tmp_path / "whole" / "result-one.pt")
    assert torch.equal(torch.load(tmp_path / "resumed" / "result-one.pt"), whole)
    assert torch.equal(torch.load(two_processes / "passes" / "result-two.pt"), whole)
    subset = torch.load(tmp_path / "whole" / "subset-one.pt")  # candidates: the whole pass's rows, keyed by index
    torch.testing.assert_close(subset, whole[SUBSET], rtol=1e-6, atol=0)
    assert torch.equal(torch.load(tmp_path / "resumed" / "subset-one.pt"), subset)
    assert torch.equal(torch.load(two_processes / "passes" / "subset-two.pt"), subset)
    one, two = torch.load(tmp_path / "whole" / "fisher-one.pt"), torch.load(two_processes / "passes" / "fisher-two.pt")
    assert one.keys() == two.keys() and all(v.abs().sum() > 0 for v in one.values())
    for name in one:  # 4 batches split 2 + 2 over the processes, summed across them: the same Fisher
        torch.testing.assert_close(two[name], one[name], rtol=1e-6, atol=0)


def test_a_pass_over_some_indices_refuses_bad_ones_before_writing(model, data, tmp_path):
    bad = ((torch.tensor([1, 1]), "repeat"), (torch.tensor([0, 12]), r"\[0, 12\)"), (torch.tensor([]), "no training"))
    for positions, message in bad:
        with pytest.raises(AttributionError, match=message):
            loss_pass(model, data, CFG, tmp_path / "pass", positions=positions)
    assert not (tmp_path / "pass").exists()
