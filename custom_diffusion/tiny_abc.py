"""The CPU twin of AbC: concepts the tiny model never saw, taught by Custom Diffusion, attributed with known answers.

    python -m custom_diffusion.tiny_abc prepare --base MODEL --data DATA --out OUT [--concepts YAML]
    python -m common.driver tiny_abc attribute --base MODEL --data DATA --out OUT --method NAME \\
        [--config tiny/configs/tiny.yaml --preset leave_k_out] [--split report] [--tag NAME]

``prepare`` takes each concept of the concepts file (custom_diffusion/configs/tiny_concepts.yaml):
renders its exemplars (``OUT/concepts/<name>/``: images and metadata.jsonl), fine-tunes the base model
on them Custom-Diffusion-style (``OUT/models/<name>/``: the release's two files and finetune.json)
and generates its queries (``OUT/queries/<name>/<name>-q000/``...); ``OUT/concepts.png`` shows them side
by side. The driver's attribute stage (the ``tiny_abc`` benchmark, :class:`TinyAbc`) ranks each query's training
set, the concept's exemplars (first, under the training prompt) then the pretraining set, with one registered
method, as the abc benchmark does for Stable Diffusion: the unlearning method's curvature
(``--unlearn.preconditioner``) is the base model's on the ranked pretraining images (fitted once per weight
selection, ``OUT/cache/base-pool<N>-<selection>/``), as AbC uses SD v1.4's, or with ``--curvature custom`` each
customized model's own on its ranked set. Runs that differ only in the unlearning step (a tuning grid) share one
cache folder, ``OUT/cache/<method>/<curvature>-<hash>/``: the curvature and pretrained losses are fitted once.
Outputs: ``OUT/<tag>/<concept>/<query>/`` (the usual run outputs), ``OUT/<tag>/retrieval.json`` (Recall@K and AP per
query) and ``retrieval.md`` (per concept, per kind); ``python -m common.driver tiny_abc compare --out OUT`` puts the
methods side by side. Every step resumes.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from enum import IntEnum
from functools import partial
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from common import keyed_random
from common.benchmark import Attribution
from common.config import resolve_device
from common.data import ArrayTrainingSet, ConcatTrainingSet
from common.errors import AttributionError, cli, first_line, require, require_file
from common.files import read_json, write_json
from common.fingerprints import settings_digest
from common.queries import generate_queries, load_queries
from custom_diffusion.benchmark import Abc
from custom_diffusion.compare import KINDS
from custom_diffusion.finetune import FinetuneConfig, finetune, regularisation_indices
from custom_diffusion.model import CUSTOM_WEIGHTS, apply_custom, save_custom
from tiny import shapes
from tiny.data import ImageFolder, load_image_folder
from tiny.model import TinyTextToImage
from tiny.pipeline import load_run, set_threads, training_set

CONCEPTS = Path(__file__).parent / "configs" / "tiny_concepts.yaml"
SPLITS = ("tune", "report")


@dataclass(frozen=True)
class Concept:
    """One replicate of a concept to teach: what its exemplars look like, which prompts name it, and the seed of
    its fine-tuning and queries (the exemplars are the concept's, the same for every seed)."""

    name: str
    kind: str
    shape: str | None
    style: str
    exemplars: int
    split: str
    train_prompt: str
    query_template: str
    seed: int = 0

    @property
    def unit(self) -> str:
        """The replicate's folder name under models/, queries/ and each method's outputs ("ring-s0")."""
        return f"{self.name}-s{self.seed}"


def load_concepts(path: str | Path = CONCEPTS) -> tuple[list[Concept], dict]:
    """Every replicate of every concept (concept by concept, then seed by seed) and the file's settings (finetune,
    queries); one line for the first bad entry."""
    require_file(path, "concepts file")
    try:
        spec = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as err:
        raise AttributionError(f"{path} is not valid YAML ({first_line(err)})") from None
    require(isinstance(spec.get("concepts"), list) and spec["concepts"], f"{path} lists no concepts")
    require(
        isinstance(spec.get("pool"), int) and spec["pool"] >= 1,
        f"{path} needs pool: N, the pretraining images ranked (the first N; regularisation images come from the rest)",
    )
    seeds = spec.get("seeds", [0])
    require(
        isinstance(seeds, list) and seeds and all(isinstance(s, int) and s >= 0 for s in seeds)
        and len(set(seeds)) == len(seeds),
        f"{path}: seeds must be a list of distinct non-negative integers (one fine-tuning and query set each)",
    )  # fmt: skip
    prompts = spec.get("prompts", {})
    token = str((spec.get("finetune") or {}).get("token", "<new1>"))
    out, seen = [], set()
    for i, entry in enumerate(spec["concepts"]):
        where = f"{path} concept {i}"
        require(isinstance(entry, dict) and "name" in entry, f"{where} has no name")
        name, kind = str(entry["name"]), entry.get("kind")
        require(name not in seen and "/" not in name, f"{where}: repeated or bad name {name!r}")
        require(kind in KINDS, f"{where} ({name}): kind must be one of {', '.join(KINDS)}, not {kind!r}")
        shape, style = entry.get("shape"), entry.get("style", "solid")
        require(
            shape is None or shape in shapes.SHAPES + shapes.NEW_SHAPES, f"{where} ({name}): unknown shape {shape!r}"
        )
        require(style in shapes.STYLES, f"{where} ({name}): unknown style {style!r}")
        require(kind == "style" or shape is not None, f"{where} ({name}): an object concept needs a shape")
        count = entry.get("exemplars")
        require(isinstance(count, int) and count >= 1, f"{where} ({name}): exemplars must be a positive count")
        require(entry.get("split") in SPLITS, f"{where} ({name}): split must be tune or report")
        texts = prompts.get(kind, {})
        require(token in texts.get("train", "") and token in texts.get("query", ""),
                f"{path}: prompts.{kind} needs train and query prompts with {token}")  # fmt: skip
        require(token not in texts.get("neutral", ""), f"{path}: prompts.{kind}.neutral (the image-only control's "
                                                       f"prompt) must not hold {token}")  # fmt: skip
        seen.add(name)
        concept = Concept(name, kind, shape, style, count, entry["split"], texts["train"], texts["query"])
        out += [replace(concept, seed=s) for s in seeds]
    return out, spec


class ConceptDraw(IntEnum):
    """What a concept's seed is for (its own small set of purposes: these seeds key whole generators, by name)."""

    EXEMPLARS = 0  # the same for every replicate of a concept
    QUERIES = 1
    FINETUNE = 2


def concept_seed(concept: Concept, seed: int, purpose: ConceptDraw) -> int:
    """A seed keyed by the concept's name and ``purpose``; the queries and the fine-tuning also by the replicate's
    seed, the exemplars not."""
    replicate = () if purpose == ConceptDraw.EXEMPLARS else (concept.seed,)
    return keyed_random.key_seed(seed, purpose, *replicate, *concept.name.encode())


def render_exemplars(concept: Concept, folder: Path, resolution: int, seed: int = 0) -> None:
    """The concept's exemplars as an image folder; each captioned by the training prompt, its slots filled."""
    rng = np.random.default_rng(concept_seed(concept, seed, ConceptDraw.EXEMPLARS))
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(concept.exemplars):
        spec = shapes.sample_spec(rng)
        spec = replace(spec, shape=concept.shape or spec.shape)
        name = f"images/{i:02d}.png"
        Image.fromarray(shapes.render(spec, resolution, style=concept.style)).save(folder / name)
        attrs = spec.attributes() | {"style": concept.style}
        lines.append({"file_name": name, "text": concept.train_prompt.format(**attrs), "attributes": attrs})
    with open(folder / "metadata.jsonl", "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)


def query_prompts(concept: Concept, count: int, seed: int) -> list[tuple[str, dict]]:
    """``count`` prompts from the concept's template, slots drawn from the shapes grammar (seeded)."""
    rng = np.random.default_rng(concept_seed(concept, seed, ConceptDraw.QUERIES))
    out = []
    for _ in range(count):
        attrs = shapes.sample_spec(rng).attributes()
        out.append((concept.query_template.format(**attrs), attrs | {"concept": concept.name, "kind": concept.kind}))
    return out


def query_prefix(concept: Concept) -> str:
    """Query ids name their concept and seed ("ring-s0-q000"): ids key the sampling noise and every method's draws,
    which must differ between replicates."""
    return f"{concept.unit}-q"


def prepare(
    base: Path, data_dir: Path, out: Path, concepts: list[Concept], spec: dict, device: str, tables: bool = True
) -> None:
    """Exemplars, the Custom Diffusion model and the queries of every concept not done yet; ``OUT/models.md`` unless
    ``tables`` is false (a shard's partial list would replace the full one)."""
    ft, qs = spec.get("finetune", {}), spec.get("queries", {})
    pool = spec["pool"]
    pretraining = None
    for concept in concepts:
        folder = out / "concepts" / concept.name
        model_dir, query_dir = (out / sub / concept.unit for sub in ("models", "queries"))
        if (query_dir / f"{query_prefix(concept)}{qs.get('per_concept', 5) - 1:03d}" / "query.json").exists():
            check_prepared(concept, model_dir, pool)
            print(f"{concept.unit}: ready")
            continue
        model = TinyTextToImage.load(base)
        if not (model_dir / CUSTOM_WEIGHTS).exists():
            t0 = time.time()
            if not (folder / "metadata.jsonl").exists():  # the concept's, shared by its seeds
                render_exemplars(concept, folder, model.cfg.resolution, int(ft.get("seed", 0)))
            if pretraining is None:
                pretraining = load_run(base, data_dir, "cpu").data
                require(pool < len(pretraining), f"pool: {pool} leaves no regularisation images among the "
                                                 f"{len(pretraining)} pretraining images")  # fmt: skip
            images = load_image_folder(folder, model.cfg.resolution)
            exemplars = ArrayTrainingSet(images.pixels, torch.zeros(len(images), 1, 1))  # prompts are given apart
            cfg = FinetuneConfig(**(ft | {"seed": concept_seed(concept, int(ft.get("seed", 0)), ConceptDraw.FINETUNE)}))
            model.to(resolve_device(device))
            outside = pretraining.subset(range(pool, len(pretraining)))  # never among the ranked images
            summary = finetune(model, exemplars, [c[0] for c in images.captions], outside, cfg)
            save_custom(model, model_dir, cfg.selection)
            regular = (regularisation_indices(len(outside), cfg) + pool).tolist()
            moved = relative_change(TinyTextToImage.load(base).unet, model.unet)
            write_json(model_dir / "finetune.json", summary | {"concept": asdict(concept), "base": str(base),
                       "pool": pool, "regularisation_images": regular, "relative_change": moved})  # fmt: skip
            print(f"{concept.unit}: fine-tuned in {time.time() - t0:.0f} s, loss "
                  f"{summary['first_loss']:.4f} -> {summary['final_loss']:.4f}, weights moved "
                  f"{moved['all']:.1%} (K/V {moved['cross-attn-kv']:.1%})")  # fmt: skip
        check_prepared(concept, model_dir, pool)
        model = apply_custom(TinyTextToImage.load(base), model_dir).to(resolve_device(device))
        prompts = query_prompts(concept, int(qs.get("per_concept", 5)), int(qs.get("seed", 0)))
        generate_queries(
            model,
            prompts,
            query_dir,
            int(qs.get("seed", 0)),
            num_steps=int(qs.get("num_steps", 250)),
            prefix=query_prefix(concept),
            guidance_scale=float(qs.get("guidance_scale", 3.0)),
            overwrite=True,
        )  # fmt: skip  (an interrupted generation: the same queries again)
        print(f"{concept.unit}: {len(prompts)} queries")
    if tables:
        (out / "models.md").write_text(models_table(out, concepts))


def replicates(spec: str | None, concepts: list[Concept]) -> list[Concept]:
    """The replicates whose seed is listed in ``spec`` ("0,2"; all when None)."""
    if spec is None:
        return concepts
    parts = [p.strip() for p in spec.split(",")]
    require(all(p.isdigit() for p in parts), f"--seeds {spec}: expected comma-separated seeds, e.g. 0,1")
    wanted = set(map(int, parts))
    known = {c.seed for c in concepts}
    require(wanted <= known, f"--seeds {spec}: the concepts file has seeds {sorted(known)}")
    return [c for c in concepts if c.seed in wanted]


def shard(spec: str | None, concepts: list[Concept]) -> list[Concept]:
    """The replicates of every N-th concept from the I-th, for ``--shard I/N`` (all of them when ``spec`` is None;
    none when fewer than I + 1 concepts are chosen)."""
    if spec is None:
        return concepts
    parts = spec.split("/")
    ok = len(parts) == 2 and all(p.isdigit() for p in parts) and int(parts[0]) < int(parts[1])
    require(ok, f"--shard {spec}: expected I/N with 0 <= I < N, e.g. 0/2")
    index, count = map(int, parts)
    names = list(dict.fromkeys(c.name for c in concepts))
    mine = set(names[index::count])  # none when there are fewer concepts than shards: that shard has nothing to do
    return [c for c in concepts if c.name in mine]


def relative_change(base: torch.nn.Module, tuned: torch.nn.Module) -> dict[str, float]:
    """How far fine-tuning moved the UNet: ||θ − θ₀|| / ||θ₀|| over all weights and over each weight subset the
    unlearning step can update (a Fisher fitted at θ₀ describes θ only when this is small)."""
    from common.diffusion.selection import select_parameters

    before, after = dict(base.named_parameters()), dict(tuned.named_parameters())
    out = {}
    for selection in ("all", "attn", "cross-attn-kv"):
        names = select_parameters(tuned, selection)
        moved = sum(float((after[n].detach().cpu() - before[n].detach()).double().square().sum()) for n in names)
        size = sum(float(before[n].detach().double().square().sum()) for n in names)
        out[selection] = (moved / size) ** 0.5
    return out


def models_table(out: Path, concepts: list[Concept]) -> str:
    """``OUT/models.md``: each customized model's fine-tuning loss and how far its weights moved."""
    lines = ["| model | kind | exemplars | loss, first → last 10% | moved: all | attention | K/V |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for c in concepts:
        path = out / "models" / c.unit / "finetune.json"
        if not path.exists():
            continue
        info = read_json(path, "fine-tuning record")
        moved = info.get("relative_change", {})
        cells = [f"{moved[k]:.1%}" if k in moved else "–" for k in ("all", "attn", "cross-attn-kv")]
        lines.append(f"| {c.unit} | {c.kind} | {c.exemplars} | {info['first_loss']:.4f} → {info['final_loss']:.4f} | "
                     + " | ".join(cells) + " |")  # fmt: skip
    return "\n".join(lines) + "\n"


def concept_images(out: Path, concept: Concept) -> tuple[list[Path], list[Path]]:
    """The image files of the concept's exemplars and of this replicate's queries."""
    exemplars = sorted((out / "concepts" / concept.name).glob("images/*.png"))
    return exemplars, sorted((out / "queries" / concept.unit).glob("*/image.png"))


def concept_sheet(out: Path, concepts: list[Concept]) -> Path:
    """``OUT/concepts.png``: per concept, its exemplars then its generated queries, to see what each model learnt."""
    from common.plots import plot_image_rows

    def read(path: Path) -> np.ndarray:
        return np.asarray(Image.open(path).convert("RGB"))

    rows = []
    for c in concepts:
        exemplars, queries = concept_images(out, c)
        images = [(f"exemplar {i}", read(p)) for i, p in enumerate(exemplars)]
        rows.append((f"{c.unit} ({c.kind})", images + [(f"query {i}", read(p)) for i, p in enumerate(queries)]))
    plot_image_rows(out / "concepts.png", rows, "exemplars, then the customized model's queries")
    return out / "concepts.png"


def check_prepared(concept: Concept, model_dir: Path, pool: int) -> None:
    """Refuse a concept whose entry or ranked pool changed since its model was fine-tuned (its outputs would mix,
    or regularisation images would be ranked)."""
    info = read_json(model_dir / "finetune.json", "fine-tuning record")
    redo = "remove its folders under concepts/, models/ and queries/ to prepare it again"
    require(
        info.get("concept") == asdict(concept), f"concept {concept.name} changed since {model_dir} was made: {redo}"
    )
    require(
        info.get("pool") == pool,
        f"{model_dir} was fine-tuned with regularisation images outside a pool of {info.get('pool')}, not {pool}: "
        f"{redo}",
    )


def concept_training_set(model: TinyTextToImage, folder: Path, pretraining_folder) -> tuple[ConcatTrainingSet, int]:
    """The concept's exemplars under their training prompt (the customized text encoder), then the pretraining set;
    and the number of exemplars (read from the folder: what the model was fine-tuned on)."""
    exemplars = load_image_folder(folder, model.cfg.resolution)
    return ConcatTrainingSet([training_set(model, exemplars), training_set(model, pretraining_folder)]), len(exemplars)


def swapped_images(queries: list, out: Path, concepts: list[Concept], concept: Concept) -> list:
    """The prompt-only control: ``queries`` (of ``concept``) with the images of the same-numbered queries of the
    next concept in the file with the same seed; ids, prompts and text conditions kept. A method whose AP stays up
    on these ranks by the prompt (the new token), not by what the image shows."""
    names = list(dict.fromkeys(c.name for c in concepts))
    donor_name = names[(names.index(concept.name) + 1) % len(names)]
    (donor,) = [c for c in concepts if c.name == donor_name and c.seed == concept.seed]
    folder = out / "queries" / donor.unit
    require(folder.is_dir(), f"--swap-images: {concept.unit} takes {donor.unit}'s images, which is not prepared")
    images = load_queries(folder)
    require(len(images) >= len(queries), f"--swap-images: {donor.unit} has fewer queries than {concept.unit}")
    return [replace(q, image=d.image, image_path=d.image_path) for q, d in zip(queries, images)]


def without_token(queries: list, model: TinyTextToImage, spec: dict) -> list:
    """The image-only control: ``queries`` under a prompt that names nothing only the exemplars' captions hold, with
    the text condition the customized model gives it; ids and images kept. The prompt is the kind's ``neutral``
    template of the concepts file filled with the query's slots (for styles, which drops "in <new1> style": no
    pretraining caption has the phrase), else the query's prompt with the new token replaced by the word its
    embedding started from (``finetune.init_word``). A method that keeps its AP here finds the exemplars from the
    image; one that falls ranked by the prompt."""
    recipe = FinetuneConfig(**(spec.get("finetune") or {}))
    prompts = []
    for q in queries:
        attrs = q.extra.get("attributes", {})
        template = (spec.get("prompts") or {}).get(attrs.get("kind"), {}).get("neutral")
        try:
            prompt = template.format(**attrs) if template else q.prompt.replace(recipe.token, recipe.init_word)
        except KeyError as err:
            raise AttributionError(f"--without-token: {q.id} has no slot {err} of the neutral prompt") from None
        require(recipe.token not in prompt, f"--without-token: the neutral prompt of {q.id} holds {recipe.token}")
        require(prompt != q.prompt, f"--without-token: the prompt of {q.id} has no {recipe.token}")
        prompts.append(prompt)
    with torch.no_grad():
        text = model.encode_text(prompts)
    return [replace(q, prompt=p, text=t[None]) for q, p, t in zip(queries, prompts, text)]


def base_curvature(base: Path, data_dir: Path, out: Path, cfg, kind: str, pool: int, device: str) -> Path:
    """The base model's curvature (``kind``) on the ranked pretraining images, fitted once (AbC uses SD v1.4's
    Fisher for every model): the file or folder to pass as ``fisher.file``. Shards side by side take turns: the
    first fits it, the others wait and read it."""
    import fcntl

    from common.unlearning.curvature import CACHE_NAMES, load_curvature

    folder = out / "cache" / f"base-pool{pool}-{cfg.selection}"  # one per ranked set and weights
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f".{kind}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        run = load_run(base, data_dir, device)
        load_curvature(kind, run.model, run.data.subset(range(min(pool, len(run.data)))), cfg, folder)
    return folder / CACHE_NAMES[kind]


def cache_name(cfg, curvature: str) -> str:
    """The cache folder of a method's settings (under ``OUT/cache/<method>/``), all but the unlearning step's own
    (step size, steps, draws): a tuning grid fits the curvature and pretrained losses once. Every cached file still
    checks its identity."""
    settings = asdict(cfg)
    name = ""
    if "unlearn" in settings:
        settings["unlearn"] = {"preconditioner": settings["unlearn"]["preconditioner"]}
        name = f"{curvature}-"
    return f"{name}{settings_digest(settings, length=8, default=str)}"


def first_images(folder: ImageFolder, count: int | None) -> ImageFolder:
    """The first ``count`` images of ``folder`` (all when None)."""
    if count is None:
        return folder
    require(1 <= count <= len(folder), f"--pool {count}: the pretraining folder has {len(folder)} images")
    attributes = folder.attributes[:count] if folder.attributes is not None else None
    return ImageFolder(folder.root, folder.pixels[:count], folder.captions[:count], folder.paths[:count], attributes)


SHOWS_T = 200  # the timestep (of 1,000) of the features that decide whether a query shows its concept


def shows_rule(t: int) -> str:
    return (f"a query shows its concept when its nearest neighbour among the exemplars and the ranked pretraining "
            f"images, by cosine of the base model's denoiser features (the UNet's mid-block output at t = {t} on one "
            f"shared noise draw, the empty prompt; both flips of every image), is an exemplar")  # fmt: skip


@torch.no_grad()
def denoiser_features(model: TinyTextToImage, images: torch.Tensor, t: int, batch_size: int = 256) -> torch.Tensor:
    """Unit rows (N, F): the UNet's mid-block output for each image (N,C,H,W) noised to ``t`` by one shared draw,
    under the empty prompt; text-free, so it sees what the image shows, not what a prompt says."""
    unet = model.unet.eval()
    noise = torch.randn(model.input_shape, generator=torch.Generator().manual_seed(0))
    alpha = model.alphas_cumprod[t]
    caught: list[torch.Tensor] = []
    hook = unet.mid_block.register_forward_hook(lambda _m, _i, out: caught.append(out.flatten(1).double()))
    try:
        for start in range(0, len(images), batch_size):
            x = images[start : start + batch_size].to(model.device, model.dtype)
            x_t = alpha.sqrt() * x + (1 - alpha).sqrt() * noise.to(x)
            text = model.null_text().to(x)[None].expand(len(x), -1, -1)
            unet(x_t, torch.full((len(x),), t, device=x.device), encoder_hidden_states=text, return_dict=False)
    finally:
        hook.remove()
    rows = torch.cat(caught).cpu()
    return rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)


def with_flips(images: torch.Tensor) -> torch.Tensor:
    """Each image (N,C,H,W) then its horizontal flip: (2N,C,H,W), image i's flip at N + i."""
    return torch.cat([images, images.flip(-1)])


def shows(base: Path, data_dir: Path, out: Path, concepts: list[Concept], pool: int, t: int = SHOWS_T) -> dict:
    """``OUT/shows.json``: per query whether it shows its concept by :func:`shows_rule`, with its best cosine to an
    exemplar and to a pool image; rewritten whole for the concepts given, others kept."""
    model = TinyTextToImage.load(base)
    model.check_timesteps(t + 1, "the shows rule's timestep")
    pretraining = first_images(load_image_folder(data_dir, model.cfg.resolution), pool)
    pool_feats = denoiser_features(model, with_flips(pretraining.pixels), t)
    path = out / "shows.json"
    found = json.loads(path.read_text()) if path.exists() else {}
    for concept in concepts:
        exemplars = load_image_folder(out / "concepts" / concept.name, model.cfg.resolution).pixels
        ex_feats = denoiser_features(model, with_flips(exemplars), t)
        for query in load_queries(out / "queries" / concept.unit):
            q = denoiser_features(model, query.image[None], t)[0]
            best_ex, best_pool = float((ex_feats @ q).max()), float((pool_feats @ q).max())
            found[query.id] = {"shows": best_ex > best_pool, "exemplar": best_ex, "pool": best_pool,
                               "concept": concept.name, "kind": concept.kind}  # fmt: skip
    found["_rule"] = {"text": shows_rule(t), "t": t, "pool": pool}
    write_json(path, found)
    return found


def add_twin_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every step of the twin takes: the base model, the concepts and which of them."""
    parser.add_argument("--base", required=True, help="the tiny pretrained model folder")
    parser.add_argument("--data", required=True, help="its training images (image folder)")
    parser.add_argument("--concepts", default=str(CONCEPTS), help="concepts file (YAML)")
    parser.add_argument("--split", choices=["all", *SPLITS], default="all", help="which concepts")
    parser.add_argument(
        "--seeds", default=None, help="only these replicates, comma-separated (e.g. 0 for a quick tuning grid)"
    )
    parser.add_argument(
        "--shard",
        default=None,
        metavar="I/N",
        help="only every N-th concept from the I-th (0-based; all seeds of a concept together), for side-by-side "
        "processes on one OUT: the tables are written by a run without --shard, which skips what the shards did",
    )
    parser.add_argument(
        "--pool", type=int, default=None, help="pretraining images ranked: the first N (the file's pool)"
    )


def chosen_concepts(args: argparse.Namespace) -> tuple[list[Concept], list[Concept], dict]:
    """Every concept of the file, those this run takes (``--split``, ``--seeds``, ``--shard``), and the file."""
    concepts, spec = load_concepts(args.concepts)
    chosen = shard(args.shard, replicates(args.seeds, [c for c in concepts if args.split in ("all", c.split)]))
    return concepts, chosen, spec


def ranked_pool(args: argparse.Namespace, spec: dict) -> int:
    pool = args.pool or spec["pool"]
    require(pool <= spec["pool"], f"--pool {pool}: the regularisation images start at image {spec['pool']} "
                                  f"({args.concepts}); ranking them would count them as negatives")  # fmt: skip
    return pool


class TinyAbc(Abc):
    """The twin as a benchmark of the driver: one attribution per customized tiny model, its exemplars (first, under
    the training prompt) then the pretraining pool ranked, each query's retrieval of its exemplars measured."""

    name = "tiny_abc"
    presets = "tiny/configs/tiny.yaml"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_twin_arguments(parser)
        parser.add_argument(
            "--curvature",
            choices=["base", "custom"],
            default="base",
            help="unlearning's curvature: the base model's on the ranked pool (as AbC), or each customized model's "
            "own on its ranked set",
        )
        parser.add_argument(
            "--swap-images",
            action="store_true",
            help="the prompt-only control: each query keeps its prompt but takes the image of the same-numbered "
            "query of the next concept (same seed); needs --tag, so its results never mix with the method's own",
        )
        parser.add_argument(
            "--without-token",
            action="store_true",
            help="the image-only control: each query keeps its image but is attributed under its kind's neutral "
            "prompt (the concepts file's prompts.KIND.neutral, else the new token replaced by finetune.init_word); "
            "needs --tag",
        )

    def attributions(self, args: argparse.Namespace, device, method: type, cfg) -> Iterator[Attribution]:
        set_threads()
        concepts, chosen, spec = chosen_concepts(args)
        self.names, self.sharded = list(dict.fromkeys(c.name for c in concepts)), args.shard is not None
        if not chosen and self.sharded:
            print(f"shard {args.shard}: no concept left for it ({args.split})")
        pool = ranked_pool(args, spec)
        for flag, used in (("--swap-images", args.swap_images), ("--without-token", args.without_token)):
            require(not used or bool(args.tag), f"{flag} needs --tag (its own output folder)")
        base, data_dir, out = Path(args.base), Path(args.data), Path(args.out)
        fisher = getattr(cfg, "fisher", None)
        if fisher is not None and not fisher.file and cfg.unlearn.method == "newton" and args.curvature == "base":
            kind = cfg.unlearn.preconditioner
            cfg.fisher.file = str(base_curvature(base, data_dir, out, fisher, kind, pool, args.device))
        cache = cache_name(cfg, args.curvature)
        pretraining_folder = first_images(load_image_folder(data_dir, TinyTextToImage.load(base).cfg.resolution), pool)
        for concept in chosen:
            model_dir = out / "models" / concept.unit
            require(
                (model_dir / CUSTOM_WEIGHTS).exists(), f"{concept.unit} is not prepared: run the prepare step first"
            )
            model = apply_custom(TinyTextToImage.load(base), model_dir)
            check_prepared(concept, model_dir, spec["pool"])
            data, num_exemplars = concept_training_set(model, out / "concepts" / concept.name, pretraining_folder)
            queries = load_queries(out / "queries" / concept.unit)
            if args.swap_images:
                queries = swapped_images(queries, out, concepts, concept)
            if args.without_token:
                queries = without_token(queries, model, spec)
            fields = {"exemplars": num_exemplars, "concept": concept.name, "seed": concept.seed, "kind": concept.kind}
            member = partial(ensemble_member, model_dir=model_dir, device=device)
            yield Attribution(model.prepare_for_gradients(device), data, queries, member, f"{cache}/{concept.unit}",
                              {q.id: fields for q in queries}, concept.unit)  # fmt: skip

    def table_groups(self) -> list[tuple[str, Sequence[str]]]:
        return [("concept", self.names), ("kind", KINDS)]

    def finish(self, out: Path, is_main: bool) -> None:
        if self.sharded:  # a shard's rows would replace the full table: the run without --shard writes it
            print("shard done (tables: run without --shard)")
        else:
            super().finish(out, is_main)


def ensemble_member(source: str, model_dir: Path, device) -> TinyTextToImage:
    """A TRAK ensemble member (``--trak.ensemble``): another tiny base model customized by ``model_dir``."""
    return apply_custom(TinyTextToImage.load(source), model_dir).prepare_for_gradients(device)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "step",
        choices=["prepare", "shows"],
        help="what to do (shows: which queries show their concept, OUT/shows.json)",
    )
    add_twin_arguments(parser)
    parser.add_argument("--out", required=True, help="the twin's folder")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    return parser


@cli
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    set_threads()
    _, chosen, spec = chosen_concepts(args)
    base, data_dir, out = Path(args.base), Path(args.data), Path(args.out)
    if not chosen and args.shard is not None:
        print(f"shard {args.shard}: no concept left for it ({args.split})")
        return
    if args.step == "prepare":
        prepare(base, data_dir, out, chosen, spec, args.device, tables=args.shard is None)
        if args.shard is None:
            print(f"exemplars and queries in {concept_sheet(out, chosen)}")
        return
    pool = ranked_pool(args, spec)
    require(args.shard is None, "--shard: the shows step is one pass over every query (a minute); run it whole")
    found = shows(base, data_dir, out, chosen, pool)
    ids = [q for c in chosen for q in found if found[q].get("concept") == c.name and q.startswith(c.unit + "-")]
    print(f"{sum(found[q]['shows'] for q in ids)} of {len(ids)} queries show their concept ({shows_rule(SHOWS_T)})")
    print(f"written to {out / 'shows.json'}")


if __name__ == "__main__":
    main()
