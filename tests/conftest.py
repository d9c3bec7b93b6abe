"""Tiny float64 models and data shared by the tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.data import ArrayTrainingSet, Query
from tiny.model import TinyModelConfig, TinyTextToImage

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> str:
    """A TCP port free now, for a torchrun rendezvous (a fixed one may still be held by an earlier test's run)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


torch.set_num_threads(2)


@pytest.fixture(scope="session")
def two_processes(tmp_path_factory) -> Path:
    """Both worker jobs (``tests/workers.py``) run by 2 gloo processes under one ``torchrun`` start:
    FOLDER/passes and FOLDER/curvature."""
    import subprocess
    import sys

    folder = tmp_path_factory.mktemp("two")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port()]
    proc = subprocess.run([*torchrun, "-m", "tests.workers", "all", str(folder), "two"], cwd=ROOT,
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folder


def micro_config() -> TinyModelConfig:
    return TinyModelConfig(resolution=8, channels=(8, 16), heads=1, text_dim=8, text_layers=1, context_length=8)


def worker_model_and_data(n: int = 10, dtype: torch.dtype = torch.float32) -> tuple[TinyTextToImage, ArrayTrainingSet]:
    """The micro model (weights perturbed, ready for gradients) and ``n`` random images with two random text
    conditions each: what the multi-process and kill tests' worker scripts run on."""
    torch.manual_seed(0)
    model = TinyTextToImage(micro_config())
    with torch.no_grad():
        for p in model.unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.unet.to(dtype)
    model.prepare_for_gradients()
    g = torch.Generator().manual_seed(1)
    images = torch.rand(n, 3, 8, 8, generator=g, dtype=dtype) * 2 - 1
    return model, ArrayTrainingSet(images, torch.randn(n, 2, 8, 8, generator=g, dtype=dtype))


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


def pack_7z(files_dir: Path, archive: Path, names: list[str], volume: int | None = None) -> None:
    """A 7z archive of ``files_dir/<name>`` (files or folders), split into 7-zip's ``.001, .002, ...`` if ``volume``."""
    import multivolumefile
    import py7zr

    archive.parent.mkdir(parents=True, exist_ok=True)
    target = multivolumefile.open(archive, mode="wb", volume=volume) if volume else archive
    with py7zr.SevenZipFile(target, "w") as z:
        for name in names:
            z.writeall(files_dir / name, name) if (files_dir / name).is_dir() else z.write(files_dir / name, name)
    if volume:
        target.close()
        for part in sorted(archive.parent.glob(archive.name + ".0*")):  # 7-zip's names: .001, not .0001
            part.rename(part.with_suffix(f".{int(part.suffix[1:]):03d}"))
