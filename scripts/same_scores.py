"""Record, then check, the scores of every benchmark's micro runs, bit for bit: the guard of a refactor.

    python -m scripts.same_scores --record scripts/same_scores.json   # before a change (about 3 min on 2 cores)
    python -m scripts.same_scores --check scripts/same_scores.json    # after: each run that differs, and by how much

The runs are the command-line scripts on the fixtures the tests build, with the micro presets: the tiny pipeline
as the quickstart runs it (shapes, training, queries, attribution), the MSCOCO release layout and the AbC layout,
each with every method that needs no downloaded weights, TRAK with an ensemble of two. Each run is its own process
with two threads, so float sums add up in the same order every time. The scores of two machines or two torch
builds may differ in the last bits; record and check on one machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

TINY_CONFIG = str(ROOT / "tiny" / "configs" / "tiny.yaml")
SMALL_TRAK = ["--trak.projection_dim", "32", "--trak.num_timesteps", "2", "--trak.selection", "cross-attn-kv"]
SMALL_D_TRAK = ["--d_trak.projection_dim", "32", "--d_trak.num_timesteps", "2", "--d_trak.selection", "cross-attn-kv"]
SHARED = [["unlearning"], ["pixel"], ["random"], ["d-trak", *SMALL_D_TRAK], ["trak", *SMALL_TRAK, "--trak.ensemble"]]
TINY_METHODS = [*SHARED, ["text-condition"]]
MSCOCO_METHODS = SHARED
ABC_METHODS = [*SHARED, ["text-condition"]]


def run(module: str, *args: str) -> None:
    """``python -m module args`` from the repository root with two threads; its error in full if it fails."""
    env = os.environ | {"OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{module} {' '.join(args)} failed:\n{proc.stderr[-3000:]}")


def collect(folder: Path) -> dict[str, list[float]]:
    """Every query's scores under one method's output folder, by query folder name."""
    return {p.parent.name: np.load(p).astype(np.float64).tolist() for p in sorted(folder.glob("*/scores.npy"))}


def method_flags(method: list[str], ensemble: Path) -> list[str]:
    """``--method NAME`` and its flags; TRAK's ensemble flag takes the other model."""
    name, *flags = method
    return ["--method", name, *flags, *([str(ensemble)] if flags[-1:] == ["--trak.ensemble"] else [])]


def tiny_runs(tmp: Path) -> dict[str, dict]:
    data, model, other, queries = tmp / "data", tmp / "model", tmp / "other", tmp / "queries"
    run("tiny.shapes", "--out", str(data), "--num-images", "48", "--resolution", "16")
    for folder, seed in ((model, "0"), (other, "1")):
        run("tiny.train", "--data", str(data), "--out", str(folder), "--config", TINY_CONFIG, "--preset", "micro",
            "--device", "cpu", "--train.seed", seed)  # fmt: skip
    run(
        "common.driver",
        "tiny",
        "generate",
        "--model",
        str(model),
        "--out",
        str(queries),
        "--num",
        "2",
        "--num-steps",
        "20",
    )
    out, results = tmp / "attr", {}
    for method in TINY_METHODS:
        flags = ["--model", str(model), "--data", str(data), "--queries", str(queries), "--out", str(out)]
        flags += ["--config", TINY_CONFIG, "--preset", "micro", "--device", "cpu", *method_flags(method, other)]
        run("common.driver", "tiny", "attribute", *flags)
        results[f"tiny/{method[0]}"] = collect(out / method[0])
    return results


def mscoco_runs(tmp: Path) -> dict[str, dict]:
    from mscoco import release
    from tests.test_mscoco import small_unet, write_model_files, write_release

    data, components, other = tmp / "data", tmp / "sd2", tmp / "other"
    write_release(data, text_dtype=np.float32)
    write_model_files(data, components)
    small_unet(seed=1).save_pretrained(other)
    out, results = tmp / "out", {}
    for method in MSCOCO_METHODS:
        flags = ["--data", str(data), "--components", str(components), "--queries", "release:0-2", "--out", str(out)]
        flags += ["--config", "mscoco/configs/mscoco.yaml", "--preset", "micro", "--device", "cpu", "--no-plot"]
        flags += ["--fisher.file", str(data / release.FISHER)] if method[0] == "unlearning" else []
        run("common.driver", "mscoco", "attribute", *flags, *method_flags(method, other))
        results[f"mscoco/{method[0]}"] = collect(out / method[0])
    return results


def abc_runs(tmp: Path) -> dict[str, dict]:
    import shutil

    import torch
    from diffusers import UNet2DConditionModel

    from common.diffusion.selection import select_parameters
    from tests.test_custom_diffusion import CONFIG, write_abc

    write_abc(tmp)
    unet = UNet2DConditionModel.from_pretrained(tmp / "sd" / "unet")
    params = dict(unet.named_parameters())
    g = torch.Generator().manual_seed(0)
    names = select_parameters(unet, "cross-attn-kv")
    torch.save({n: torch.rand(params[n].shape, generator=g, dtype=torch.float64) + 0.1 for n in names},
               tmp / "sd_fisher.pt")  # fmt: skip
    shutil.copytree(tmp / "sd", tmp / "sd_other")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    unet.save_pretrained(tmp / "sd_other" / "unet")
    data, out, results = tmp / "abc", tmp / "out", {}
    for method in ABC_METHODS:
        flags = ["--data", str(data), "--tasks", str(data / "tasks.json"), "--sd", str(tmp / "sd"), "--out", str(out)]
        flags += ["--config", str(CONFIG), "--preset", "micro", "--device", "cpu", "--laion-count", "4", "--no-plot"]
        flags += ["--fisher.file", str(tmp / "sd_fisher.pt")] if method[0] == "unlearning" else []
        run("common.driver", "abc", "attribute", *flags, *method_flags(method, tmp / "sd_other"))
        results[f"abc/{method[0]}"] = collect(out / method[0])
    return results


def all_runs() -> dict[str, dict]:
    results = {}
    for name, runs in (("tiny", tiny_runs), ("mscoco", mscoco_runs), ("abc", abc_runs)):
        with tempfile.TemporaryDirectory() as tmp:
            print(f"{name} micro runs ...", flush=True)
            results |= runs(Path(tmp))
    return results


def differences(recorded: dict[str, dict], now: dict[str, dict]) -> list[str]:
    """One line per run whose queries or scores are not the recorded ones, bit for bit."""
    lines = []
    for name in sorted(set(recorded) | set(now)):
        old, new = recorded.get(name), now.get(name)
        if old is None or new is None:
            lines.append(f"{name}: {'new' if old is None else 'missing'} run")
        elif sorted(old) != sorted(new):
            lines.append(f"{name}: queries {sorted(old)} recorded, {sorted(new)} now")
        elif any(old[q] != new[q] for q in old):
            worst = max(float(np.max(np.abs(np.subtract(old[q], new[q])))) for q in old if len(old[q]) == len(new[q]))
            lines.append(f"{name}: scores differ (max |difference| {worst:.3g})")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--record", type=Path, help="write the scores to this JSON file")
    mode.add_argument("--check", type=Path, help="compare with the scores recorded in this JSON file")
    args = parser.parse_args()
    if args.check and not args.check.is_file():
        sys.exit(f"no recorded scores at {args.check}")
    now = all_runs()
    if args.record:
        args.record.write_text(json.dumps(now, indent=1) + "\n")
        print(f"{sum(len(r) for r in now.values())} queries of {len(now)} runs recorded in {args.record}")
        return
    lines = differences(json.loads(args.check.read_text()), now)
    print("\n".join(lines) or f"the same scores, bit for bit, in all {len(now)} runs")
    sys.exit(1 if lines else 0)


if __name__ == "__main__":
    main()
