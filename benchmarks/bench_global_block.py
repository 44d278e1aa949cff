"""Designs with a global (crossed) block at the atlas shape: CPU per gene, before and after.

Synthetic statistics with the structure of the atlas benchmark
(``bench_atlas_components.py``): 259 donors x 5 cell types, 24 batches with
each donor's cells over 3 of them, the atlas's fixed effects ``~ 0 +
np.log(libsize) + cls + cls:trt`` (p = 11), genes with donor, donor:cls and
batch variation (some at 0).  Four models:

* ``one``: ``(1|donor)`` (the eigen path, the reference cost);
* ``nested``: ``(1|donor) + (1|donor:cls)`` (arrowhead blocks, no global block);
* ``crossed``: ``(1|donor) + (1|batch)`` (259 blocks of 1 slot, a global block of 24);
* ``three``: ``(1|donor) + (1|donor:cls) + (1|batch)`` (259 blocks of 6 slots, global 24).

Each is fitted with the engine as it is (``after``) and as it was
(``before``: the exact global-block criterion switched off, so the general
criterion with its forward-difference Hessian, the previous route of the
crossed designs, and lme4's start ``theta = 1`` instead of
``flashmm._fit_theta.VC_START``), alternately, ``--repeats`` times; the CPU
time (``time.process_time``, one BLAS thread, ``n_jobs=1``) of ``fit()`` and
of the Satterthwaite df of every coefficient is reported per gene (minimum
over the repeats: robust to a shared machine's load).  The per-gene
log-likelihoods of the two runs are compared (``after`` must never be lower
by more than 1e-8).

Run from the repository root::

    python benchmarks/bench_global_block.py                 # 256 genes, ~5 min
    python benchmarks/bench_global_block.py --genes 64 --repeats 1

It prints a table and writes ``benchmarks/results/global_block.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_info, save_result, sufficient_stats  # noqa: E402

import flashmm._fit_global as fit_global  # noqa: E402
import flashmm._fit_theta as fit_theta  # noqa: E402
from flashmm import MultiGeneMixedLM  # noqa: E402
from flashmm._design import build_design  # noqa: E402
from flashmm.stats import SufficientStats  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "global_block.json"
MODELS = ("one", "nested", "crossed", "three")


def atlas_like_stats(kind: str, n_genes: int, n_donors: int = 259, n_ct: int = 5,
                     cells: int = 40, n_batches: int = 24, seed: int = 0) -> SufficientStats:
    """Statistics of one model on an atlas-shaped design (``cells`` per donor and cell type
    on average; the fit's cost does not depend on the number of cells)."""
    rng = np.random.default_rng(seed)
    n = n_donors * n_ct * cells
    donor = rng.integers(0, n_donors, n)
    ct = rng.integers(0, n_ct, n)
    trt = rng.permutation(np.arange(n_donors) % 2)[donor]
    X = np.zeros((n, 1 + 2 * n_ct))
    X[:, 0] = np.log(rng.lognormal(8.0, 0.3, n))
    X[np.arange(n), 1 + ct] = 1.0
    X[np.arange(n), 1 + n_ct + ct] = trt
    names = ["loglib"] + [f"ct{c}" for c in range(n_ct)] + [f"ct{c}:trt" for c in range(n_ct)]
    batch = (rng.integers(0, n_batches, n_donors)[donor] + rng.integers(0, 3, n)) % n_batches
    labels = np.array([f"d{j:05d}" for j in range(n_donors)])[donor]
    dct = np.char.add(np.char.add(labels, ":"), ct.astype(str))
    vc = {"nested": {"donor": labels, "dct": dct}, "crossed": {"donor": labels, "batch": batch},
          "three": {"donor": labels, "dct": dct, "batch": batch}}
    if kind == "one":
        design = build_design(X, n, groups=labels, exog_names=names)
    else:
        design = build_design(X, n, exog_names=names, exog_vc=vc[kind])
    sd = rng.uniform(0.0, 0.8, size=(3, n_genes)) * (rng.random((3, n_genes)) > 0.15)
    Y = (X[:, 1:] @ rng.normal(scale=0.3, size=(X.shape[1] - 1, n_genes))
         + (sd[0] * rng.normal(size=(n_donors, n_genes)))[donor]
         + (sd[1] * rng.normal(size=(n_donors * n_ct, n_genes)))[donor * n_ct + ct]
         + (sd[2] * rng.normal(size=(n_batches, n_genes)))[batch]
         + rng.normal(size=(n, n_genes)))
    return sufficient_stats(design, Y)


def cpu_fit(stats: SufficientStats, exact_global: bool) -> tuple[float, float, np.ndarray, float]:
    """CPU seconds of fit() and of the Satterthwaite df, the log-likelihoods, median iterations."""
    from threadpoolctl import threadpool_limits

    saved = fit_global.MAX_GLOBAL, fit_theta.VC_START
    if not exact_global:
        fit_global.MAX_GLOBAL, fit_theta.VC_START = 0, 1.0
    try:
        with threadpool_limits(1):
            t0 = time.process_time()
            res = MultiGeneMixedLM.from_sufficient_stats(stats).fit(n_jobs=1)
            t1 = time.process_time()
            _ = res.df_satterthwaite
            t2 = time.process_time()
    finally:
        fit_global.MAX_GLOBAL, fit_theta.VC_START = saved
    return t1 - t0, t2 - t1, res.llf.to_numpy(), float(np.median(res.n_iter))


def main(argv: list[str] | None = None) -> int:
    """Fit every model before and after, alternately, and record the CPU per gene."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--genes", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    G = args.genes
    result = {"machine": machine_info(), "genes": G, "repeats": args.repeats,
              "donors": 259, "celltypes": 5, "batches": 24, "fixed_effects": 11, "models": {}}
    print(f"{'model':8} {'':6} {'fit ms/gene':>12} {'df ms/gene':>11} {'iter':>5}")
    for kind in args.models.split(","):
        stats = atlas_like_stats(kind, G)
        runs: dict[str, dict] = {}
        for _ in range(args.repeats):
            for label, exact in (("before", False), ("after", True)):
                fit, df, llf, it = cpu_fit(stats, exact)
                r = runs.setdefault(label, {"fit": [], "df": [], "llf": llf, "iter": it})
                r["fit"].append(fit)
                r["df"].append(df)
        row = {}
        for label, r in runs.items():
            row[label] = {"fit_ms_per_gene": 1e3 * min(r["fit"]) / G,
                          "df_ms_per_gene": 1e3 * min(r["df"]) / G, "median_iterations": r["iter"]}
            print(f"{kind:8} {label:6} {row[label]['fit_ms_per_gene']:12.2f} "
                  f"{row[label]['df_ms_per_gene']:11.2f} {r['iter']:5.1f}", flush=True)
        diff = runs["after"]["llf"] - runs["before"]["llf"]
        row["llf_after_minus_before"] = {"min": float(np.nanmin(diff)), "max": float(np.nanmax(diff))}
        tot = {k: row[k]["fit_ms_per_gene"] + row[k]["df_ms_per_gene"] for k in ("before", "after")}
        row["speedup"] = tot["before"] / tot["after"]
        print(f"{kind:8} speed-up {row['speedup']:.2f}x; llf after - before in "
              f"[{diff.min():.1e}, {diff.max():.1e}]", flush=True)
        result["models"][kind] = row
    one = result["models"].get("one")
    if one:
        base = one["after"]["fit_ms_per_gene"] + one["after"]["df_ms_per_gene"]
        for row in result["models"].values():
            for label in ("before", "after"):
                row[label]["ratio_to_one"] = (row[label]["fit_ms_per_gene"]
                                              + row[label]["df_ms_per_gene"]) / base
    result["load_average_at_end"] = list(__import__("os").getloadavg())
    save_result(Path(args.out), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
