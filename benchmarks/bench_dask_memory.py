"""Peak memory per dask worker when computing sufficient statistics.

The expression matrix (cells x genes, float64) is generated lazily with
``map_blocks`` from per-chunk seeds, so it never exists whole, anywhere.  It is
larger than one worker's ``memory_limit`` (and than the whole cluster's), yet the
statistics are computed by a ``LocalCluster`` of 2 worker processes: each
worker only ever holds a few chunks and the small partial sums.  Spilling to
disk is disabled, so a worker that needed more than its limit would be paused
or killed by its nanny instead of silently spilling.

Peak memory is the peak resident set size (``ru_maxrss``) of every worker
process, measured after a fresh restart of the cluster for each configuration.

Run from the repository root::

    python3 benchmarks/bench_dask_memory.py

It prints a table and writes ``benchmarks/results/dask_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dask
import dask.array as da
import distributed

from flashmm._design import build_design
from flashmm.dask import stats_from_dask

MiB = 2**20
RESULTS = Path(__file__).resolve().parent / "results" / "dask_memory.json"


def lazy_counts(n_cells: int, n_genes: int, chunk: int, seed: int = 0) -> da.Array:
    """Poisson counts, one chunk of cells per task, generated from its seed."""

    def gen(block_info=None):
        (start, stop), _ = block_info[None]["array-location"]
        rng = np.random.default_rng([seed, start])
        return rng.poisson(0.8, size=(stop - start, n_genes)).astype(np.float64)

    sizes = [chunk] * (n_cells // chunk) + ([n_cells % chunk] if n_cells % chunk else [])
    return da.map_blocks(gen, chunks=(tuple(sizes), (n_genes,)), dtype=np.float64)


def make_design(n_cells: int, n_samples: int = 40, seed: int = 1):
    rng = np.random.default_rng(seed)
    X = np.column_stack([np.ones(n_cells), rng.integers(0, 2, n_cells), rng.normal(size=n_cells)])
    samples = rng.integers(0, n_samples, n_cells).astype(str)
    return build_design(X, n_cells, groups=samples)


def peak_rss() -> int:
    """Peak resident set size of this process in bytes (Linux: ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run(client: distributed.Client, n_cells: int, n_genes: int, chunk: int,
        memory_limit: int) -> dict:
    client.restart()  # fresh worker processes: ru_maxrss starts from scratch
    idle = client.run(peak_rss)
    design = make_design(n_cells)
    endog = lazy_counts(n_cells, n_genes, chunk)
    t0 = time.perf_counter()
    stats = stats_from_dask(design, endog, transform="log1p")
    wall = time.perf_counter() - t0
    peaks = client.run(peak_rss)
    assert stats.n == n_cells and stats.n_genes == n_genes
    assert np.all(np.isfinite(stats.XY)) and np.all(stats.yy > 0)
    return {
        "n_cells": n_cells,
        "n_genes": n_genes,
        "chunk_cells": chunk,
        "n_chunks": len(endog.chunks[0]),
        "data_MiB": n_cells * n_genes * 8 / MiB,
        "chunk_MiB": chunk * n_genes * 8 / MiB,
        "memory_limit_MiB": memory_limit / MiB,
        "idle_peak_rss_MiB": sorted(v / MiB for v in idle.values()),
        "peak_rss_MiB": sorted(v / MiB for v in peaks.values()),
        "wall_s": wall,
        "yy_total": float(stats.yy.sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--memory-limit-mib", type=int, default=512)
    parser.add_argument("--configs", default="120000:2500,120000:5000,240000:2500",
                        help="comma-separated n_cells:chunk_cells")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    memory_limit = args.memory_limit_mib * MiB
    configs = [tuple(int(x) for x in c.split(":")) for c in args.configs.split(",")]
    with dask.config.set({"distributed.worker.memory.target": False,
                          "distributed.worker.memory.spill": False}):
        cluster = distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
            dashboard_address=None, memory_limit=memory_limit, silence_logs=40,
        )
        client = distributed.Client(cluster)
        try:
            rows = [run(client, n, args.genes, c, memory_limit) for n, c in configs]
        finally:
            client.close()
            cluster.close()

    header = (f"{'cells':>8} {'genes':>6} {'chunk':>6} {'data MiB':>9} {'chunk MiB':>9} "
              f"{'limit MiB':>9} {'peak RSS per worker MiB':>24} {'wall s':>7}")
    print(header)
    print("-" * len(header))
    for r in rows:
        peaks = " / ".join(f"{p:.0f}" for p in r["peak_rss_MiB"])
        print(f"{r['n_cells']:>8} {r['n_genes']:>6} {r['chunk_cells']:>6} {r['data_MiB']:>9.0f} "
              f"{r['chunk_MiB']:>9.1f} {r['memory_limit_MiB']:>9.0f} {peaks:>24} "
              f"{r['wall_s']:>7.1f}")
    idle = " / ".join(f"{p:.0f}" for p in rows[0]["idle_peak_rss_MiB"])
    print(f"idle worker peak RSS after restart: {idle} MiB")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "description": "peak RSS per dask worker (2 worker processes, 1 thread each, "
                       "spilling disabled) computing flashmm sufficient statistics of "
                       "lazily generated float64 counts larger than a worker's memory limit",
        "python": platform.python_version(),
        "dask": dask.__version__,
        "distributed": distributed.__version__,
        "numpy": np.__version__,
        "cpu_count": os.cpu_count(),
        "design": "3 fixed terms, random intercept for 40 samples (q=40)",
        "transform": "log1p",
    }
    args.out.write_text(json.dumps({"meta": meta, "runs": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
