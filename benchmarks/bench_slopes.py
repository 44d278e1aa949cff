"""Random slopes: cost per gene against the number of groups.

Correlated random intercepts and slopes, ``(1 + x | group)`` (r = 2), for 500
simulated genes with 20 cells per group and 3 fixed effects (intercept, x and
a group-level treatment), for m = 25 ... 1,600 groups (q = 2m random effects).
Per gene, ``y = X b + u_0 + u_1 x + e`` with a gene-specific 2 x 2 covariance
(correlation in [-0.8, 0.8]; a fifth of the genes have no slope variance, so
some fits end on the boundary).  The statistics are computed once per m and
not timed.

Timed (medians over repeats):

* ``evaluation``: one criterion + gradient evaluation for all genes at
  ``T = I`` (the unit of work of every Newton step);
* ``fit``: ``MultiGeneMixedLM.from_sufficient_stats(stats).fit()`` plus the
  fixed effects, their standard errors and the Satterthwaite df of every term;
* ``dense_cholesky``: for comparison, what a dense implementation pays per
  evaluation -- one Cholesky factorisation of a q x q matrix per gene (timed
  on 20 genes, only up to q = 800).

The target is a per-gene cost linear in the number of groups: the script
reports the log-log slope of the evaluation and fit times against m.

Run from the repository root::

    python3 benchmarks/bench_slopes.py            # ~3 min on 2 cores
    python3 benchmarks/bench_slopes.py --quick    # smoke run

It prints a table and writes ``benchmarks/results/slopes.json``.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_info, save_result  # noqa: E402

from flashmm import MultiGeneMixedLM  # noqa: E402
from flashmm._design import build_design  # noqa: E402
from flashmm._fit_theta import ThetaCriterion, theta_structure  # noqa: E402
from flashmm.stats import SufficientStats, accumulate, empty_partial  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "slopes.json"


def simulate_stats(n_groups: int, n_genes: int, cells_per_group: int = 20, seed: int = 0
                   ) -> SufficientStats:
    """Statistics of a random intercept-and-slope study with ``n_groups`` groups."""
    rng = np.random.default_rng(seed)
    n = n_groups * cells_per_group
    grp = np.repeat(np.arange(n_groups), cells_per_group)
    x = rng.normal(size=n)
    trt = (grp % 2).astype(float)
    X = np.column_stack([np.ones(n), x, trt])
    Ere = X[:, :2]
    labels = np.array([f"g{j:05d}" for j in grp])
    design = build_design(X, n, groups=labels, exog_re=Ere, exog_names=["Intercept", "x", "trt"])
    p, q = design.k_fe, design.exog_re.shape[1]
    sd0 = rng.uniform(0.3, 1.0, size=n_genes)
    sd1 = rng.uniform(0.0, 0.6, size=n_genes) * (rng.random(n_genes) > 0.2)
    rho = rng.uniform(-0.8, 0.8, size=n_genes)
    z0 = rng.normal(size=(n_groups, n_genes))
    z1 = rho * z0 + np.sqrt(1 - rho ** 2) * rng.normal(size=(n_groups, n_genes))
    Y = (X @ rng.normal(scale=0.3, size=(p, n_genes)) + (sd0 * z0)[grp]
         + (sd1 * z1)[grp] * x[:, None] + rng.normal(size=(n, n_genes)))
    part = empty_partial(p, q, n_genes)
    accumulate(part, design.exog, design.exog_re, Y)
    return SufficientStats.from_partial(part, design, [f"gene{j}" for j in range(n_genes)], None)


def median_time(fn, repeats: int) -> tuple[float, list[float]]:  # noqa: ANN001
    runs = []
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return float(np.median(runs)), runs


def time_evaluation(stats: SufficientStats, repeats: int) -> tuple[float, list[float]]:
    meta = stats.info["random_slopes"]
    st = theta_structure(stats.components, int(meta["dim"]), False, stats.ZZ)
    c = np.sqrt(stats.yy / stats.n)
    crit = ThetaCriterion.from_stats(stats, st, True, c)
    theta = st.start(1.0, stats.n_genes)
    return median_time(lambda: crit.gradient(theta), repeats)


def time_fit(stats: SufficientStats, repeats: int) -> dict:
    holder = {}

    def run() -> None:
        res = MultiGeneMixedLM.from_sufficient_stats(stats).fit()
        _ = (res.fe_params, res.bse_fe, res.df_satterthwaite)
        holder["res"] = res

    med, runs = median_time(run, repeats)
    res = holder["res"]
    return {"fit_seconds_median": med, "fit_seconds_runs": runs,
            "converged_fraction": float(res.converged.mean()),
            "boundary_fraction": float(res.boundary.mean()),
            "iterations_median": float(np.median(res.n_iter))}


def time_dense_cholesky(q: int, genes: int = 20) -> float:
    """Seconds per gene for one dense q x q Cholesky factorisation."""
    rng = np.random.default_rng(1)
    A = rng.normal(size=(q, q))
    M = np.broadcast_to(A @ A.T + q * np.eye(q), (genes, q, q)).copy()
    t0 = time.perf_counter()
    np.linalg.cholesky(M)
    return (time.perf_counter() - t0) / genes


def loglog_slope(x: list[int], y: list[float]) -> float:
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--groups", type=int, nargs="+", default=[25, 50, 100, 200, 400, 800, 1600])
    ap.add_argument("--genes", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.groups, args.genes, args.repeats = [25, 50, 100], 50, 1
    rows = []
    for m in args.groups:
        stats = simulate_stats(m, args.genes)
        ev, ev_runs = time_evaluation(stats, args.repeats)
        fit = time_fit(stats, args.repeats)
        q = 2 * m
        dense = time_dense_cholesky(q) if q <= 800 else None
        row = {"groups": m, "q": q, "cells": int(stats.n),
               "evaluation_seconds_median": ev, "evaluation_seconds_runs": ev_runs,
               "evaluation_ms_per_gene": 1e3 * ev / args.genes,
               "fit_ms_per_gene": 1e3 * fit["fit_seconds_median"] / args.genes,
               "dense_cholesky_ms_per_gene": None if dense is None else 1e3 * dense, **fit}
        rows.append(row)
        print(f"m={m:5d} q={q:5d}  eval {row['evaluation_ms_per_gene']:8.3f} ms/gene  "
              f"fit {row['fit_ms_per_gene']:8.2f} ms/gene  "
              f"iter {fit['iterations_median']:.0f}  conv {fit['converged_fraction']:.3f}  "
              f"boundary {fit['boundary_fraction']:.2f}  dense chol "
              + ("-" if dense is None else f"{1e3 * dense:.3f} ms/gene"), flush=True)
    ms = [r["groups"] for r in rows]
    out = {
        "machine": machine_info(),
        "genes": args.genes,
        "repeats": args.repeats,
        "rows": rows,
        "evaluation_loglog_slope": loglog_slope(ms, [r["evaluation_seconds_median"]
                                                     for r in rows]),
        "fit_loglog_slope": loglog_slope(ms, [r["fit_seconds_median"] for r in rows]),
    }
    dense_rows = [r for r in rows if r["dense_cholesky_ms_per_gene"] is not None]
    if len(dense_rows) > 1:
        out["dense_cholesky_loglog_slope"] = loglog_slope(
            [r["groups"] for r in dense_rows], [r["dense_cholesky_ms_per_gene"] for r in dense_rows])
    print(f"log-log slope against m: evaluation {out['evaluation_loglog_slope']:.2f}, "
          f"fit {out['fit_loglog_slope']:.2f}"
          + (f", dense Cholesky {out['dense_cholesky_loglog_slope']:.2f}"
             if "dense_cholesky_loglog_slope" in out else ""))
    if not args.no_save:
        save_result(RESULTS, out)


if __name__ == "__main__":
    main()
