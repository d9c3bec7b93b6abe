"""Peak resident memory of scoring at several training-set sizes (mscoco/README.md, "Memory").

    python -m mscoco.memory --sizes 2000 8000 [--widths 16,32,32,32] [--out memory.json]

For each size N, arrays in the released layout (text embeddings in float16, 788 KB per image) are
written to a scratch folder with a UNet (``--widths``) and a Fisher file over all its weights; then the attribute
stage (``python -m common.driver mscoco attribute``) scores one released query with unlearning (the Fisher imported,
pretrained losses and the scoring pass over all N images) in a child process whose memory is read from ``/proc`` every
20 ms: ``RssAnon`` (its own memory: model, tensors, buffers) and ``RssFile`` (pages of the memory-mapped
arrays mapped in so far; clean file pages, which the kernel drops under memory pressure), and their sum.
Activations depend on the batch, not on N, so the UNet's width does not change the comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from common.errors import cli, require
from mscoco import release
from mscoco.model import build_unet

ROOT = Path(__file__).resolve().parent.parent


def write_arrays(folder: Path, n: int, queries: int = 1, widths=(16, 32, 32, 32), seed: int = 0) -> None:
    """A release folder of ``n`` images (written in blocks, never whole in memory), a UNet and its Fisher."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    latents = np.lib.format.open_memmap(folder / release.TRAIN_LATENTS, "w+", np.float32, (2 * n, 4, 16, 16))
    text = np.lib.format.open_memmap(folder / release.TRAIN_TEXT, "w+", np.float16, (n, 5, 77, 1024))
    for start in range(0, n, 500):
        stop = min(n, start + 500)
        latents[start:stop] = rng.normal(size=(stop - start, 4, 16, 16))
        latents[n + start : n + stop] = latents[start:stop, ..., ::-1]
        text[start:stop] = rng.normal(size=(stop - start, 5, 77, 1024)).astype(np.float16)
    latents.flush(), text.flush()
    del latents, text
    np.save(folder / release.SAMPLE_LATENTS, rng.normal(size=(queries, 4, 16, 16)).astype(np.float32))
    np.save(folder / release.SAMPLE_TEXT, rng.normal(size=(queries, 1, 77, 1024)).astype(np.float32))
    (folder / release.SAMPLE_CAPTIONS).write_text("".join(f"query {i}\n" for i in range(queries)))
    torch.manual_seed(seed)
    unet = build_unet(block_out_channels=widths, **({} if widths[0] % 32 == 0 else {"norm_num_groups": 8}))
    (folder / "config.json").write_text(json.dumps(dict(unet.config)))
    torch.save(unet.state_dict(), folder / release.MODEL)
    fisher = {k: torch.rand_like(v, dtype=torch.float64) + 0.1 for k, v in unet.named_parameters()}
    torch.save(fisher, folder / release.FISHER)


def status_kb(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon and RssFile of a process in KiB (empty once it has exited)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except (FileNotFoundError, ProcessLookupError):
        return {}
    fields = {}
    for line in lines:
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile"):
            fields[name] = int(value.split()[0])
    return fields


def peak_memory(command: list[str], interval: float = 0.02) -> dict:
    """Run ``command``; the peaks of its sampled RssAnon, RssFile and VmRSS (MiB) and its wall time."""
    peaks = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    t0 = time.time()
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def watch() -> None:
        while proc.poll() is None:
            for name, value in status_kb(proc.pid).items():
                peaks[name] = max(peaks[name], value)
            time.sleep(interval)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    _, err = proc.communicate()
    watcher.join()
    require(proc.returncode == 0, f"scoring failed: {err.strip().splitlines()[-1] if err.strip() else proc.returncode}")
    return {f"peak_{k}_mib": round(v / 1024, 1) for k, v in peaks.items()} | {"seconds": round(time.time() - t0, 1)}


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 8000], help="training-set sizes N")
    parser.add_argument("--widths", default="16,32,32,32", help="UNet block widths")
    parser.add_argument("--chunk-images", type=int, default=256, help="images per pass chunk (scoring.chunk_images)")
    parser.add_argument("--scratch", default=None, help="folder for the arrays (default: a temporary one)")
    parser.add_argument("--out", default=None, help="write the numbers as JSON")
    args = parser.parse_args(argv)
    widths = tuple(int(w) for w in args.widths.split(","))
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="mscoco-memory-"))
    rows = []
    for n in args.sizes:
        folder = scratch / f"n{n}"
        write_arrays(folder, n, widths=widths)
        command = [
            sys.executable,
            "-m",
            "common.driver",
            "mscoco",
            "attribute",
            "--data",
            str(folder),
            "--queries",
            "release:0",
        ]
        command += ["--config", "mscoco/configs/mscoco.yaml", "--preset", "micro", "--device", "cpu", "--no-plot"]
        command += ["--fisher.file", str(folder / release.FISHER), "--out", str(folder / "out")]
        command += [
            "--scoring.chunk_images",
            str(args.chunk_images),
            "--loss.batch_size",
            "640",
            "--loss.num_timesteps",
            "1",
        ]
        row = {"n": n, "text_embeddings_gib": round(os.path.getsize(folder / release.TRAIN_TEXT) / 2**30, 2)}
        rows.append(row | peak_memory(command))
        print(json.dumps(rows[-1]))
        shutil.rmtree(folder)
    if not args.scratch:
        shutil.rmtree(scratch, ignore_errors=True)
    result = {"widths": widths, "chunk_images": args.chunk_images, "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
