"""Does the unlearning step forget the target and keep the rest? (the paper's Table 3, tiny scale)

    python -m tiny.unlearning_check --model M --data D --queries Q --out OUT --config tiny/configs/tiny.yaml

For each query as the target: unlearn it, regenerate every query from its saved noise, prompt and
sampler settings, and compare with the original model's regeneration. The target's MSE should rise
while the other prompts' stays small. The same comparison on the diffusion loss (ΔL of each
query's image over 200 timesteps with fixed noise) does not depend on a sampler's trajectory.
Writes ``OUT/unlearning_check.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from common.config import add_dataclass_arguments, dataclass_from_args, load_preset
from common.errors import cli
from common.evaluation.counterfactual import delta_loss, mse, regenerate
from common.queries import load_queries
from common.unlearning.fisher import FisherConfig, cached_fisher
from common.unlearning.unlearn import UnlearnConfig, unlearn
from tiny.pipeline import load_run


@cli
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="folder of a trained tiny model")
    parser.add_argument("--data", required=True, help="the training image folder")
    parser.add_argument("--queries", required=True, help="queries folder (with saved noise)")
    parser.add_argument("--out", required=True, help="output folder (its fisher.safetensors is reused)")
    parser.add_argument("--config", default=None, help="YAML file of presets")
    parser.add_argument("--preset", default="default", help="preset name in --config")
    add_dataclass_arguments(parser, FisherConfig, "fisher")
    add_dataclass_arguments(parser, UnlearnConfig, "unlearn")
    args = load_preset(parser, ["fisher", "unlearn"])
    out = Path(args.out)
    run = load_run(args.model, args.data, "cpu")
    model, data = run.model, run.data
    queries = load_queries(args.queries)
    originals = [regenerate(model, q) for q in queries]
    # The saved image came from the same model, noise and sampler: regeneration must reproduce it.
    reproduction = max(mse(o, q.image) for o, q in zip(originals, queries))
    fisher_cfg = dataclass_from_args(FisherConfig, args, "fisher")
    fisher = cached_fisher(model, data, fisher_cfg, out / "fisher.safetensors")
    cfg = dataclass_from_args(UnlearnConfig, args, "unlearn")
    rows = []
    for target in queries:
        forgot = unlearn(model, target, cfg, fisher, num_train=len(data), progress=False).model
        errors = [mse(regenerate(forgot, q), o) for q, o in zip(queries, originals)]
        rises = [delta_loss(model, forgot, q) for q in queries]
        i = queries.index(target)
        rows.append(
            {
                "target": target.id,
                "prompt": target.prompt,
                "target_mse": errors[i],
                "others_mse_mean": float(np.mean(errors[:i] + errors[i + 1 :])),
                "target_delta_loss": rises[i],
                "others_delta_loss_mean": float(np.mean(rises[:i] + rises[i + 1 :])),
            }
        )
        print(
            f"{target.id}: MSE target {errors[i]:.4f}, other prompts {rows[-1]['others_mse_mean']:.4f}; "
            f"ΔL target {rises[i]:.2e}, other prompts {rows[-1]['others_delta_loss_mean']:.2e}"
        )
    report = {
        "unlearn": cfg.__dict__,
        "reproduction_mse": reproduction,
        "rows": rows,
        "target_mse_mean": float(np.mean([r["target_mse"] for r in rows])),
        "others_mse_mean": float(np.mean([r["others_mse_mean"] for r in rows])),
        "target_delta_loss_mean": float(np.mean([r["target_delta_loss"] for r in rows])),
        "others_delta_loss_mean": float(np.mean([r["others_delta_loss_mean"] for r in rows])),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "unlearning_check.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["| target | target MSE | other prompts' MSE | target ΔL | other prompts' ΔL |", "|---|---|---|---|---|"]
    cells = [
        (r["target"], r["target_mse"], r["others_mse_mean"], r["target_delta_loss"], r["others_delta_loss_mean"])
        for r in rows
    ]
    cells.append(("mean", *(report[k] for k in ("target_mse_mean", "others_mse_mean"))))
    cells[-1] += (report["target_delta_loss_mean"], report["others_delta_loss_mean"])
    lines += [f"| {n} | {a:.4f} | {b:.4f} | {c:.2e} | {d:.2e} |" for n, a, b, c, d in cells]
    (out / "unlearning_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
