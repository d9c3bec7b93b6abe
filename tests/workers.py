"""Worker processes of the kill and multi-process tests: ``python -m tests.workers passes|curvature|all FOLDER MODE``.

MODE is ``one`` (a single process), ``kill`` (the pass kills itself midway, passes only) or ``two`` (under
``torchrun --nproc_per_node 2 -m tests.workers ...``). Each writes its results under FOLDER for the test to compare.
"""

from __future__ import annotations

import os
import signal
import sys

import torch

from tests.conftest import worker_model_and_data


def accelerator_for(mode: str):
    """None for one process; the two gloo processes' accelerator under ``torchrun``."""
    if mode != "two":
        return None
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2
    return accelerator


SUBSET = torch.tensor([7, 1, 4, 9, 2])  # a pass over some training indices only (a query's candidates)


def passes(folder: str, mode: str) -> None:
    """A loss pass, one over ``SUBSET`` and a Fisher on the micro model, one process, two, or killed by a real signal
    midway."""
    from common.diffusion.keyed_losses import LossConfig
    from common.diffusion.loss_passes import PassConfig, loss_pass
    from common.unlearning.fisher import FisherConfig, estimate_fisher

    model, data = worker_model_and_data()
    accelerator = accelerator_for(mode)

    def stop(chunk: int) -> None:
        if mode == "kill" and chunk == 2:
            os.kill(os.getpid(), signal.SIGKILL)

    cfg = LossConfig(num_timesteps=4, batch_size=16)
    losses = loss_pass(model, data, cfg, folder, pass_cfg=PassConfig(chunk_images=2), accelerator=accelerator,
                       on_chunk=stop)[""]  # fmt: skip
    subset = loss_pass(model, data, cfg, folder + "/subset", pass_cfg=PassConfig(chunk_images=2),
                       accelerator=accelerator, positions=SUBSET)[""]  # fmt: skip
    fisher = estimate_fisher(model, data, FisherConfig(num_samples=14, batch_size=4), False, accelerator)
    if accelerator is None or accelerator.is_main_process:
        torch.save(losses, folder + f"/result-{mode}.pt")
        torch.save(subset, folder + f"/subset-{mode}.pt")
        torch.save(fisher, folder + f"/fisher-{mode}.pt")


def curvature(folder: str, mode: str) -> None:
    """EK-FAC factors and block Fisher matrices of the micro model (float64), on one process or two."""
    from common.unlearning.block import cached_block
    from common.unlearning.ekfac import cached_ekfac
    from common.unlearning.fisher import FisherConfig

    model, data = worker_model_and_data(dtype=torch.float64)
    accelerator = accelerator_for(mode)
    ekfac = cached_ekfac(model, data, FisherConfig(num_samples=28, batch_size=4), folder + "/ekfac", False, accelerator)
    block = cached_block(model, data, FisherConfig(num_samples=130, batch_size=20), folder + "/block.safetensors",
                         False, accelerator)  # fmt: skip
    if accelerator is None or accelerator.is_main_process:
        torch.save(
            ekfac.lambdas | {"A:" + k: v for k, v in ekfac.activation_eigenvectors.items()}, folder + "/ekfac.pt"
        )
        torch.save(block.matrices, folder + "/block.pt")


JOBS = {"passes": passes, "curvature": curvature}

if __name__ == "__main__":
    job, folder, mode = sys.argv[1:]
    for name in JOBS if job == "all" else [job]:  # all: each job in FOLDER/<job>, one start for both
        where = f"{folder}/{name}" if job == "all" else folder
        os.makedirs(where, exist_ok=True)
        JOBS[name](where, mode)
