"""The linear datamodeling score (LDS): do a method's scores predict what models trained on random subsets output?

M random subsets S_1..S_M of the training set, each of a fixed fraction, are drawn from a seed and stored. A model
is trained on each subset (with one or more training seeds), and each query's output is measured on it with fixed
keyed noise: the query's diffusion loss L_S(q) over every ``stride``-th timestep (as leave-K-out measures it).

The sign convention. A larger attribution score τ_i means image i supports the query: its presence lowers the
query's loss, so removing it raises the loss (unlearning scores are loss increases). The measured output of a subset
is therefore the negative loss, f_S(q) = −L_S(q) (averaged over the training seeds), and the predicted output is the
sum of the scores of the images it holds, g_S(q) = Σ_{i∈S} τ_i. A method's LDS for one query is Spearman's rank
correlation between g and f over the M subsets; the table reports its mean ± SE over queries and a bootstrap
interval over subsets (resampling the M subsets with replacement, the mean over queries each time), as D-TRAK does.

Every query's output is measured on the same M models, so what a subset does to every query alike (its model's
overall fit) is shared by all queries: scores that are the same for every query (random ones) can correlate with it by
chance, and then with every query at once, which the SE over queries does not show (the bootstrap over subsets does).
The table therefore also reports the LDS with f_S(q) centred: each model's mean over the queries subtracted.

Is a method's LDS more than chance? Its p-value against relabelled images: the share of random permutations of the
training images (one permutation for every query, so what the scores share between queries stays shared) under which
the same scores reach the method's mean LDS. It asks whether the scores point at the right images, with the noise of
the measured outputs and of the shared part both in the null, which a random ranking's row shows only once.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.data import Query
from common.errors import AttributionError, require
from common.evaluation.agreement import spearman
from common.evaluation.exclusion import exclusion_key, top_k_exclusion
from common.evaluation.tables import mean_se
from common.files import write_json
from common.fingerprints import settings_digest
from common.model import DiffusionModel
from common.outputs import read_ranking


@dataclass
class LdsConfig:
    """The subsets of an LDS run (stage flags --lds.*); the measured loss's stride and noise are --eval.*'s."""

    count: int = field(default=64, metadata={"help": "random subsets M (D-TRAK: 64; a later run may ask for more)"})
    fraction: float = field(default=0.5, metadata={"help": "share of the training set in each subset"})
    seeds: int = field(default=1, metadata={"help": "training seeds per subset, their losses averaged (D-TRAK: 3)"})
    subset_seed: int = field(default=0, metadata={"help": "seed the subsets are drawn from"})
    bootstrap: int = field(default=1000, metadata={"help": "resamples of the subsets for the interval"})
    permutations: int = field(default=1000, metadata={"help": "relabellings of the images for the p-value"})

    def __post_init__(self) -> None:
        check_subset_settings(self.count, self.fraction)
        require(self.seeds >= 1, f"LDS trains at least 1 seed per subset, got {self.seeds}")
        require(self.bootstrap >= 1, f"the bootstrap needs at least 1 resample, got {self.bootstrap}")
        require(self.permutations >= 1, f"the p-value needs at least 1 relabelling, got {self.permutations}")


def check_subset_settings(count: int, fraction: float) -> None:
    """A fraction in (0, 1) and at least 2 subsets, or one line saying which is wrong."""
    require(0 < fraction < 1, f"the subset fraction must lie in (0, 1), got {fraction}")
    require(count >= 2, f"LDS needs at least 2 subsets (a rank correlation over them), got {count}")


def draw_subsets(num_train: int, count: int, fraction: float, seed: int) -> np.ndarray:
    """``count`` subsets of round(fraction · N) training images each, drawn from ``seed``: a (count, N) boolean mask."""
    check_subset_settings(count, fraction)
    size = round(fraction * num_train)
    require(0 < size < num_train, f"a fraction {fraction} of {num_train} images is {size} images: no subset to draw")
    rng = np.random.default_rng(seed)
    masks = np.zeros((count, num_train), dtype=bool)
    for row in masks:
        row[rng.choice(num_train, size, replace=False)] = True
    return masks


def store_subsets(folder: str | Path, masks: np.ndarray, identity: dict) -> None:
    """``folder/subsets.npy`` (the masks) and ``folder/subsets.json`` (what drew them)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "subsets.npy", masks)
    write_json(folder / "subsets.json", identity)


def load_subsets(folder: str | Path, identity: dict) -> np.ndarray | None:
    """The stored masks when ``folder`` holds subsets drawn with ``identity`` (of any count); None when it holds none;
    refused when it holds others (another training set, fraction or seed)."""
    folder = Path(folder)
    if not (folder / "subsets.json").is_file():
        return None
    stored = json.loads((folder / "subsets.json").read_text())
    stored.pop("count", None)
    if stored != identity:
        differ = sorted(k for k in identity.keys() | stored.keys() if identity.get(k) != stored.get(k))
        raise AttributionError(f"{folder} holds subsets drawn otherwise ({', '.join(differ)} differ); choose another "
                               "folder")  # fmt: skip
    try:
        masks = np.load(folder / "subsets.npy")
    except (OSError, ValueError, EOFError) as err:
        raise AttributionError(f"{folder / 'subsets.npy'} is damaged ({err}); delete the folder to draw again") from err
    num_train = identity["num_train"]
    require(masks.ndim == 2 and masks.shape[1] == num_train and masks.dtype == bool,
            f"{folder / 'subsets.npy'} holds {masks.shape} {masks.dtype}, not masks of {num_train} images")  # fmt: skip
    return masks


def subsets(folder: str | Path, num_train: int, count: int, fraction: float, seed: int, train_fingerprint: str):
    """The first ``count`` subsets of a seed: drawn and stored the first time, read back (and checked) after.

    Subsets are drawn one after another from the seed, so the first M are the same for every count: a later run may
    ask for more (the stored ones are kept, the new ones drawn and stored) or fewer (the first ``count``).
    """
    identity = {"num_train": num_train, "fraction": fraction, "seed": seed, "train_fingerprint": train_fingerprint}
    stored = load_subsets(folder, identity)
    if stored is not None and len(stored) >= count:
        return stored[:count]
    masks = draw_subsets(num_train, count, fraction, seed)
    if stored is not None:
        require(np.array_equal(masks[: len(stored)], stored), f"{Path(folder) / 'subsets.npy'} does not hold the "
                f"subsets its seed draws here; delete the folder to draw again")  # fmt: skip
    store_subsets(folder, masks, identity | {"count": count})
    return masks


def predicted_outputs(scores: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """g_S = Σ_{i∈S} τ_i for every subset: (M,)."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    require(masks.shape[1] == len(scores), f"scores of {len(scores)} images against subsets of {masks.shape[1]}")
    return masks.astype(np.float64) @ scores


def measured_outputs(losses: Mapping[str, np.ndarray], num_subsets: int, centred: bool = False) -> dict:
    """f_S(q) = −L_S(q) per query id: (M,), the training seeds averaged.

    ``centred`` subtracts, for each subset, the mean of f_S over the queries: what a subset does to every query alike
    (its model's overall fit), which scores that are the same for every query (random ones) can match by chance.
    """
    outputs = {}
    for qid, loss in losses.items():
        loss = np.asarray(loss, dtype=np.float64)
        loss = loss.mean(axis=1) if loss.ndim == 2 else loss
        count = loss.shape[0]
        require(loss.shape == (num_subsets,), f"query {qid}: {count} measured outputs for {num_subsets} subsets")
        outputs[qid] = -loss
    if centred:
        require(len(outputs) >= 2, f"centring over queries needs at least 2 queries, got {len(outputs)}")
        common = np.mean(list(outputs.values()), axis=0)
        outputs = {qid: f - common for qid, f in outputs.items()}
    return outputs


def lds_per_query(
    scores: Mapping[str, np.ndarray], masks: np.ndarray, losses: Mapping[str, np.ndarray], centred: bool = False
) -> dict[str, float]:
    """Spearman between g_S(q) and f_S(q) = −L_S(q) over the subsets, per query.

    Args:
        scores: query id -> the method's scores of the N training images.
        masks: (M, N) subsets.
        losses: query id -> the query's measured loss on each subset's model (M,), or (M, seeds), averaged over
            the seeds.
        centred: f_S(q) minus its mean over the queries of ``losses`` (:func:`measured_outputs`).
    """
    for qid in scores:
        require(qid in losses, f"no measured losses for query {qid}")
    outputs = measured_outputs(losses, len(masks), centred)
    return {qid: spearman(predicted_outputs(s, masks), outputs[qid]) for qid, s in scores.items()}


def mean_lds(predicted: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray], pick=slice(None)) -> float:
    """The mean over queries of Spearman(g, f[pick]), over the queries where it is defined; NaN where none is."""
    values = [spearman(g, outputs[q][pick]) for q, g in predicted.items()]
    values = [v for v in values if np.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def bootstrap_interval(
    scores: Mapping[str, np.ndarray],
    masks: np.ndarray,
    losses: Mapping[str, np.ndarray],
    draws: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    centred: bool = False,
) -> tuple[float, float]:
    """The ``level`` percentile interval of the mean LDS over queries, the M subsets resampled with replacement."""
    rng = np.random.default_rng(seed)
    predicted = {q: predicted_outputs(s, masks) for q, s in scores.items()}
    outputs = measured_outputs(losses, len(masks), centred)
    means = []
    for _ in range(draws):
        pick = rng.integers(0, len(masks), len(masks))
        mean = mean_lds({q: g[pick] for q, g in predicted.items()}, outputs, pick)
        if np.isfinite(mean):
            means.append(mean)
    tail = (1 - level) / 2 * 100
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def permutation_p(
    scores: Mapping[str, np.ndarray],
    masks: np.ndarray,
    losses: Mapping[str, np.ndarray],
    draws: int = 1000,
    seed: int = 0,
    centred: bool = False,
    chunk: int = 100,
) -> float:
    """One-sided p-value of the mean LDS over queries against relabelled images: (1 + the relabellings whose mean
    reaches it) / (1 + draws). Each relabelling permutes the training images once for every query."""
    outputs = measured_outputs(losses, len(masks), centred)
    vectors = {q: np.asarray(s, dtype=np.float64).ravel() for q, s in scores.items()}
    observed = mean_lds({q: predicted_outputs(s, masks) for q, s in vectors.items()}, outputs)
    require(np.isfinite(observed), "no query has a defined LDS (every prediction or output is constant)")
    rng, weights, hits = np.random.default_rng(seed), masks.astype(np.float64), 0
    for start in range(0, draws, chunk):  # (M, chunk) predictions per query at a time: bounded memory at any N
        perms = np.stack([rng.permutation(masks.shape[1]) for _ in range(min(chunk, draws - start))])
        predicted = {q: weights @ s[perms].T for q, s in vectors.items()}
        means = [mean_lds({q: p[:, b] for q, p in predicted.items()}, outputs) for b in range(len(perms))]
        hits += sum(mean >= observed for mean in means)
    return (1 + int(hits)) / (1 + draws)


def lds_summary(per_query: Mapping[str, float]) -> dict:
    """Mean ± SE over the queries whose LDS is defined (a constant prediction or output has none)."""
    values = [v for v in per_query.values() if np.isfinite(v)]
    require(bool(values), "no query has a defined LDS (every prediction or output is constant)")
    mean, se = mean_se(values)
    return {"mean": mean, "se": se, "queries": len(values), "undefined": len(per_query) - len(values)}


def measure_subsets(
    masks: np.ndarray,
    seeds: int,
    queries: Sequence[Query],
    retrain: Callable[[list[int], Path, int], DiffusionModel],
    measure: Callable[[DiffusionModel, Query], float],
    recipe: dict,
    out: str | Path,
    main: bool = True,
) -> dict[str, np.ndarray]:
    """Each query's loss on a model trained on each subset with each seed: query id -> (M, seeds).

    The models lie in ``out/models/<recipe and seed digest>/<excluded set>`` (resumed and reused as leave-K-out's);
    each (seed, subset)'s losses in ``out/outputs/s<seed>/<subset>.json``, reused when its excluded set is the
    subset's and it holds every query (a missing query is measured on the cached model).
    """
    out = Path(out)
    losses = {q.id: np.full((len(masks), seeds), np.nan) for q in queries}
    jobs = [(s, j) for s in range(seeds) for j in range(len(masks))]
    for i, (s, j) in enumerate(jobs):
        excluded = np.flatnonzero(~masks[j]).tolist()
        key = exclusion_key(excluded)
        path = out / "outputs" / f"s{s}" / f"{j:03d}.json"
        record = json.loads(path.read_text()) if path.is_file() else {}
        if record.get("excluded") != key:
            record = {"subset": j, "seed_offset": s, "excluded": key, "losses": {}}
        missing = [q for q in queries if q.id not in record["losses"]]
        if missing:
            if main:
                print(f"[{i + 1}/{len(jobs)}] subset {j} seed +{s}: {len(masks[j]) - len(excluded)} images")
            folder = out / "models" / settings_digest({"recipe": recipe, "seed_offset": s}) / key
            model = retrain(excluded, folder, s)
            record["losses"] |= {q.id: measure(model, q) for q in missing}
            if main:
                path.parent.mkdir(parents=True, exist_ok=True)
                write_json(path, record)
        for q in queries:
            losses[q.id][j, s] = record["losses"][q.id]
    return losses


def read_scores(folder: Path, queries: Sequence[Query], num_train: int, train_fingerprint: str,
                model_fingerprint: str) -> dict[str, np.ndarray]:  # fmt: skip
    """A ranking folder's full scores per query (``<query>/scores.npy``), of this model and training set only; refused
    for a candidate re-ranking, whose images outside the candidates hold placeholders, not scores."""
    scores = {}
    for query in queries:
        top_k_exclusion(folder / query.id / "ranking.json", 1, num_train, train_fingerprint, model_fingerprint)
        candidates = read_ranking(folder / query.id / "ranking.json").get("stats", {}).get("candidates")
        require(not candidates, f"{folder} re-scored only {(candidates or {}).get('count')} candidates for "
                f"{query.id}: its other scores are placeholders that keep an order, and LDS sums scores; use the exact "
                "run's rankings")  # fmt: skip
        path = folder / query.id / "scores.npy"
        require(path.is_file(), f"{folder} has no scores.npy for {query.id} (LDS needs every image's score)")
        scores[query.id] = np.load(path).astype(np.float64).ravel()
        require(len(scores[query.id]) == num_train, f"{path} holds {len(scores[query.id])} scores, not {num_train}")
    return scores


def seed_agreement(losses: Mapping[str, np.ndarray]) -> dict[str, float] | None:
    """Per query, Spearman between two training seeds' losses over the subsets (the mean over seed pairs): how much
    of the measured output the subset decides rather than training noise. None with one seed."""
    arrays = {q: np.asarray(loss, dtype=np.float64) for q, loss in losses.items()}
    if not arrays or any(a.ndim != 2 or a.shape[1] < 2 for a in arrays.values()):
        return None
    pairs = [(a, b) for a in range(next(iter(arrays.values())).shape[1]) for b in range(a)]
    return {q: float(np.mean([spearman(a[:, i], a[:, j]) for i, j in pairs])) for q, a in arrays.items()}


def lds_table(sources: Mapping[str, Mapping[str, np.ndarray]], masks: np.ndarray,
              losses: Mapping[str, np.ndarray], cfg: LdsConfig) -> dict:  # fmt: skip
    """Per method (row label -> its scores per query): LDS per query, mean ± SE and the bootstrap interval, plain and
    centred over the queries (when there are 2 or more); the mean correlation of the queries' outputs; and how well
    the training seeds agree (with 2 or more)."""

    def row(scores: Mapping[str, np.ndarray], centred: bool) -> dict:
        per_query = lds_per_query(scores, masks, losses, centred)
        interval = bootstrap_interval(scores, masks, losses, cfg.bootstrap, cfg.subset_seed, centred=centred)
        p = permutation_p(scores, masks, losses, cfg.permutations, cfg.subset_seed, centred=centred)
        return {"queries": per_query, "summary": lds_summary(per_query), "interval": list(interval), "p": p}

    rows = {}
    for label, scores in sources.items():
        rows[label] = row(scores, centred=False)
        if len(losses) >= 2:
            rows[label]["centred"] = row(scores, centred=True)
    outputs = np.array(list(measured_outputs(losses, len(masks)).values()))
    shared = float(np.mean(np.corrcoef(outputs)[np.triu_indices(len(outputs), 1)])) if len(outputs) >= 2 else None
    agreement = seed_agreement(losses)
    agreement = None if agreement is None else {"queries": agreement, "summary": lds_summary(agreement)}
    return {"subsets": len(masks), "fraction": cfg.fraction, "seeds": cfg.seeds, "query_correlation": shared,
            "seed_agreement": agreement, "rows": rows}  # fmt: skip


def markdown(table: dict) -> str:
    """The LDS table (plain and centred over queries), then each query's LDS per method."""
    rows = table["rows"]
    shared = table.get("query_correlation")
    agreement = (table.get("seed_agreement") or {}).get("summary")
    lines = [f"{table['subsets']} subsets of {table['fraction']:.0%} of the training set, {table['seeds']} training "
             "seed(s) each; LDS = Spearman between the summed scores of a subset and the query's negative loss "
             "on its model (mean ± SE over queries; 95% bootstrap interval over subsets); centred: each model's "
             "mean over the queries subtracted from the negative loss first; p: the share of relabellings of the "
             "training images (one for all queries) whose LDS reaches the method's"
             + ("" if shared is None else f". The queries' outputs correlate by {shared:.2f} on average over the "
                "subsets (what a subset does to every query alike)")
             + ("" if agreement is None else f". Two training seeds' losses agree by Spearman {agreement['mean']:.3f} "
                f"± {agreement['se']:.3f} over the subsets (mean ± SE over queries): the part of the output the "
                "subset decides"), "",
             "| method | LDS ↑ | 95% interval | p | LDS, centred ↑ | 95% interval | p | queries |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip

    def cells(row: dict | None) -> str:
        if row is None:
            return "– | – | –"
        summary, (low, high) = row["summary"], row["interval"]
        return f"{summary['mean']:.3f} ± {summary['se']:.3f} | [{low:.3f}, {high:.3f}] | {row['p']:.3f}"

    for label, row in rows.items():
        lines.append(f"| {label} | {cells(row)} | {cells(row.get('centred'))} | {row['summary']['queries']} |")
    queries = sorted({q for row in rows.values() for q in row["queries"]})
    lines += ["", "| method | " + " | ".join(queries) + " |", "|---|" + "---|" * len(queries)]
    for label, row in rows.items():
        lines.append(f"| {label} | " + " | ".join(f"{row['queries'].get(q, float('nan')):.3f}" for q in queries) + " |")
    return "\n".join(lines) + "\n"
