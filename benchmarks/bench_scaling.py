"""How time and memory grow with cells and with genes.

Two sweeps, recorded in ``benchmarks/results/scaling.json`` as a ``"scaling"``
list (read by the documentation's performance page):

- the statistics pass over a CSR matrix (2,000 genes, 10% non-zero, 21 fixed
  terms, 25 samples) for 10,000 to 200,000 cells: time, and the peak memory
  traced by ``tracemalloc`` (the chunk, not the matrix);
- the fit from statistics (21 terms, 25 samples) for 1,000 to 30,000 genes, one
  component, and 1,000 to 10,000 genes with two crossed components (25 + 12).

Run: ``python benchmarks/bench_scaling.py`` (a few minutes on 2 cores); medians of
``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_info, save_result  # noqa: E402
from bench_fit import simulate_stats  # noqa: E402

from flashmm import MultiGeneMixedLM  # noqa: E402
from flashmm._design import build_design  # noqa: E402
from flashmm.stats import SufficientStats  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "scaling.json"


def _median_time(func, repeats: int) -> float:
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        func()
        runs.append(time.perf_counter() - t0)
    return float(np.median(runs))


def sweep_cells(cells: list[int], n_genes: int, repeats: int) -> list[dict]:
    """Statistics pass over CSR matrices of growing size."""
    out = []
    rng = np.random.default_rng(0)
    for n in cells:
        Y = sp.random(n, n_genes, density=0.1, format="csr", random_state=n, dtype=np.float64)
        celltype = rng.integers(0, 10, size=n)
        onehot = np.eye(10)[celltype]
        X = np.column_stack([onehot, onehot * rng.integers(0, 2, size=n)[:, None],
                             rng.normal(size=n)])
        design = build_design(X, n, groups=rng.integers(0, 25, size=n))
        seconds = _median_time(lambda Y=Y, design=design: SufficientStats.from_design(design, Y), repeats)
        tracemalloc.start()
        SufficientStats.from_design(design, Y)
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        out.append({"label": f"statistics pass ({n_genes:,} genes, CSR 10%)", "n_cells": n,
                    "seconds": seconds, "peak_MiB": peak,
                    "input_MiB": (Y.data.nbytes + Y.indices.nbytes + Y.indptr.nbytes) / 2**20})
        print(f"cells {n:>7,}: {seconds:6.2f} s, peak traced {peak:7.1f} MiB")
    return out


def sweep_genes(genes: list[int], crossed: bool, repeats: int) -> list[dict]:
    """Fit (plus fe_params and bse_fe) from statistics of growing gene counts."""
    out = []
    label = "fit, two crossed components (25 + 12)" if crossed else "fit, one component (25 samples)"
    for G in genes:
        stats = simulate_stats(20_000, G, crossed)

        def run(stats=stats) -> None:
            res = MultiGeneMixedLM.from_sufficient_stats(stats).fit()
            _ = (res.fe_params, res.bse_fe)

        seconds = _median_time(run, repeats)
        out.append({"label": label, "n_genes": G, "seconds": seconds})
        print(f"{label}, genes {G:>6,}: {seconds:6.2f} s")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="small smoke run")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    if args.quick:
        cells, genes1, genes2, n_genes = [5_000, 10_000], [500, 1_000], [200, 400], 500
    else:
        cells, genes1, genes2, n_genes = ([10_000, 25_000, 50_000, 100_000, 200_000],
                                          [1_000, 3_000, 10_000, 30_000], [1_000, 3_000, 10_000], 2_000)
    records = (sweep_cells(cells, n_genes, args.repeats)
               + sweep_genes(genes1, False, args.repeats)
               + sweep_genes(genes2, True, max(1, args.repeats - 1)))
    result = {"machine": machine_info(), "repeats": args.repeats, "scaling": records}
    if not args.no_save:
        save_result(RESULTS, result)


if __name__ == "__main__":
    main()
