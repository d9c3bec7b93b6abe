"""Typed dataclass configs on the command line and in YAML presets.

Every field of a stage's dataclass becomes a flag ``--<stage>.<field>`` with the field's help text.
A YAML file holds named presets, each mapping stages to field values:

    default:
      train: {steps: 1500, lr: 0.002}
      unlearn: {step_size: 0.001}

Flags given on the command line override the preset.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import typing
from pathlib import Path
from typing import Any

import torch
import yaml

from common.errors import AttributionError, require_file
from common.files import read_text

# A field's metadata key: the field changes how a stage runs, never what it computes.
NO_EFFECT = "no_effect_on_results"


def no_effect(default: Any, help: str) -> Any:
    """A dataclass field that changes how a stage runs (batch sizes, chunks, compiling, checkpoints, memory), never
    its results: left out of every identity (:func:`identity_settings`), so changing it reuses what was made."""
    return dataclasses.field(default=default, metadata={"help": help, NO_EFFECT: True})


def identity_settings(cfg: Any) -> dict[str, Any]:
    """A config's settings that change results (nested dataclasses included): every field but those made with
    :func:`no_effect`. The one identity of a config's settings, recorded by every cache and run folder."""
    out = {}
    for f in dataclasses.fields(cfg):
        if f.metadata.get(NO_EFFECT):
            continue
        value = getattr(cfg, f.name)
        out[f.name] = identity_settings(value) if dataclasses.is_dataclass(value) else copy.deepcopy(value)
    return out


# Stages of the scripts (the distill stage's: features, net, distill); each registered method adds its own
# (see :func:`method_stages`).
SCRIPT_STAGES = ("model", "train", "eval", "features", "net", "distill")


def method_stages(cls: type) -> dict[str, type]:
    """A method's flag stages: its Config's dataclass fields when it is a bundle of stages
    (unlearning: fisher, loss, unlearn), else the Config itself under the method's name (``clip_text``)."""
    fields = dataclasses.fields(cls.Config)
    hints = typing.get_type_hints(cls.Config)
    if fields and all(dataclasses.is_dataclass(hints[f.name]) for f in fields):
        return {f.name: hints[f.name] for f in fields}
    return {cls.name.replace("-", "_"): cls.Config}


def known_stages() -> set[str]:
    from common.methods import methods

    return set(SCRIPT_STAGES) | {stage for cls in methods().values() for stage in method_stages(cls)}


def add_method_arguments(parser: argparse.ArgumentParser, methods: list[type] | None = None) -> None:
    """``--method NAME`` and every registered method's stage flags (``--fisher.num_samples``, ``--dino.weights``)."""
    from common.methods import methods as registered

    parser.add_argument("--method", default="unlearning", help=f"attribution method: {', '.join(sorted(registered()))}")
    added: set[str] = set()
    for cls in methods or list(registered().values()):
        for stage, config in method_stages(cls).items():
            if stage not in added:
                add_dataclass_arguments(parser, config, stage)
                added.add(stage)


def add_attribution_arguments(parser: argparse.ArgumentParser, config_help: str = "YAML file of presets") -> None:
    """The flags every attribution script shares: output, presets, top-k, device, overwrite, and the methods'."""
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--config", default=None, help=config_help)
    parser.add_argument("--preset", default="default", help="preset name in --config")
    parser.add_argument("--top-k", type=int, default=100, help="images listed in ranking.json")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ... (under accelerate: its device)")
    parser.add_argument("--overwrite", action="store_true", help="replace query folders made under another config")
    parser.add_argument("--tag", default=None, help="the run's folder under --out (default: the method's name)")
    parser.add_argument(
        "--prepare-only",
        action="store_true",
        help="prepare the method (curvature, pretrained losses, features) into its cache and stop: one job per model",
    )
    add_method_arguments(parser)


def method_from_args(args: argparse.Namespace) -> tuple[type, object]:
    """The method class named by ``--method`` and its config built from the flags."""
    from common.methods import get_method

    cls = get_method(args.method)
    return cls, method_config(cls, args)


def method_config(cls: type, args: argparse.Namespace) -> object:
    """``cls.Config`` built from the parsed stage flags of :func:`add_method_arguments`."""
    stages = method_stages(cls)
    if set(stages) == {f.name for f in dataclasses.fields(cls.Config)}:
        return cls.Config(**{stage: dataclass_from_args(c, args, stage) for stage, c in stages.items()})
    ((stage, config),) = stages.items()
    return dataclass_from_args(config, args, stage)


def _is_union(origin: Any) -> bool:
    """Whether a type's origin is a union (``Optional[X]``, ``X | None``)."""
    return origin is typing.Union or str(origin) == "<class 'types.UnionType'>"


def _flag_type(tp: Any) -> dict[str, Any]:
    origin = typing.get_origin(tp)
    if tp is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin is tuple:
        return {"type": typing.get_args(tp)[0], "nargs": "+"}
    if _is_union(origin):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return {"type": inner[0]}
    return {"type": tp}


def conforms(value: Any, tp: Any) -> bool:
    """Whether a preset's ``value`` (as YAML read it) is of a field's type ``tp`` (an int serves a float field)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if _is_union(origin):
        return any(conforms(value, a) for a in args)
    if origin is tuple:
        return isinstance(value, (list, tuple)) and all(conforms(v, args[0]) for v in value)
    if tp is type(None):
        return value is None
    if tp in (int, float) and isinstance(value, str):  # YAML reads 1e-3 as a string; the flag's type converts it
        try:
            tp(value)
        except ValueError:
            return False
        return True
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp) if isinstance(tp, type) else True


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, stage: str) -> None:
    """Add ``--<stage>.<field>`` for every field of ``cls``, defaulting to the dataclass default (the field types are
    kept on the parser, ``parser.field_types``, so a preset's values are checked against them)."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(stage, (cls.__doc__ or "").strip().split("\n")[0])
    types = parser.__dict__.setdefault("field_types", {})
    for f in dataclasses.fields(cls):
        types[f"{stage}.{f.name}"] = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        group.add_argument(
            f"--{stage}.{f.name}",
            dest=f"{stage}.{f.name}",
            default=default,
            help=f"{f.metadata.get('help', '')} (default: {default})",
            **_flag_type(hints[f.name]),
        )


def dataclass_from_args(cls: type, args: argparse.Namespace, stage: str) -> Any:
    """Build ``cls`` from the parsed ``--<stage>.*`` flags (its ``__post_init__`` validates them)."""
    values = {f.name: getattr(args, f"{stage}.{f.name}") for f in dataclasses.fields(cls)}
    return cls(**values)


def read_presets(path: str | Path) -> dict[str, Any]:
    require_file(path, "config file")
    try:
        data = yaml.safe_load(read_text(path, "config file")) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "unreadable"
        raise AttributionError(f"{path} is not valid YAML{where} ({problem})") from None
    if not isinstance(data, dict):
        raise AttributionError(f"{path}: expected a mapping of preset names")
    return data


def load_preset(
    parser: argparse.ArgumentParser, stages: list[str] | None = None, argv: list[str] | None = None
) -> argparse.Namespace:
    """Parse ``argv`` after applying the preset named by ``--preset`` from ``--config`` (if given).

    Args:
        stages: the preset stages this script reads (default: every stage it has flags for).
    """
    first, _ = parser.parse_known_args(argv)
    if getattr(first, "config", None):
        presets = read_presets(first.config)
        if first.preset not in presets:
            raise AttributionError(f"no preset {first.preset!r} in {first.config}; it has {', '.join(presets)}")
        known = set(vars(first))  # every flag's destination holds its default after parsing
        if stages is None:
            stages = sorted({d.split(".")[0] for d in known if "." in d})
        all_stages = known_stages()
        defaults = {}
        for stage, values in (presets[first.preset] or {}).items():
            if stage == "method":
                if "method" in known:
                    defaults["method"] = values
                continue
            if stage not in all_stages:
                raise AttributionError(
                    f"{first.config}: unknown stage {stage!r}; expected one of {', '.join(sorted(all_stages))}"
                )
            if stage not in stages:
                continue  # a preset file serves several scripts; each reads its own stages
            for key, value in (values or {}).items():
                dest = f"{stage}.{key}"
                if dest not in known:
                    raise AttributionError(f"{first.config}: unknown setting {dest}")
                tp = getattr(parser, "field_types", {}).get(dest)
                if tp is not None and not conforms(value, tp):
                    name = getattr(tp, "__name__", str(tp))
                    raise AttributionError(f"{first.config}, preset {first.preset}: {dest} is {value!r}, not {name}")
                defaults[dest] = tuple(value) if isinstance(value, list) else value
        parser.set_defaults(**defaults)
    return parser.parse_args(argv)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else the CPU; anything else is passed to torch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise AttributionError(f"unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AttributionError(f"device {name!r} requested but CUDA is not available")
    return device
