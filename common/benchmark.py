"""What a benchmark gives the library (the benchmark contract), and finding a benchmark by its name.

A benchmark is one file in its own package, ``<package>/benchmark.py``, holding a subclass of :class:`Benchmark`,
and one line in ``pyproject.toml``'s ``[project.entry-points."attribute_by_unlearning.benchmarks"]`` naming it (so a
benchmark in another installed package is found the same way). The driver (:mod:`common.driver`) does the rest: flags,
presets, the accelerator, building the method, the run folders and their outputs, for every registered method.

What a benchmark gives:
- ``add_arguments(parser)``: the flags saying where its model, training set and queries are;
- ``attributions(args, device, method, cfg)``: one :class:`Attribution` per model it attributes (most benchmarks have
  one; Custom Diffusion has one per customized model): the model ready for gradients, its training set, its queries,
  and ``load_model``, which loads another model of the same benchmark by folder or hub id (TRAK's ensemble);
- ``attributed(attribution, folders)`` and ``finish(out, is_main)``: optional, what it measures from the finished
  rankings (Custom Diffusion: the exemplars' retrieval), ``out`` being the run's folder ``OUT/<method or --tag>``;
- ``retraining(args, device, accelerator, recipe)``: for leave-K-out, a :class:`Retraining`: the attribution above,
  the retraining recipe's identity and ``retrain(excluded, folder)``, which trains the model from scratch without the
  excluded images (optional: a benchmark without it refuses leave-K-out in one line);
- ``add_generation_arguments(parser)`` and ``generation(args, device, prompts)``: for the generate stage, the model
  that makes new queries and how it samples (:class:`Generation`);
- ``add_evaluation_arguments(parser)`` and ``evaluate(args, device, method, cfg)``: optional, the benchmark's own
  measure of one method that is not leave-K-out (tiny: self-attribution and the top-10's agreement with the prompt);
- ``add_compare_arguments(parser)`` and ``compare(args)``: optional, every method measured in an output folder side by
  side (a table it writes there and returns);
- ``unavailable``: stage -> why it has no such stage (a benchmark has a stage when it overrides the stage's hook;
  without it the driver refuses in one line, before reading any flag, completed by this reason);
- ``presets``: its YAML presets file, and ``stage_presets``: the preset each stage takes by default.
"""

from __future__ import annotations

import abc
import argparse
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar

from common.data import Query
from common.errors import AttributionError, require
from common.model import DiffusionModel

ENTRY_POINTS = "attribute_by_unlearning.benchmarks"
# stage -> the hook a benchmark overrides to have it; a stage without one (attribute) every benchmark has
STAGE_HOOKS = {"generate": "generation", "evaluate": "evaluate", "leave-k-out": "retraining", "compare": "compare"}


@dataclass
class Attribution:
    """One model and what is attributed against it.

    Args:
        model: the model, ready for per-sample gradients on the run's device.
        data: its training set (the images ranked).
        queries: the generated images to attribute.
        load_model: another model of the same benchmark from a folder or hub id, ready for gradients (TRAK's
            ensemble members).
        cache: the subfolder of ``OUT/cache/<method>/`` of this model's caches ("" when the benchmark has one model).
        folder: the subfolder of ``OUT/<method or --tag>/`` of its query folders ("": the query folders directly).
        info: per query id, what the benchmark's own measures need from it (e.g. how many exemplars it has).
    """

    model: DiffusionModel
    data: Any
    queries: list[Query]
    load_model: Callable[[str], DiffusionModel]
    cache: str = ""
    info: dict[str, dict] = field(default_factory=dict)
    folder: str = ""


@dataclass
class Retraining:
    """What leave-K-out needs from a benchmark.

    Args:
        attribution: the ranked model, its training set and the queries (:class:`Attribution`).
        recipe: the identity of the retraining recipe (settings, architecture, training-set fingerprint, noise): its
            digest names the folder of the retrained models, so models of another recipe are never mixed in.
        retrain: ``(excluded indices, model folder, seed offset) -> model`` trained from scratch without them with
            the recipe and its seed plus the offset (0: the recipe's own seed; LDS trains several), ready for
            gradients; it reuses a finished model in the folder and resumes an interrupted one.
        reference_retrained: θ0 of ΔL and of the regeneration is ``retrain([])`` (the same recipe on every image,
            so only the removal differs), not the ranked model (a released model of another training run).
        identity: what else the metrics depend on (e.g. which model is θ0, the decoder).
    """

    attribution: Attribution
    recipe: dict
    retrain: Callable[[list[int], Path, int], DiffusionModel]
    reference_retrained: bool = False
    identity: dict = field(default_factory=dict)


@dataclass
class Generation:
    """What the generate stage needs from a benchmark: the model and how it samples new queries.

    Args:
        model: the model that generates (ready on the run's device).
        prompts: (prompt, attributes) per query, in query order.
        prefix: query ids are ``<prefix>000``, ``<prefix>001``, ...
    """

    model: DiffusionModel
    prompts: list[tuple[str, dict]]
    prefix: str = "q"


class Benchmark(abc.ABC):
    """A benchmark: where its model, training set and queries come from, and what it measures from the rankings."""

    name: ClassVar[str]
    presets: ClassVar[str]  # its YAML presets file, relative to the repository root (the help of --config names it)
    stage_presets: ClassVar[dict[str, str]] = {}  # stage -> its default preset ("default" for the others)
    guidance_scale: ClassVar[float] = 1.0  # the generate stage's default classifier-free guidance (1: none)
    unavailable: ClassVar[dict[str, str]] = {}  # stage -> why this benchmark has none (completes the one-line refusal)

    def refuse(self, stage: str) -> AttributionError:
        """The one-line error of a stage this benchmark does not have."""
        why = self.unavailable.get(stage)
        return AttributionError(f"the {self.name} benchmark has no {stage} stage" + (f": {why}" if why else ""))

    def offers(self, stage: str) -> bool:
        """Whether this benchmark has ``stage``: it overrides the stage's hook (every benchmark can attribute)."""
        hook = STAGE_HOOKS.get(stage)
        return hook is None or getattr(type(self), hook) is not getattr(Benchmark, hook)

    @abc.abstractmethod
    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Add the flags that say where the model, its training set and the queries are."""

    @abc.abstractmethod
    def attributions(self, args: argparse.Namespace, device, method: type, cfg: Any) -> Iterator[Attribution]:
        """One :class:`Attribution` per model for ``method`` (its class) with settings ``cfg``, each loaded when it is
        reached (one model on the device at a time). Refuse bad input with :func:`~common.errors.require` before
        loading anything."""

    def attributed(self, attribution: Attribution, folders: list[Path]) -> None:  # noqa: B027 (optional)
        """Called with each model's query folders once they hold their rankings (every process)."""

    def finish(self, out: Path, is_main: bool) -> None:  # noqa: B027 (optional)
        """Called once after every model, with the run's output folder ``OUT/<method or --tag>``."""

    def add_retraining_arguments(self, parser: argparse.ArgumentParser) -> None:  # noqa: B027 (optional)
        """Add the flags leave-K-out takes beyond :meth:`add_arguments` (e.g. which model is θ0)."""

    def retraining(self, args: argparse.Namespace, device, accelerator, recipe: Any) -> Retraining:
        """What leave-K-out needs (:class:`Retraining`), ``recipe`` being the ``TrainConfig`` of the flags; checked
        before any ranking or retraining."""
        raise self.refuse("leave-k-out")

    def add_generation_arguments(self, parser: argparse.ArgumentParser) -> None:  # noqa: B027 (optional)
        """Add the flags of the generate stage beyond ``--out``, ``--prompts``, ``--seed``, ``--num-steps``,
        ``--guidance-scale`` and ``--device`` (which model generates, where prompts come from without a file)."""

    def generation(self, args: argparse.Namespace, device, prompts: list[str] | None) -> Generation | None:
        """What the generate stage samples, ``prompts`` being those of ``--prompts`` (None without the flag); None
        when the benchmark wrote the queries itself (e.g. MSCOCO's released ones)."""
        raise self.refuse("generate")

    def add_evaluation_arguments(self, parser: argparse.ArgumentParser) -> None:  # noqa: B027 (optional)
        """Add the flags of the evaluate stage beyond ``--out``, ``--config``, ``--preset``, ``--device``,
        ``--overwrite`` and the methods'."""

    def evaluate(self, args: argparse.Namespace, device, method: type, cfg: Any) -> str:
        """Measure ``method`` with settings ``cfg``: write the report under ``args.out`` and return it as Markdown."""
        raise self.refuse("evaluate")

    def add_compare_arguments(self, parser: argparse.ArgumentParser) -> None:  # noqa: B027 (optional)
        """Add the flags of the compare stage beyond ``--out``."""

    def compare(self, args: argparse.Namespace) -> str:
        """Every method measured under ``args.out`` side by side: written there and returned as Markdown."""
        raise self.refuse("compare")

    def leave_k_out_tables(self, out: Path, table: str) -> str:
        """What leave-K-out prints at its end: by default the table of this output folder."""
        return table


def registered() -> dict[str, str]:
    """Benchmark name -> ``module:Class``, as the installed packages declare them."""
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINTS)}


def get_benchmark(name: str) -> Benchmark:
    """The benchmark registered as ``name``, or named by ``package.module:Class``; an unknown one lists the choices."""
    known = registered()
    spec = known.get(name, name if ":" in name else None)
    if spec is None:
        choices = ", ".join(sorted(known)) or "none (is the package installed? pip install -e .)"
        raise AttributionError(f"unknown benchmark {name!r}: choose from {choices}, or give package.module:Class")
    module, _, attr = spec.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise AttributionError(f"benchmark {name!r}: cannot load {spec} ({err})") from err
    require(isinstance(cls, type) and issubclass(cls, Benchmark), f"{spec} is not a Benchmark subclass")
    return cls()
