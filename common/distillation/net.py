"""The distilled attribution network (FastGDA's design) and its folder.

One MLP, shared by the query's and the training image's features, maps each to an embedding; the score is a
learned scale times the cosine of the two embeddings plus a learned bias (scale starts at 1, bias at 0). Unlike
FastGDA, whose DINO and CLIP inputs share a scale, the inputs are standardised by the training set's feature mean
and spread (stored with the network): the model's own features mix activations and text conditions of unlike
sizes. A larger score means the training image supports the query more (the teacher's order).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from common.errors import require
from common.files import read_json, read_safetensors, save_tensors, write_json
from common.fingerprints import module_fingerprint

WEIGHTS, INFO = "distilled.safetensors", "distilled.json"


@dataclass
class NetConfig:
    """The shared MLP (FastGDA: three hidden layers of 768, 768 out, dropout 0.1, on 1,280 inputs)."""

    hidden: tuple[int, ...] = field(default=(256, 256), metadata={"help": "hidden layer widths"})
    out_dim: int = field(default=128, metadata={"help": "embedding size"})
    dropout: float = field(default=0.1, metadata={"help": "dropout after each hidden layer while training"})

    def __post_init__(self) -> None:
        self.hidden = tuple(int(h) for h in self.hidden)
        require(all(h >= 1 for h in self.hidden), f"hidden widths must be positive, got {self.hidden}")
        require(self.out_dim >= 1, f"out_dim must be positive, got {self.out_dim}")
        require(0 <= self.dropout < 1, f"dropout must lie in [0, 1), got {self.dropout}")


class DistilledNet(nn.Module):
    """Embeds features (B, in_dim) to unit rows (B, out_dim); scores pairs by ``scale`` x cosine + ``bias``."""

    def __init__(self, in_dim: int, cfg: NetConfig, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        require(mean.shape == std.shape == (in_dim,), f"feature statistics must have shape ({in_dim},)")
        self.in_dim = in_dim
        self.register_buffer("mean", mean.float().clone())
        self.register_buffer("std", std.float().clamp_min(1e-6).clone())
        layers, width = [], in_dim
        for h in cfg.hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(cfg.dropout)]
            width = h
        layers.append(nn.Linear(width, cfg.out_dim))
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
        self.scale = nn.Parameter(torch.ones(1))
        self.bias = nn.Parameter(torch.zeros(1))

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """Unit embeddings (B, out_dim) of raw features (B, in_dim)."""
        require(
            features.shape[-1] == self.in_dim,
            f"features of dimension {features.shape[-1]} given to a distilled model of {self.in_dim}",
        )
        z = self.mlp((features.float() - self.mean) / self.std)
        return z / z.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def forward(self, query: torch.Tensor, train: torch.Tensor) -> torch.Tensor:
        """Logits (B,) of pairs of raw features (B, in_dim) each."""
        return self.scale * (self.embed(query) * self.embed(train)).sum(-1) + self.bias


def save_net(folder: Path, net: DistilledNet, info: dict) -> None:
    """Write ``distilled.safetensors`` (weights, feature statistics) and ``distilled.json`` (identity, results)."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    save_tensors(folder / WEIGHTS, state)
    write_json(folder / INFO, info | {"fingerprint": module_fingerprint(net)})


def load_net(folder: str | Path) -> tuple[DistilledNet, dict]:
    """A distilled network and its ``distilled.json``; one line if the folder is not one."""
    folder = Path(folder)
    require(
        (folder / INFO).is_file() and (folder / WEIGHTS).is_file(),
        f"{folder} is not a distilled model folder (no {INFO} and {WEIGHTS}): make one with the distill stage",
    )
    info = read_json(folder / INFO, "distilled model description")
    state = read_safetensors(folder / WEIGHTS, "distilled model weights")
    net = DistilledNet(int(info["in_dim"]), NetConfig(**info["identity"]["net"]), state["mean"], state["std"])
    net.load_state_dict(state)
    require(
        module_fingerprint(net) == info.get("fingerprint"),
        f"{folder / WEIGHTS} does not match {INFO} (copied from another run?)",
    )
    return net.eval(), info


def describe(info: dict) -> str:
    """One line: teacher, queries and validation agreement of a distilled model."""
    val = info.get("validation", {})
    maps = ", ".join(f"mAP@{k} {v['mean']:.2f}" for k, v in val.items()) or "no validation queries"
    teacher = info["identity"]["teacher"]
    return f"distilled from {teacher['method']} on {len(info['queries']['train'])} queries ({maps})"
