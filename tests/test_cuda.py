"""The same numbers on a GPU as on the CPU (skipped where no CUDA device is present; CI has none).

TEST_DEVICE names the device compared with the CPU (default ``cuda``).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from common import keyed_random
from common.data import ArrayTrainingSet
from common.diffusion.keyed_losses import LossConfig, image_losses
from common.unlearning.fisher import FisherConfig, estimate_fisher
from mscoco.model import MscocoModel
from tests.test_mscoco import attribute_flags, run_module, small_unet

DEVICE = os.environ.get("TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        DEVICE.startswith("cuda") and not torch.cuda.is_available(), reason="no CUDA device (TEST_DEVICE: another)"
    ),
]


@pytest.fixture(autouse=True)
def exact_float32():
    """TF32 off: the comparison is of float32 with float32."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_keyed_noise_is_the_same_on_the_device_as_on_the_cpu():
    keys = keyed_random.key_rows(0, keyed_random.Purpose.SCORE, torch.arange(257), 1, torch.arange(257) % 5)
    cpu = keyed_random.keyed_normal(keys, (4, 16, 16), torch.float64)
    dev = keyed_random.keyed_normal(keys.to(DEVICE), (4, 16, 16), torch.float64, device=DEVICE).cpu()
    assert torch.allclose(cpu, dev, rtol=0, atol=1e-12)  # exact integer Philox, Box-Muller in float64
    assert torch.equal(
        keyed_random.keyed_uniform(keys, 64), keyed_random.keyed_uniform(keys.to(DEVICE), 64, device=DEVICE).cpu()
    )


def tiny_setup(device):
    model = MscocoModel(small_unet().to(device), components=None)
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(12, 4, 16, 16, generator=g)
    data = ArrayTrainingSet(latents, torch.randn(12, 5, 77, 1024, generator=g), flipped=latents.flip(-1))
    return model, data


def test_losses_and_fisher_on_the_device_match_the_cpu():
    cfg = LossConfig(num_timesteps=4, batch_size=24)
    fisher_cfg = FisherConfig(selection="cross-attn-kv", num_samples=16, batch_size=8)
    out = {}
    for device in ("cpu", DEVICE):
        model, data = tiny_setup(device)
        idx = torch.arange(len(data))
        losses = image_losses(model, data, idx, idx, cfg)[""].cpu()
        bf16 = image_losses(model, data, idx, idx, cfg, precision="bf16")[""].cpu()
        model.prepare_for_gradients()
        fisher = {k: v.cpu() for k, v in estimate_fisher(model, data, fisher_cfg, progress=False).items()}
        out[device] = losses, bf16, fisher
    (cpu, cpu_bf16, cpu_fisher), (dev, dev_bf16, dev_fisher) = out["cpu"], out[DEVICE]
    assert torch.allclose(cpu, dev, rtol=1e-4, atol=0)
    assert torch.allclose(dev_bf16, dev, rtol=5e-2, atol=0) and torch.allclose(cpu_bf16, cpu, rtol=5e-2, atol=0)
    assert cpu_fisher.keys() == dev_fisher.keys()
    for k in cpu_fisher:
        assert torch.allclose(cpu_fisher[k], dev_fisher[k], rtol=1e-3, atol=1e-6 * float(cpu_fisher[k].max())), k


def test_attribute_script_on_the_device_ranks_as_on_the_cpu(tmp_path):
    flags = attribute_flags(tmp_path)
    flags[flags.index("--device") + 1] = DEVICE
    run_module("common.driver", "mscoco", "attribute", *flags, "--out", str(tmp_path / "dev"), "--no-plot")
    flags[flags.index("--device") + 1] = "cpu"
    run_module("common.driver", "mscoco", "attribute", *flags, "--out", str(tmp_path / "cpu"), "--no-plot")
    for q in ("sample000", "sample001", "sample002"):
        cpu = np.load(tmp_path / "cpu" / "unlearning" / q / "scores.npy")
        dev = np.load(tmp_path / "dev" / "unlearning" / q / "scores.npy")
        assert np.allclose(cpu, dev, rtol=1e-3, atol=1e-4 * np.abs(cpu).max()), q
        assert np.corrcoef(cpu, dev)[0, 1] > 0.999, q
