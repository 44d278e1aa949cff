"""The fused kernel of the statistics pass against the scipy products it replaced, in memory.

Data: an atlas-shaped chunk in memory, 50,000 cells x 11,596 genes, 7% non-zero
float32 counts (``scipy.sparse.random``, Poisson(2) + 1), 259 donors in random
cell order, the fixed design of ``bench_atlas`` (``np.log(libsize)``, 5 cell
types, cell type x treatment: 11 columns, 3 non-zero per cell).

Variants, interleaved, each repeated (median of the per-repeat times):

* ``scipy``: the previous pass: a float64 copy of the values, ``log2(1 + x)``
  by numpy, ``Y'X``, ``Z'Y`` (CSR @ CSR) and ``Y'^2 1`` as three scipy products;
* ``kernel``: :func:`flashmm._kernel.accumulate_chunk` on both cores;
* ``kernel_1thread``: the same on one thread;
* ``kernel_cell_order``: both cores, the cells in stored order instead of
  grouped by donor (what the grouping buys);
* ``kernel_no_table``: both cores, non-integer values, so every value goes
  through the scalar ``log2`` instead of the table of whole counts.

Usage::

    python benchmarks/bench_kernel.py [--cells 50000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numba
import numpy as np
import scipy.sparse as sp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from _common import machine_info, save_result  # noqa: E402

from flashmm import _kernel  # noqa: E402
from flashmm._kernel import Accumulators, KernelDesign, accumulate_chunk  # noqa: E402

RESULTS = HERE / "results" / "kernel.json"


def make_chunk(n: int, genes: int, seed: int = 0):
    """Counts (CSR float32), the fixed design X and the donor design Z."""
    rng = np.random.default_rng(seed)
    Y = sp.random(n, genes, density=0.07, format="csr", dtype=np.float32, rng=rng,
                  data_rvs=lambda k: rng.poisson(2.0, size=k) + 1.0)
    donor = rng.integers(0, 259, n)
    cls = rng.integers(0, 5, n)
    onehot = np.eye(5)[cls]
    treated = (donor % 2).astype(float)
    libsize = np.asarray(Y.sum(axis=1)).ravel() + 1.0
    X = np.column_stack([np.log(libsize), onehot, onehot * treated[:, None]])
    Z = sp.csr_matrix((np.ones(n), (np.arange(n), donor)), shape=(n, 259))
    return Y, X, Z


def scipy_pass(Y: sp.csr_matrix, X: np.ndarray, Z: sp.csr_matrix) -> None:
    """The three scipy products of the previous pass, on a float64 transformed copy."""
    T = sp.csr_matrix(Y, dtype=np.float64)
    T.data = np.log2(1.0 + T.data)
    t = sp.csc_matrix((T.shape[1], T.shape[0]))
    t.data, t.indices, t.indptr = T.data, T.indices, T.indptr
    _ = np.asarray(t @ X).T
    _ = (Z.T.tocsr() @ T).toarray()
    s = sp.csc_matrix((T.shape[1], T.shape[0]))
    s.data, s.indices, s.indptr = T.data * T.data, T.indices, T.indptr
    _ = s @ np.ones(T.shape[0])


def main(argv: list[str] | None = None) -> int:
    """Time the variants and write ``results/kernel.json``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=50_000)
    p.add_argument("--genes", type=int, default=11_596)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    info = machine_info()
    Y, X, Z = make_chunk(args.cells, args.genes)
    Yfrac = Y.copy()
    Yfrac.data = Yfrac.data + np.float32(0.5)
    kd = KernelDesign.of(X, Z)
    in_order = KernelDesign(*(getattr(kd, f) for f in ("xdata", "xind", "xptr", "zdata", "zind", "zptr")))
    object.__setattr__(in_order, "group_order", lambda row0, n: np.arange(n, dtype=np.int64))
    threads = numba.get_num_threads()

    def kernel(block, design, n_threads):
        def run():
            numba.set_num_threads(n_threads)
            acc = Accumulators.zeros(X.shape[1], Z.shape[1], Y.shape[1])
            accumulate_chunk(acc, design, 0, block, 1, trusted=True)
            numba.set_num_threads(threads)
        return run

    variants = {
        "scipy": lambda: scipy_pass(Y, X, Z),
        "kernel": kernel(Y, kd, threads),
        "kernel_1thread": kernel(Y, kd, 1),
        "kernel_cell_order": kernel(Y, in_order, threads),
        "kernel_no_table": kernel(Yfrac, kd, threads),
    }
    for f in variants.values():      # compile / warm up
        f()
    runs: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name, f in variants.items():
            t0 = time.perf_counter()
            f()
            runs[name].append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) for k, v in runs.items()}
    ratio = {k: [a / b for a, b in zip(v, runs["kernel"], strict=True)] for k, v in runs.items()}
    ratio_med = {k: float(np.median(v)) for k, v in ratio.items()}
    print(f"{Y.shape[0]} cells x {Y.shape[1]} genes, nnz {Y.nnz:,}, {threads} threads")
    print(f"{'variant':<20}{'median s':>10}{'x kernel':>10}")
    for k in runs:
        print(f"{k:<20}{med[k]:>10.3f}{ratio_med[k]:>10.2f}")
    if not args.no_save:
        save_result(RESULTS, {
            "benchmark": "fused kernel vs scipy products (bench_kernel.py)", "machine": info,
            "data": {"n_cells": Y.shape[0], "n_genes": Y.shape[1], "nnz": int(Y.nnz),
                     "k_fe": X.shape[1], "k_re": Z.shape[1]},
            "threads": threads, "blocks_per_thread": _kernel._BLOCKS_PER_THREAD,
            "seconds_runs": runs, "seconds_median": med, "ratio_to_kernel_median": ratio_med,
        })
    return 0


if __name__ == "__main__":
    sys.exit(main())
