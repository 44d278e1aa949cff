"""Several variance components: cost per gene against the number of donors.

Two designs of a single-cell study, ``c`` cell types x ``k`` cells per donor,
genes with donor, donor:celltype and batch variation:

* ``nested``: ``(1|donor) + (1|donor:celltype)``, written as statsmodels does
  (``groups="donor", re_formula="1", vc_formula={"dct": "0 + C(ct)"}``); the
  structure analysis makes one arrowhead block per donor;
* ``crossed``: ``(1|donor) + (1|batch)``, 24 batches, each donor's cells spread
  over 3 of them (``groups=None``); donors form the group blocks, batches the
  global (Schur) block.

For m = 250 ... 4,000 donors the statistics are computed once (not timed),
then ``fit()`` plus the Satterthwaite df of every term is timed on one thread
(BLAS and ``n_jobs``), median of the repeats.  The target is a per-gene cost
linear in the number of donors (log-log slope <= 1.1).  The peak memory of the
process is recorded too.

Run from the repository root::

    python3 benchmarks/bench_components.py            # ~6 min on 2 cores
    python3 benchmarks/bench_components.py --quick    # smoke run

It prints a table and writes ``benchmarks/results/components.json``.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_info, save_result, sufficient_stats  # noqa: E402

from flashmm import MultiGeneMixedLM  # noqa: E402
from flashmm._design import build_design  # noqa: E402
from flashmm.stats import SufficientStats  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "components.json"


def simulate_stats(kind: str, n_donors: int, n_genes: int, n_celltypes: int = 3,
                   cells: int = 20, n_batches: int = 24, seed: int = 0) -> SufficientStats:
    """Statistics of a nested or crossed study with ``n_donors`` donors."""
    rng = np.random.default_rng(seed)
    donor = np.repeat(np.arange(n_donors), n_celltypes * cells)
    ct = np.tile(np.repeat(np.arange(n_celltypes), cells), n_donors)
    n = donor.size
    trt = donor % 2
    X = np.zeros((n, 2 * n_celltypes))
    X[np.arange(n), ct] = 1.0
    X[np.arange(n), n_celltypes + ct] = trt
    names = [f"ct{c}" for c in range(n_celltypes)] + [f"ct{c}:trt" for c in range(n_celltypes)]
    first = rng.integers(0, n_batches, n_donors)
    batch = (first[donor] + rng.integers(0, 3, n)) % n_batches
    labels = np.array([f"d{j:05d}" for j in range(n_donors)])[donor]
    if kind == "nested":
        design = build_design(X, n, groups=labels, exog_names=names,
                              exog_vc={"donor": np.zeros(n, dtype=int), "dct": ct})
    else:
        design = build_design(X, n, exog_names=names, exog_vc={"donor": labels, "batch": batch})
    sd = rng.uniform(0.0, 0.8, size=(3, n_genes)) * (rng.random((3, n_genes)) > 0.15)
    Y = (X @ rng.normal(scale=0.3, size=(X.shape[1], n_genes))
         + (sd[0] * rng.normal(size=(n_donors, n_genes)))[donor]
         + (sd[1] * rng.normal(size=(n_donors * n_celltypes, n_genes)))[donor * n_celltypes + ct]
         + (sd[2] * rng.normal(size=(n_batches, n_genes)))[batch]
         + rng.normal(size=(n, n_genes)))
    return sufficient_stats(design, Y)


def time_fit(stats: SufficientStats, repeats: int) -> tuple[float, dict]:
    """Median seconds of fit + Satterthwaite df, one thread; a description of the fit."""
    from threadpoolctl import threadpool_limits

    times = []
    with threadpool_limits(1):
        for _ in range(repeats):
            t0 = time.perf_counter()
            res = MultiGeneMixedLM.from_sufficient_stats(stats).fit(n_jobs=1)
            df = res.df_satterthwaite
            times.append(time.perf_counter() - t0)
    st = res._st
    info = {"groups": st.n_groups, "block_size": st.block_size, "global": int(st.glob_cols.size),
            "q": stats.k_re, "converged": float(res.converged.mean()),
            "median_iterations": float(np.median(res.n_iter)),
            "finite_df": float(np.isfinite(df.to_numpy()).mean())}
    return float(np.median(times)), info


def main(argv: list[str] | None = None) -> int:
    """Run the sweep and record it."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes, one repeat")
    p.add_argument("--genes", type=int, default=100)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    sizes = [250, 500, 1000] if args.quick else [250, 500, 1000, 2000, 4000]
    repeats = 1 if args.quick else 2
    genes = 20 if args.quick else args.genes
    result = {"machine": machine_info(), "genes": genes, "repeats": repeats,
              "celltypes": 3, "cells_per_donor_and_celltype": 20, "batches": 24, "designs": {}}
    print(f"{'design':8} {'donors':>7} {'q':>7} {'blocks':>7} {'s':>3} {'global':>6} "
          f"{'ms/gene':>9} {'iter':>5}")
    for kind in ("nested", "crossed"):
        rows = []
        for m in sizes:
            stats = simulate_stats(kind, m, genes)
            sec, info = time_fit(stats, repeats)
            rows.append({"donors": m, "ms_per_gene": 1e3 * sec / genes, **info})
            r = rows[-1]
            print(f"{kind:8} {m:7d} {r['q']:7d} {r['groups']:7d} {r['block_size']:3d} "
                  f"{r['global']:6d} {r['ms_per_gene']:9.2f} {r['median_iterations']:5.1f}",
                  flush=True)
            del stats
        x = np.log([r["donors"] for r in rows])
        y = np.log([r["ms_per_gene"] for r in rows])
        slope = float(np.polyfit(x, y, 1)[0])
        result["designs"][kind] = {"rows": rows, "loglog_slope": slope}
        print(f"{kind}: log-log slope of ms/gene against donors {slope:.2f}")
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    save_result(Path(args.out), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
