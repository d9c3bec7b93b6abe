"""The AbC benchmark's task lists and ground truth, read as the authors' files lay them out.

Two kinds of JSON (``sywang/GenDataAttribution`` on the Hugging Face Hub, extracted into a data folder):

- the benchmark's ``json/test_<case>.json``: a list with one entry per Custom Diffusion model,
  ``{"exemplar": [paths], "synth": {type: [paths]}, "class_id": ..., "category": ...}``; the exemplars
  are the ground truth of every image the model synthesized. Paths start with ``dataset/``, which the
  authors replace by the data folder;
- a task list (the unlearning release's ``tasks/all_tasks.json``: 400 queries from 20 models), one
  query per entry: ``synth_image_path``, ``prompt`` (what generated it, with the new token),
  ``test_case`` (names the benchmark JSON), ``test_case_ind`` (the model's entry in it),
  ``model_path`` (the Custom Diffusion folder), ``train_prompt`` (the exemplars' text condition)
  and ``category``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.errors import AttributionError, require
from common.files import read_json
from custom_diffusion.model import CUSTOM_WEIGHTS, TOKEN_FILE

TASK_FIELDS = ("synth_image_path", "prompt", "test_case", "test_case_ind", "model_path", "train_prompt", "category")
TEST_CASES = ("test_observed_imagenet", "test_unobserved_imagenet", "test_bamfg", "test_artchive")
# The paper's split of the four test cases into the two concept kinds of its Figure 6.
KIND = {
    "test_observed_imagenet": "object",
    "test_unobserved_imagenet": "object",
    "test_bamfg": "style",
    "test_artchive": "style",
}


@dataclass(frozen=True)
class Task:
    """One query of the benchmark: a synthesized image and where its model and exemplars are."""

    id: str  # the synthesized image's path without its extension, '/' replaced by '_'
    image: Path
    prompt: str
    test_case: str
    model_dir: Path
    train_prompt: str
    category: str
    exemplars: tuple[Path, ...]

    @property
    def kind(self) -> str:
        return KIND[self.test_case]


def benchmark_entry(root: Path, test_case: str, index: int) -> dict:
    """Entry ``index`` of ``json/<test_case>.json``, its fields checked."""
    require(test_case in TEST_CASES, f"unknown test case {test_case!r}; choose from {', '.join(TEST_CASES)}")
    path = root / "json" / f"{test_case}.json"
    entries = read_json(path, f"benchmark file of {test_case}")
    require(isinstance(entries, list), f"{path} should hold a list of models")
    require(0 <= index < len(entries), f"{path} has {len(entries)} models; no entry {index}")
    entry = entries[index]
    require(
        isinstance(entry, dict) and isinstance(entry.get("exemplar"), list) and entry["exemplar"],
        f"{path} entry {index} has no exemplar list",
    )
    return entry


def local_path(root: Path, released: str) -> Path:
    """A path as the benchmark JSON writes it (``dataset/...``) inside the data folder."""
    parts = Path(released).parts
    return root.joinpath(*(parts[1:] if parts and parts[0] == "dataset" else parts))


def load_tasks(task_file: str | Path, root: str | Path, check_files: bool = True) -> list[Task]:
    """The queries of a task list, each with its exemplars resolved; one line for the first problem.

    Args:
        task_file: the task list (a JSON list of entries with :data:`TASK_FIELDS`).
        root: the data folder holding ``json/``, ``synth/``, ``exemplar/`` and ``models/``.
        check_files: require the image, the model's two files and every exemplar to exist.
    """
    task_file, root = Path(task_file), Path(root)
    entries = read_json(task_file, "task list")
    require(isinstance(entries, list) and entries, f"{task_file} should hold a non-empty list of tasks")
    tasks, seen = [], set()
    for i, entry in enumerate(entries):
        where = f"{task_file} task {i}"
        require(isinstance(entry, dict), f"{where} is not an object")
        missing = [f for f in TASK_FIELDS if f not in entry]
        require(not missing, f"{where} lacks {', '.join(missing)}")
        texts = ("synth_image_path", "prompt", "test_case", "model_path", "train_prompt")
        wrong = [f for f in texts if not isinstance(entry[f], str)]
        require(not wrong, f"{where}: {', '.join(wrong)} should be text")
        require(
            isinstance(entry["test_case_ind"], int) and not isinstance(entry["test_case_ind"], bool),
            f"{where}: test_case_ind should be an integer, got {entry['test_case_ind']!r}",
        )
        require("<new1>" in entry["train_prompt"], f"{where}: train_prompt {entry['train_prompt']!r} lacks <new1>")
        bench = benchmark_entry(root, entry["test_case"], entry["test_case_ind"])
        model_dir = root / entry["model_path"]
        require(
            Path(model_dir).name == str(bench.get("class_id", Path(model_dir).name)),
            f"{where}: model {entry['model_path']} is not entry {entry['test_case_ind']} of {entry['test_case']} "
            f"({bench.get('class_id')})",
        )
        task_id = str(Path(entry["synth_image_path"]).with_suffix("")).replace("/", "_")
        require(task_id not in seen, f"{where} repeats {entry['synth_image_path']}")
        seen.add(task_id)
        task = Task(
            id=task_id,
            image=root / entry["synth_image_path"],
            prompt=entry["prompt"],
            test_case=entry["test_case"],
            model_dir=model_dir,
            train_prompt=entry["train_prompt"],
            category=str(entry["category"]),
            exemplars=tuple(local_path(root, p) for p in bench["exemplar"]),
        )
        if check_files:
            check_task_files(task, where)
        tasks.append(task)
    return tasks


def check_task_files(task: Task, where: str) -> None:
    require(task.image.is_file(), f"{where}: missing synthesized image {task.image}")
    require(task.model_dir.is_dir(), f"{where}: missing model folder {task.model_dir}")
    for name in (CUSTOM_WEIGHTS, TOKEN_FILE):
        require((task.model_dir / name).is_file(), f"{where}: model folder {task.model_dir} lacks {name}")
    absent = [str(p) for p in task.exemplars if not p.is_file()]
    if absent:
        raise AttributionError(f"{where}: {len(absent)} exemplar(s) missing, e.g. {absent[0]}")
