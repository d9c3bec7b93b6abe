"""The distilled method's index step timed at a training-set size: one query embedding against N stored ones.

    python -m common.distillation.latency --sizes 2000 118287 --dims 128 768 [--queries 50]

Stores N random unit embeddings (float16, as the method caches them: N x 2 orientations x d, like a model
trained with flips) in a memory-mapped ``.npy`` in a temporary folder, then times
:func:`common.methods.distilled.index_scores` and the top-K selection (``np.argpartition``, K = 1,000) per query,
after one warm-up query (the file in the page cache, as on a server that keeps it). Prints a Markdown table of the
median and 90th-percentile milliseconds. The feature pass of the query (one denoiser forward per feature timestep
and one text encoding) is not part of it: ``ranking.json``'s ``seconds_features`` has that per query.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common.errors import cli, require
from common.methods.distilled import index_scores


def time_index(n: int, dim: int, queries: int, top_k: int, folder: Path, seed: int = 0) -> dict[str, float]:
    """Milliseconds per query (median, p90) of the index step over ``n`` stored embeddings of ``dim``."""
    rng = np.random.default_rng(seed)
    path = folder / f"index_{n}_{dim}.npy"
    index = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, 2, dim))
    for a in range(0, n, 8192):
        rows = rng.standard_normal((min(8192, n - a), 2, dim)).astype(np.float32)
        index[a : a + len(rows)] = rows / np.linalg.norm(rows, axis=-1, keepdims=True)
    index.flush()
    del index
    index = np.load(path, mmap_mode="r")
    times = []
    for _ in range(queries + 1):
        q = rng.standard_normal(dim).astype(np.float32)
        q /= np.linalg.norm(q)
        t0 = time.perf_counter()
        scores = index_scores(index, q, 10.0, 0.0).max(1)
        top = np.argpartition(-scores, min(top_k, n - 1))[:top_k]
        times.append(time.perf_counter() - t0)
        assert len(top) == min(top_k, n)
    ms = np.array(times[1:]) * 1000  # the first query warms the page cache
    return {"median": float(np.median(ms)), "p90": float(np.percentile(ms, 90))}


@cli
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 118287], help="training-set sizes N")
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 768], help="embedding sizes")
    parser.add_argument("--queries", type=int, default=50, help="queries timed per size")
    parser.add_argument("--top-k", type=int, default=1000, help="images selected per query")
    args = parser.parse_args()
    require(min(args.sizes) >= 1 and min(args.dims) >= 1 and args.queries >= 1, "sizes, dims and queries must be "
            "positive")  # fmt: skip
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| N | embedding size | index MB (float16) | ms per query (median) | p90 |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            for dim in args.dims:
                t = time_index(n, dim, args.queries, args.top_k, Path(tmp))
                mb = n * 2 * dim * 2 / 2**20
                print(f"| {n:,} | {dim} | {mb:.0f} | {t['median']:.1f} | {t['p90']:.1f} |")


if __name__ == "__main__":
    main()
