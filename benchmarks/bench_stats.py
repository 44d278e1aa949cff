"""Time of the sufficient statistics against one bare sparse product.

Data: a CSR matrix of 50,000 cells x 5,000 genes, 10% non-zero random counts
(``scipy.sparse.random`` with a seeded generator, float64), a fixed design of
21 terms (intercept-free one-hot of 10 cell types, 10 celltype:treatment
columns, log library size) and a random intercept for 25 samples
(``build_design(X, n, groups=samples)``).

Measured (each repeated, medians reported, every run kept in the JSON):

* ``bare``: ``Y.T @ X``, the CSR matrix transposed times the dense n x 21 design:
  the floor for computing ``X'Y``;
* ``stats``: ``SufficientStats.from_design(design, Y)`` at the default
  ``chunk_size`` and at a few others; bare and stats runs are interleaved so
  the ratio compares timings taken under the same machine load;
* peak memory of ``from_design`` above the inputs (``tracemalloc``, separate
  untimed run per chunk size) compared with the size of a dense cells x genes
  array.

Target: ``stats / bare <= 2``.

Run from the repository root::

    python3 benchmarks/bench_stats.py            # full size, 5 repeats
    python3 benchmarks/bench_stats.py --quick    # small smoke run

It prints a table and writes ``benchmarks/results/stats.json``.
"""

from __future__ import annotations

import argparse
import gc
import resource
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_info, save_result  # noqa: E402

from flashmm._design import build_design  # noqa: E402
from flashmm._endog import DEFAULT_CHUNK_CELLS  # noqa: E402
from flashmm.stats import SufficientStats  # noqa: E402

MiB = 2**20
RESULTS = Path(__file__).resolve().parent / "results" / "stats.json"


def make_data(n_cells: int, n_genes: int, density: float, seed: int = 0):
    """Sparse counts, the 21-term fixed design and 25 sample labels."""
    rng = np.random.default_rng(seed)
    Y = sp.random(
        n_cells, n_genes, density=density, format="csr", dtype=np.float64, rng=rng,
        data_rvs=lambda k: rng.poisson(3.0, size=k) + 1.0,
    )
    n_types, n_samples = 10, 25
    celltype = rng.integers(0, n_types, size=n_cells)
    sample = rng.integers(0, n_samples, size=n_cells)
    treated = (sample % 2).astype(float)                 # treatment is per sample
    onehot = np.eye(n_types)[celltype]
    libsize = np.asarray(Y.sum(axis=1)).ravel() + 1.0
    X = np.column_stack([onehot, onehot * treated[:, None], np.log(libsize)])
    names = ([f"cls{j}" for j in range(n_types)] + [f"cls{j}:trt" for j in range(n_types)]
             + ["log_libsize"])
    samples = np.array([f"s{j:02d}" for j in sample])
    return Y, X, names, samples


def timed(func) -> float:
    gc.collect()
    t0 = time.perf_counter()
    func()
    return time.perf_counter() - t0


def peak_memory(func) -> int:
    """Peak bytes allocated (tracemalloc) while ``func`` runs."""
    gc.collect()
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    func()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak - base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=50_000)
    ap.add_argument("--genes", type=int, default=5_000)
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--chunks", type=int, nargs="*", default=[5_000, 50_000])
    ap.add_argument("--quick", action="store_true", help="small smoke run")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.cells, args.genes, args.repeats, args.chunks = 5_000, 500, 2, [1_000]

    info = machine_info()
    t0 = time.perf_counter()
    Y, X, names, samples = make_data(args.cells, args.genes, args.density)
    t_gen = time.perf_counter() - t0
    design = build_design(X, args.cells, groups=samples, exog_names=names)
    print(f"data: {Y.shape[0]} cells x {Y.shape[1]} genes, nnz={Y.nnz} "
          f"({Y.nnz / np.prod(Y.shape):.1%}), p={design.k_fe}, q={design.exog_re.shape[1]}; "
          f"generated in {t_gen:.1f} s")

    # correctness of what is being timed
    st = SufficientStats.from_design(design, Y)
    ref = np.asarray(Y.T @ X).T
    assert np.allclose(st.XY, ref), "XY differs from Y.T @ X"
    assert np.allclose(st.yy, np.asarray(Y.multiply(Y).sum(axis=0)).ravel())
    del st, ref

    chunk_sizes = [DEFAULT_CHUNK_CELLS] + [c for c in args.chunks if c != DEFAULT_CHUNK_CELLS]
    runs: dict[str, list[float]] = {"bare": []}
    for c in chunk_sizes:
        runs[f"stats_chunk{c}"] = []
    for _ in range(args.repeats):      # interleaved: same load for every variant
        runs["bare"].append(timed(lambda: Y.T @ X))
        for c in chunk_sizes:
            runs[f"stats_chunk{c}"].append(
                timed(lambda c=c: SufficientStats.from_design(design, Y, chunk_size=c)))
    med = {k: float(np.median(v)) for k, v in runs.items()}
    # per-repeat ratio (same repeat = same load), then its median
    ratio_runs = {
        k: [s / b for s, b in zip(v, runs["bare"], strict=True)] for k, v in runs.items() if k != "bare"
    }
    ratios = {k: float(np.median(v)) for k, v in ratio_runs.items()}

    input_bytes = Y.data.nbytes + Y.indices.nbytes + Y.indptr.nbytes
    dense_bytes = args.cells * args.genes * 8
    peaks = {"bare": peak_memory(lambda: Y.T @ X)}
    for c in chunk_sizes:
        peaks[f"stats_chunk{c}"] = peak_memory(
            lambda c=c: SufficientStats.from_design(design, Y, chunk_size=c))

    default = f"stats_chunk{DEFAULT_CHUNK_CELLS}"
    out = {
        "benchmark": "sufficient statistics from sparse CSR (bench_stats.py)",
        "machine": info,
        "data": {
            "n_cells": args.cells, "n_genes": args.genes, "density": args.density,
            "nnz": int(Y.nnz), "k_fe": design.k_fe, "k_re": int(design.exog_re.shape[1]),
            "generation_seconds": t_gen,
        },
        "bare_definition": "Y.T @ X (CSR cells x genes, transposed, times dense cells x 21)",
        "repeats": args.repeats,
        "default_chunk_size": DEFAULT_CHUNK_CELLS,
        "seconds_median": med,
        "seconds_runs": runs,
        "ratio_to_bare_median": ratios,
        "ratio_to_bare_runs": ratio_runs,
        "target_ratio": 2.0,
        "target_met_default_chunk": ratios[default] <= 2.0,
        "memory": {
            "method": "tracemalloc peak above baseline, separate untimed run",
            "input_csr_MiB": input_bytes / MiB,
            "dense_cells_x_genes_MiB": dense_bytes / MiB,
            "dense_chunk_x_genes_MiB": {
                f"chunk{c}": min(c, args.cells) * args.genes * 8 / MiB for c in chunk_sizes},
            "peak_MiB": {k: v / MiB for k, v in peaks.items()},
            "ru_maxrss_MiB_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        },
    }

    print(f"\n{'variant':<22}{'median s':>10}{'x bare':>9}{'peak MiB':>10}   runs")
    for k in runs:
        r = "" if k == "bare" else f"{ratios[k]:.2f}"
        print(f"{k:<22}{med[k]:>10.3f}{r:>9}{peaks[k] / MiB:>10.1f}   "
              + " ".join(f"{t:.3f}" for t in runs[k]))
    print(f"input CSR {input_bytes / MiB:.0f} MiB; a dense cells x genes array would be "
          f"{dense_bytes / MiB:.0f} MiB")
    print(f"target stats/bare <= 2 at default chunk: "
          f"{'met' if out['target_met_default_chunk'] else 'MISSED'} ({ratios[default]:.2f})")
    if not args.no_save:
        save_result(RESULTS, out)


if __name__ == "__main__":
    main()
