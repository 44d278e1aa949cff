"""Time of the batched fit from sufficient statistics (10,000 genes).

The statistics are simulated once (not timed): 20,000 cells, a fixed design of
21 terms (intercept-free one-hot of 10 cell types, 10 celltype:treatment
columns, log library size), 25 samples and, for the crossed model, a second
factor with 12 levels ("loc"); per gene, ``y = X b + u_sample [+ u_loc] + e``
with a gene-specific sample variance (some genes have none, so some fits end
on the boundary).  The genes are generated in blocks and their statistics
concatenated, so no dense cells x 10,000 array is ever held.

Timed (repeated, medians reported, every run kept in the JSON):

* ``one_component``: ``MultiGeneMixedLM.from_sufficient_stats(stats).fit()``
  plus materialising ``fe_params`` and ``bse_fe`` (``groups=samples``);
  target < 2 s;
* ``satterthwaite``: ``results.df_satterthwaite`` (all 21 terms) on that
  fit, after ``fe_params``/``bse_fe``; target <= 1x the fit time;
* ``two_crossed``: the same with ``exog_vc={"sam": samples, "loc": loc}`` and
  ``groups=None``; target < 30 s.

FLASHMM (R) reports about 3 ms per gene; it is quoted, not run, and compared
per gene.

Run from the repository root::

    python3 benchmarks/bench_fit.py              # full size
    python3 benchmarks/bench_fit.py --quick      # small smoke run
    python3 benchmarks/bench_fit.py --profile    # also cProfile both fits

It prints a table and writes ``benchmarks/results/fit.json``.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import pstats
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_info, save_result  # noqa: E402

from flashmm import MultiGeneMixedLM  # noqa: E402
from flashmm._design import build_design  # noqa: E402
from flashmm.stats import SufficientStats, accumulate, empty_partial  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "fit.json"
FLASHMM_R_SECONDS_PER_GENE = 3e-3   # published figure for FLASHMM (R); not run here


def simulate_stats(n_cells: int, n_genes: int, crossed: bool, seed: int = 0,
                   gene_block: int = 1_000) -> SufficientStats:
    """Statistics of simulated genes, computed block of genes by block of genes."""
    rng = np.random.default_rng(seed)
    n_types, n_samples, n_loc = 10, 25, 12
    celltype = rng.integers(0, n_types, size=n_cells)
    sample = rng.integers(0, n_samples, size=n_cells)
    loc = rng.integers(0, n_loc, size=n_cells)
    treated = (sample % 2).astype(float)
    onehot = np.eye(n_types)[celltype]
    libsize = rng.lognormal(8.0, 0.5, size=n_cells)
    X = np.column_stack([onehot, onehot * treated[:, None], np.log(libsize)])
    names = ([f"cls{j}" for j in range(n_types)] + [f"cls{j}:trt" for j in range(n_types)]
             + ["log_libsize"])
    sam_lab = np.array([f"s{j:02d}" for j in sample])
    loc_lab = np.array([f"L{j:02d}" for j in loc])
    if crossed:
        design = build_design(X, n_cells, exog_vc={"sam": sam_lab, "loc": loc_lab},
                              exog_names=names)
    else:
        design = build_design(X, n_cells, groups=sam_lab, exog_names=names)
    p, q = design.k_fe, design.exog_re.shape[1]
    parts = []
    for g0 in range(0, n_genes, gene_block):
        G = min(gene_block, n_genes - g0)
        B = rng.normal(0.0, 1.0, size=(p, G)) * 0.3
        sd_sam = rng.uniform(0.0, 0.8, size=G) * (rng.random(G) > 0.2)   # 20% with none
        Y = X @ B + rng.normal(size=(n_samples, G))[sample] * sd_sam
        if crossed:
            sd_loc = rng.uniform(0.0, 0.5, size=G) * (rng.random(G) > 0.2)
            Y += rng.normal(size=(n_loc, G))[loc] * sd_loc
        Y += rng.normal(size=(n_cells, G))
        part = empty_partial(p, q, G)
        accumulate(part, design.exog, design.exog_re, Y)
        parts.append(part)
        del Y
    partial = {k: np.concatenate([pt[k] for pt in parts], axis=-1) for k in parts[0]}
    return SufficientStats.from_partial(partial, design, [f"gene{j}" for j in range(n_genes)],
                                        None)


def fit_and_materialise(stats: SufficientStats):
    res = MultiGeneMixedLM.from_sufficient_stats(stats).fit()
    _ = (res.fe_params, res.bse_fe)   # lazily computed: materialise them
    return res


def time_fit(stats: SufficientStats, repeats: int, with_df: bool) -> dict:
    fit_runs, df_runs, ratio_runs = [], [], []
    res = None
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        res = fit_and_materialise(stats)
        t1 = time.perf_counter()
        fit_runs.append(t1 - t0)
        if with_df:
            gc.collect()
            t1 = time.perf_counter()
            _ = res.df_satterthwaite
            t2 = time.perf_counter()
            df_runs.append(t2 - t1)
            ratio_runs.append(df_runs[-1] / fit_runs[-1])
    out = {
        "fit_seconds_median": float(np.median(fit_runs)),
        "fit_seconds_runs": fit_runs,
        "per_gene_ms_median": 1e3 * float(np.median(fit_runs)) / stats.n_genes,
        "optimizer": res.optimizer,
        "converged_fraction": float(res.converged.mean()),
        "boundary_fraction": float(res.boundary.mean()),
        "iterations_median": float(np.median(res.n_iter)),
        "iterations_max": int(np.max(res.n_iter)),
    }
    if with_df:
        df = res.df_satterthwaite.to_numpy()
        out.update(
            satterthwaite_seconds_median=float(np.median(df_runs)),
            satterthwaite_seconds_runs=df_runs,
            satterthwaite_to_fit_ratio_median=float(np.median(ratio_runs)),
            satterthwaite_to_fit_ratio_runs=ratio_runs,
            satterthwaite_df_finite_fraction=float(np.isfinite(df).mean()),
        )
    return out


def profile(stats: SufficientStats, with_df: bool, top: int = 25) -> str:
    pr = cProfile.Profile()
    pr.enable()
    res = fit_and_materialise(stats)
    if with_df:
        _ = res.df_satterthwaite
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(top)
    s.write("\n")
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(top)
    return s.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=20_000)
    ap.add_argument("--genes", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--repeats-crossed", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="small smoke run")
    ap.add_argument("--profile", action="store_true", help="cProfile both fits (printed)")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.cells, args.genes, args.repeats, args.repeats_crossed = 2_000, 500, 2, 1

    info = machine_info()
    t0 = time.perf_counter()
    stats1 = simulate_stats(args.cells, args.genes, crossed=False, seed=0)
    stats2 = simulate_stats(args.cells, args.genes, crossed=True, seed=1)
    t_sim = time.perf_counter() - t0
    print(f"simulated {stats1!r}\n          {stats2!r}\nin {t_sim:.1f} s (not timed)")

    one = time_fit(stats1, args.repeats, with_df=True)
    two = time_fit(stats2, args.repeats_crossed, with_df=False)
    r_per_gene = FLASHMM_R_SECONDS_PER_GENE * 1e3
    for d in (one, two):
        d["flashmm_R_per_gene_ms"] = r_per_gene
        d["speedup_vs_flashmm_R_per_gene"] = r_per_gene / d["per_gene_ms_median"]

    out = {
        "benchmark": "batched fit from sufficient statistics (bench_fit.py)",
        "machine": info,
        "data": {"n_cells": args.cells, "n_genes": args.genes, "k_fe": stats1.k_fe,
                 "one_component_q": stats1.k_re, "two_crossed_q": stats2.k_re,
                 "simulation_seconds": t_sim},
        "timed": "MultiGeneMixedLM.from_sufficient_stats(stats).fit() + fe_params + bse_fe; "
                 "df_satterthwaite timed separately afterwards",
        "one_component": one,
        "two_crossed": two,
        "targets": {
            "one_component_seconds": 2.0,
            "two_crossed_seconds": 30.0,
            "satterthwaite_to_fit_ratio": 1.0,
            "one_component_met": one["fit_seconds_median"] < 2.0,
            "two_crossed_met": two["fit_seconds_median"] < 30.0,
            "satterthwaite_met": one["satterthwaite_to_fit_ratio_median"] <= 1.0,
        },
        "flashmm_R": {"seconds_per_gene": FLASHMM_R_SECONDS_PER_GENE,
                      "source": "published figure (~3 ms/gene), not run here"},
    }

    print(f"\n{'fit':<34}{'median s':>10}{'ms/gene':>9}{'vs R':>8}   runs")
    for name, d in (("one component (25 samples)", one), ("two crossed (25 + 12)", two)):
        print(f"{name:<34}{d['fit_seconds_median']:>10.3f}{d['per_gene_ms_median']:>9.4f}"
              f"{d['speedup_vs_flashmm_R_per_gene']:>7.0f}x   "
              + " ".join(f"{t:.3f}" for t in d["fit_seconds_runs"]))
    print(f"{'satterthwaite df, 21 terms':<34}{one['satterthwaite_seconds_median']:>10.3f}"
          f"{'':>9}{'':>8}   " + " ".join(f"{t:.3f}" for t in one["satterthwaite_seconds_runs"]))
    print(f"satterthwaite / fit = {one['satterthwaite_to_fit_ratio_median']:.2f}")
    print("targets:", {k: v for k, v in out["targets"].items() if k.endswith("met")})

    if args.profile:
        print("\n==== profile: one component, fit + fe_params + bse_fe + df_satterthwaite ====")
        print(profile(stats1, with_df=True))
        print("\n==== profile: two crossed, fit + fe_params + bse_fe ====")
        print(profile(stats2, with_df=False))

    if not args.no_save:
        save_result(RESULTS, out)


if __name__ == "__main__":
    main()
