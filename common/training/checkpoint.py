"""Resumable training checkpoints as safetensors + JSON (no pickle)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from common.files import save_tensors


def save_training_state(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, info: dict) -> None:
    """Write model weights, optimizer moments and ``info`` (step, config) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    scalars: dict[str, dict[str, float]] = {}
    for idx, state in opt["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.dim() > 0:
                tensors[f"opt.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = float(value)
    meta = {"info": json.dumps(info), "param_groups": json.dumps(opt["param_groups"]), "scalars": json.dumps(scalars)}
    save_tensors(path, tensors, metadata=meta)


def load_training_state(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore what :func:`save_training_state` wrote; returns its ``info``."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    device = next(model.parameters()).device
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value.to(device)
    for idx, values in json.loads(meta["scalars"]).items():
        for name, value in values.items():
            state.setdefault(int(idx), {})[name] = torch.tensor(value)
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    return json.loads(meta["info"])
