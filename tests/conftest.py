"""Tiny float64 models and data shared by the tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.data import ArrayTrainingSet, Query  # noqa: E402
from tiny.model import TinyModelConfig, TinyTextToImage  # noqa: E402

torch.set_num_threads(2)


def micro_config() -> TinyModelConfig:
    return TinyModelConfig(resolution=8, channels=(8, 16), heads=1, text_dim=8, text_layers=1, context_length=8)


@pytest.fixture
def model() -> TinyTextToImage:
    torch.manual_seed(0)
    m = TinyTextToImage(micro_config())
    # Random-init UNets zero their output layer; perturb every weight so gradients reach all of them.
    with torch.no_grad():
        for p in m.unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    m.unet.to(torch.float64)
    return m.prepare_for_gradients()


@pytest.fixture
def data(model: TinyTextToImage) -> ArrayTrainingSet:
    g = torch.Generator().manual_seed(1)
    n = 12
    images = torch.rand(n, 3, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    captions = [[f"a {c} square number {i}", f"another {c} caption {i}"] for i, c in enumerate(["red", "blue"] * 6)]
    text = model.encode_text([c for caps in captions for c in caps]).view(n, 2, 8, 8).double()
    return ArrayTrainingSet(images, text, captions, [f"img{i}.png" for i in range(n)])


@pytest.fixture
def query(data: ArrayTrainingSet) -> Query:
    return Query("q0", data.images(torch.tensor([3]))[0].clone(), data.text(torch.tensor([3]), 0).clone(), "a query")
